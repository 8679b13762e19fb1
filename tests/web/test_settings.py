"""Typed settings: env prefix STUDIO_, flags override env, and the start-up safety check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from webapp.settings import Settings, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_live_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings_from_args([])
    assert s.host == "127.0.0.1" and s.port == 7860
    assert s.data_dir == tmp_path / "data"
    assert s.db_url == f"sqlite:///{tmp_path / 'data' / 'studio.db'}"
    assert s.store_url == str(tmp_path / "data" / "store")


def test_flags_override_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_PORT", "9000")
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "env"))
    assert settings_from_args([]).port == 9000
    s = settings_from_args(["--port", "9100", "--listen", "--data-dir", str(tmp_path / "cli")])
    assert s.port == 9100 and s.host == "0.0.0.0" and s.data_dir == tmp_path / "cli"


def test_annotators_dir_defaults_under_the_data_dir_and_flag_beats_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings_from_args([]).annotators_dir == tmp_path / "data" / "annotators"
    monkeypatch.setenv("STUDIO_ANNOTATORS_DIR", "env-annotators")
    assert settings_from_args([]).annotators_dir == tmp_path / "env-annotators"
    assert settings_from_args(["--annotators-dir", str(tmp_path / "cli")]).annotators_dir == tmp_path / "cli"


def test_controlnet_unit_count_default_env_flag_and_bounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings_from_args([]).controlnet_unit_count == 3
    monkeypatch.setenv("STUDIO_CONTROLNET_UNIT_COUNT", "5")
    assert settings_from_args([]).controlnet_unit_count == 5
    assert settings_from_args(["--controlnet-unit-count", "2"]).controlnet_unit_count == 2
    with pytest.raises(ValueError, match="controlnet_unit_count"):
        Settings(controlnet_unit_count=0)
    with pytest.raises(ValueError, match="controlnet_detect_max_images"):
        Settings(controlnet_detect_max_images=0)


def test_invalid_port_is_refused():
    with pytest.raises(ValueError, match="port"):
        Settings(port=70000)


def test_listen_without_any_admin_password_refuses_to_start(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--listen", "--port", "1", "--data-dir", str(tmp_path / "d")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "refusing to listen" in result.stderr


def test_first_start_generates_and_reveals_an_admin_password_once(make_settings):
    import app

    studio = app.build(make_settings(admin_password=None))
    try:
        password = studio.generated_admin_password
        assert password and len(password) >= 16
        studio.auth.login("admin", password)
        stored = studio.users.get_by_name("admin").password_hash
        assert password not in stored and stored.startswith("$argon2id$")
    finally:
        studio.close()
    again = app.build(make_settings(admin_password=None))
    try:
        assert again.generated_admin_password is None
    finally:
        again.close()


def test_bad_settings_are_refused_with_one_clear_line(tmp_path, monkeypatch, capsys, caplog):
    import app

    monkeypatch.setenv("STUDIO_PORT", "abc")
    assert app.main(["--data-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "setting port (flag --port or env STUDIO_PORT)" in err and "Traceback" not in err
    monkeypatch.delenv("STUDIO_PORT")
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "short")
    assert app.main(["--data-dir", str(tmp_path / "b")]) == 2
    assert "STUDIO_ADMIN_PASSWORD cannot be the first administrator's password" in caplog.text
    assert "at least 8 characters" in caplog.text and "'short'" not in caplog.text  # the value is never echoed


def test_idle_hooks_parse_from_flags_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings_from_args([])
    assert s.idle_unload_minutes == 30 and s.idle_shutdown_minutes == 0
    assert s.idle_shutdown_command == ["systemctl", "poweroff"]
    monkeypatch.setenv("STUDIO_IDLE_SHUTDOWN_COMMAND", '["/usr/bin/env", "a b"]')
    monkeypatch.setenv("STUDIO_IDLE_UNLOAD_MINUTES", "0")
    s = settings_from_args(["--idle-shutdown-minutes", "45"])
    assert s.idle_shutdown_command == ["/usr/bin/env", "a b"] and s.idle_unload_minutes == 0
    assert s.idle_shutdown_minutes == 45
    s = settings_from_args(["--idle-shutdown-command", "sudo -n '/usr/sbin/shutdown' -h now"])
    assert s.idle_shutdown_command == ["sudo", "-n", "/usr/sbin/shutdown", "-h", "now"]
    for bad in (["--idle-shutdown-command", " "], ["--idle-unload-minutes", "-1"]):
        with pytest.raises(ValueError):
            settings_from_args(bad)


def test_metrics_token_is_secret_and_not_short(monkeypatch):
    monkeypatch.setenv("STUDIO_METRICS_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16"):
        Settings()
    monkeypatch.setenv("STUDIO_METRICS_TOKEN", "x" * 24)
    s = Settings()
    assert s.metrics_token is not None and "x" * 24 not in repr(s)
