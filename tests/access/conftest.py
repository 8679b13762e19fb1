"""A database at the latest schema, on SQLite and on PostgreSQL (``database_url``)."""

from __future__ import annotations

import pytest

from webapp import schema
from webapp.db import Database


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    schema.upgrade(database)
    yield database
    database.engine.dispose()
