"""Fixtures for datasets: a studio with a small disk quota, users, and images and zips built in code."""

from __future__ import annotations

import io
import stat
import zipfile
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ADMIN_PASSWORD, login

USER_PASSWORD = "dataset-user-password-1"


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def jpeg(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(out, format="JPEG")
    return out.getvalue()


def make_zip(entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    out.seek(0)
    return out


@pytest.fixture
def dstudio(make_settings):
    import app

    built = app.build(make_settings(user_quota_gb=0.001, dataset_max_files=50, dataset_max_mb=1))
    yield built
    built.close()


def admin_of(studio: Any) -> Any:
    return studio.users.get_by_name("admin")


def make_user(studio: Any, name: str = "alice") -> Any:
    return studio.users.create_user(actor=admin_of(studio), username=name, password=USER_PASSWORD)


def http_as(studio: Any, name: str) -> Any:
    from fastapi.testclient import TestClient

    client = TestClient(studio.app, follow_redirects=False)
    login(client, name, ADMIN_PASSWORD if name == "admin" else USER_PASSWORD)
    return client


def stored(studio: Any) -> list[str]:
    return [blob.key for blob in studio.store.list("datasets/")]


def row_count(studio: Any) -> tuple[int, int]:
    from sqlmodel import func, select

    from webapp.records import Dataset, DatasetItem

    with studio.db.read() as s:
        return (s.exec(select(func.count()).select_from(Dataset)).one(),
                s.exec(select(func.count()).select_from(DatasetItem)).one())
