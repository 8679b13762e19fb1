"""`S3Store`: blobs as objects under ``s3://bucket/prefix/``.

Why an explicit multipart upload rather than `upload_fileobj`: S3 fixes an object's metadata when the
upload *starts*, but our sha256 is only known when the stream *ends*, and a mismatch with
`expected_sha256` must leave nothing behind. So the hash is known before the upload begins (given by
the caller, computed in a first pass over a seekable source, or computed while spooling a pipe to a
temporary file), every part is hashed again on the way, and the upload is completed only if the hash
still matches; on any failure it is aborted, so no object and no billable part survives.

Memory stays bounded by one part (`part_size`, 8 MiB by default): parts are read into one reused
buffer and sent sequentially. The client comes from a default boto3 session, so the usual
environment (credentials, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``) or an
explicit `endpoint_url` points it at AWS, MinIO or a test server without code changes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from deploy.storage.base import (
    CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    Readable,
    StorageError,
    StoredBlob,
    StreamDigest,
    copy_stream,
    iter_chunks,
    normalize_sha256,
    read_into,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
MAX_URL_EXPIRES = 7 * 24 * 3600
SHA256_METADATA = "sha256"

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_PART_CHECKSUMS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256")


def make_client(*, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """An S3 client from boto3's default session (credential chain, region, ``AWS_ENDPOINT_URL*``);
    `endpoint_url` and `region` override the environment. The default session caches service models,
    so building a store costs milliseconds after the first."""
    config = Config(signature_version="s3v4", retries={"mode": "standard"})
    return boto3.client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


class S3Store(BlobStore):
    """Blobs under `prefix` in `bucket`; the bucket must exist (creating buckets is an operator's job)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        spool_dir: str | Path | None = None,
        list_page_size: int = 1000,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket must be a bucket name, got {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), got {part_size}"
            )
        self._bucket = bucket
        self._prefix = prefix
        self._part_size = part_size
        self._spool_dir = spool_dir
        self._list_page_size = list_page_size
        self._owns_client = client is None
        self._client = client if client is not None else make_client(endpoint_url=endpoint_url, region=region)

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        return self._prefix

    def __repr__(self) -> str:
        return f"S3Store('s3://{self._bucket}/{self._prefix}')"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- names and errors ----------------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _key_of(self, object_key: str) -> str:
        return object_key[len(self._prefix) + 1 :] if self._prefix else object_key

    @contextmanager
    def _translate(self, action: str, key: str) -> Iterator[None]:
        """Turn botocore errors into store errors that name the key and bucket, at one place."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise BlobNotFound(key) from exc
            if code == "NoSuchBucket":
                raise StorageError(f"S3 bucket {self._bucket!r} does not exist") from exc
            raise StorageError(
                f"S3 {action} of {key!r} in bucket {self._bucket!r} failed: {code} {error.get('Message', '')}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {action} of {key!r} in bucket {self._bucket!r} failed: {exc}") from exc

    # -- writes --------------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        fileobj: Readable,
        *,
        content_type: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        object_key = self._object_key(key)
        expected = normalize_sha256(expected_sha256)
        if expected is not None:
            return self._upload(key, object_key, fileobj, expected, content_type)
        if _is_seekable(fileobj):
            start = fileobj.tell()  # type: ignore[attr-defined]
            prehash = StreamDigest()
            for chunk in iter_chunks(fileobj):
                prehash.update(chunk)
            fileobj.seek(start)  # type: ignore[attr-defined]
            return self._upload(key, object_key, fileobj, prehash.sha256, content_type)
        with tempfile.TemporaryFile(dir=self._spool_dir) as spool:
            spooled = copy_stream(fileobj, spool)
            spool.seek(0)
            return self._upload(key, object_key, spool, spooled.sha256, content_type)

    def _upload(
        self, key: str, object_key: str, source: Readable, sha256: str, content_type: str | None
    ) -> StoredBlob:
        """Send `source`, which must hash to `sha256`, as one object; all or nothing."""
        content_type = content_type or DEFAULT_CONTENT_TYPE
        extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}, "ContentType": content_type}
        buffer = bytearray(self._part_size)
        digest = StreamDigest()
        count = _fill(source, buffer, digest)
        if count < self._part_size:
            digest.check(key, sha256)
            del buffer[count:]
            with self._translate("upload", key):
                self._client.put_object(Bucket=self._bucket, Key=object_key, Body=buffer, **extra)
        else:
            self._multipart(key, object_key, source, buffer, digest, sha256, extra)
        logger.debug("stored %s in %r (%d bytes, sha256 %s)", key, self, digest.size, sha256)
        return self._stored(key, digest, content_type)

    def _multipart(
        self,
        key: str,
        object_key: str,
        source: Readable,
        buffer: bytearray,
        digest: StreamDigest,
        sha256: str,
        extra: dict[str, Any],
    ) -> None:
        """Upload a stream whose first (full) part is already in `buffer`, reusing it for every part."""
        with self._translate("upload", key):
            upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=object_key, **extra)[
                "UploadId"
            ]
        try:
            parts: list[dict[str, Any]] = []
            count = len(buffer)
            while count:
                if len(parts) == MAX_PARTS:
                    raise StorageError(
                        f"{key!r} is larger than {MAX_PARTS} parts of {self._part_size} bytes; raise part_size"
                    )
                last = count < self._part_size
                if last:
                    del buffer[count:]
                with self._translate("upload", key):
                    response = self._client.upload_part(
                        Bucket=self._bucket,
                        Key=object_key,
                        UploadId=upload_id,
                        PartNumber=len(parts) + 1,
                        Body=buffer,
                    )
                part = {"ETag": response["ETag"], "PartNumber": len(parts) + 1}
                part.update({name: response[name] for name in _PART_CHECKSUMS if name in response})
                parts.append(part)
                count = 0 if last else _fill(source, buffer, digest)
            digest.check(key, sha256)
            with self._translate("upload", key):
                self._client.complete_multipart_upload(
                    Bucket=self._bucket, Key=object_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            self._abort(object_key, upload_id)
            raise

    def _abort(self, object_key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=object_key, UploadId=upload_id)
            logger.info("aborted multipart upload of s3://%s/%s", self._bucket, object_key)
        except (ClientError, BotoCoreError):
            logger.warning(
                "could not abort multipart upload %s of s3://%s/%s; a bucket lifecycle rule "
                "(AbortIncompleteMultipartUpload) will reclaim its parts",
                upload_id,
                self._bucket,
                object_key,
                exc_info=True,
            )

    def _stored(self, key: str, digest: StreamDigest, content_type: str) -> StoredBlob:
        """What was just stored, with S3's own modification time when the store may read it back (a
        write-only policy must not turn a completed upload into an error)."""
        try:
            info = self.stat(key)
        except StorageError:
            logger.debug("could not read back %s after storing it", key, exc_info=True)
            info = None
        modified = info.modified if info is not None else None
        return StoredBlob(key, digest.size, digest.sha256, modified, content_type)

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        with self._translate("delete", key):
            self._client.delete_object(Bucket=self._bucket, Key=object_key)
        logger.debug("deleted %s from %r", key, self)

    # -- reads ---------------------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        """The object's `StreamingBody`: read it in chunks and close it when done."""
        object_key = self._object_key(key)
        with self._translate("download", key):
            return self._client.get_object(Bucket=self._bucket, Key=object_key)["Body"]

    def stat(self, key: str) -> StoredBlob | None:
        object_key = self._object_key(key)
        try:
            with self._translate("stat", key):
                head = self._client.head_object(Bucket=self._bucket, Key=object_key)
        except BlobNotFound:
            return None
        return StoredBlob(
            key,
            int(head["ContentLength"]),
            _sha256_from(head.get("Metadata", {})),
            head.get("LastModified"),
            head.get("ContentType"),
        )

    def list(self, prefix: str = "") -> Iterator[StoredBlob]:
        """Blobs by key, one page at a time. S3 listings carry no object metadata, so `sha256` and
        `content_type` are None here; `stat` a blob to get them."""
        validate_prefix(prefix)
        full_prefix = f"{self._prefix}/{prefix}" if self._prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        with self._translate("list", prefix):
            pages = paginator.paginate(
                Bucket=self._bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self._list_page_size}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = self._key_of(item["Key"])
                    try:
                        validate_key(key)
                    except InvalidKey as exc:
                        logger.warning("skipping object %r in %r: %s", item["Key"], self, exc.reason)
                        continue
                    yield StoredBlob(key, int(item["Size"]), None, item.get("LastModified"))

    def url(self, key: str, *, expires: int = 3600) -> str | None:
        """A presigned GET URL valid for `expires` seconds (S3 allows at most 7 days)."""
        object_key = self._object_key(key)
        if not isinstance(expires, int) or not 1 <= expires <= MAX_URL_EXPIRES:
            raise ValueError(f"expires must be 1..{MAX_URL_EXPIRES} seconds, got {expires!r}")
        with self._translate("presign", key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": object_key}, ExpiresIn=expires
            )


def _fill(source: Readable, buffer: bytearray, digest: StreamDigest) -> int:
    """Fill `buffer` from `source` (short only at end of stream), hashing what was read."""
    filled = 0
    with memoryview(buffer) as view:
        while filled < len(view):
            with view[filled : filled + CHUNK_SIZE] as window:
                count = read_into(source, window)
                if count == 0:
                    break
                with window[:count] as data:
                    digest.update(data)
            filled += count
    return filled


def _is_seekable(fileobj: Readable) -> bool:
    try:
        return bool(fileobj.seekable()) and fileobj.tell() >= 0  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _sha256_from(metadata: dict[str, str]) -> str | None:
    try:
        return normalize_sha256(metadata.get(SHA256_METADATA))
    except ValueError:
        return None
