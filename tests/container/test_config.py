"""The worker's settings: flags over STUDIO_WORKER_* variables, the secret kept as a hash, the open-auth warning."""

from __future__ import annotations

import hashlib
import logging

import pytest

from deploy.container.config import WorkerSettings, WorkerSettingsError, secret_digest

SECRET = "a-long-enough-shared-secret"


def test_variables_fill_what_flags_leave_and_flags_win(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_WORKER_PORT", "9001")
    monkeypatch.setenv("STUDIO_WORKER_CACHE_GB", "7.5")
    monkeypatch.setenv("STUDIO_WORKER_SKELETON_DIRS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("STUDIO_WORKER_BACKEND_OPTIONS", '{"step_delay": 0.5}')
    settings = WorkerSettings(port=9100)
    assert settings.port == 9100 and settings.cache_gb == 7.5
    assert settings.skeleton_dirs == [tmp_path / "a", tmp_path / "b"]
    assert settings.backend_options == {"step_delay": 0.5} and settings.max_waiting == 4
    with pytest.raises(ValueError, match="tpu"):
        WorkerSettings(devices="cuda:0,tpu:0")


def test_the_secret_comes_from_the_variable_or_a_file_and_only_its_hash_is_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("STUDIO_WORKER_SECRET", raising=False)
    assert secret_digest(WorkerSettings()) is None
    expected = hashlib.sha256(SECRET.encode()).digest()
    monkeypatch.setenv("STUDIO_WORKER_SECRET", SECRET)
    from_env = WorkerSettings()
    assert secret_digest(from_env) == expected and SECRET not in repr(from_env)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    with pytest.raises(WorkerSettingsError, match="not both"):
        secret_digest(WorkerSettings(secret_file=secret_file))
    monkeypatch.delenv("STUDIO_WORKER_SECRET")
    assert secret_digest(WorkerSettings(secret_file=secret_file)) == expected, "the trailing newline is not part of it"
    with pytest.raises(WorkerSettingsError, match="cannot read") as missing:
        secret_digest(WorkerSettings(secret_file=tmp_path / "nope"))
    assert missing.value.field == "secret_file"


def test_open_auth_on_a_public_address_is_warned_about(monkeypatch, caplog):
    from deploy.container.serve import build

    monkeypatch.delenv("STUDIO_WORKER_SECRET", raising=False)
    for address, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deploy.container.serve"):
            host, _app = build(WorkerSettings(backend="fake", host=address))
            host.stop(1)
        assert any("no shared secret" in r.getMessage() for r in caplog.records) is warned, address
    monkeypatch.setenv("STUDIO_WORKER_SECRET", SECRET)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        host, _app = build(WorkerSettings(backend="fake", host="0.0.0.0"))
        host.stop(1)
    assert not any("no shared secret" in r.getMessage() for r in caplog.records)
    assert not any(SECRET in r.getMessage() for r in caplog.records)
