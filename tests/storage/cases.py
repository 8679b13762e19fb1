"""What the contract tests run against: a store plus a probe for what a failed write left behind
(temp files on disk, objects or unfinished multipart uploads in S3)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.storage import BlobStore
from deploy.storage.local import META_DIR


@dataclass
class StoreCase:
    kind: str
    store: BlobStore
    residue: Callable[[], list[str]]
    """Keys of stored blobs plus anything else a write left behind (temp files, unfinished uploads)."""


def local_residue(root: Path) -> list[str]:
    """Every file under the root (named by key) except the metadata sidecars of blobs that exist."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            relative = path.relative_to(root)
            if relative.parts[0] == META_DIR:
                blob = root.joinpath(*relative.parts[1:]).with_name(name.removesuffix(".json"))
                if blob.is_file():
                    continue
            found.append(relative.as_posix())
    return sorted(found)


def s3_residue(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object (named by store key when under the prefix) and every unfinished multipart upload."""
    objects = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    uploads = [f"upload:{u['Key']}" for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return sorted(key.removeprefix(f"{prefix}/") for key in objects) + uploads
