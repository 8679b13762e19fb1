"""deploy/vm cannot rot silently: the unit's flags, the env files' STUDIO_* names and the cloud-init's steps
are checked against the real settings parser, YAML, bash and (where installed) systemd-analyze."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from webapp.settings import Settings, build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[2]
VM = ROOT / "deploy" / "vm"
UNIT = VM / "studio.service"
CLOUD_INIT = VM / "cloud-init.yaml"
ENV_EXAMPLE = VM / "studio.env.example"
VENV_PYTHON = "/opt/studio/venv/bin/python"
INSTALLED_SRC = Path("/opt/studio/src")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def exec_start_args() -> list[str]:
    """ExecStart's arguments after app.py (asserting that it is the venv's python running app.py)."""
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert argv[0] == VENV_PYTHON, "the unit runs the venv's python"
    script = Path(argv[1])
    assert script.name == "app.py" and script.parent == INSTALLED_SRC, "it runs app.py from the installed source"
    assert (ROOT / script.relative_to(INSTALLED_SRC)).is_file()
    return argv[2:]


def env_assignments(text: str, *, commented: bool = False) -> dict[str, str]:
    """``NAME=value`` lines as systemd's EnvironmentFile reads them; with ``commented``, ``# NAME=...`` too."""
    pattern = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
    found = {}
    for line in text.splitlines():
        match = pattern.match(line)
        if match and (commented or not match.group(1)):
            value = match.group(3).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            found[match.group(2)] = value
    return found


def cloud_config() -> dict:
    return yaml.safe_load(CLOUD_INIT.read_text())


def written_file(path: str) -> str:
    files = {entry["path"]: entry for entry in cloud_config()["write_files"]}
    assert path in files, f"cloud-init writes no {path}"
    return files[path]["content"]


def check_settings_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Every name is a Settings field (Settings ignores unknown STUDIO_* names, so a typo would vanish) and
    the values parse with the real parser, flags of the unit included."""
    fields = set(Settings.model_fields)
    unknown = [name for name in env if not name.startswith("STUDIO_") or name[7:].lower() not in fields]
    assert not unknown, f"not settings of webapp/settings.py: {unknown}"
    for name in [n for n in os.environ if n.startswith("STUDIO_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if value:
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return settings_from_args(exec_start_args())


def test_the_unit_runs_app_py_with_real_flags_and_restarts_on_failure(tmp_path, monkeypatch):
    service = unit()["Service"]
    assert service["User"] == service["Group"] == "studio"
    assert service["WorkingDirectory"] == str(INSTALLED_SRC)
    assert service["EnvironmentFile"] == "/etc/studio/studio.env"
    assert service["Restart"] == "on-failure"
    args = exec_start_args()
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    known = {option for action in build_parser()._actions for option in action.option_strings}
    assert flags and set(flags) <= known, f"flags app.py does not know: {set(flags) - known}"
    monkeypatch.chdir(tmp_path)
    settings = settings_from_args(args)
    assert settings.listens_publicly and settings.data_dir == Path("/var/lib/studio")
    assert service["StateDirectory"] == "studio", "systemd creates the data dir, owned by the service user"


def test_the_unit_is_hardened_but_keeps_the_gpu():
    service = unit()["Service"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ProtectKernelModules": "yes", "CapabilityBoundingSet": ""}.items():
        assert service.get(key) == value, f"{key}={value} expected"
    assert "PrivateDevices" not in service, "PrivateDevices hides /dev/nvidia*"
    assert "MemoryDenyWriteExecute" not in service, "it breaks torch's JIT compilers"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_knows_every_directive_of_the_unit(tmp_path):
    copy = tmp_path / "studio.service"
    copy.write_text(UNIT.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "is not executable" not in line and "No such file" not in line]
    assert not complaints, "systemd-analyze verify: " + "\n".join(complaints)


def test_every_setting_in_the_env_example_is_real_and_parses(tmp_path, monkeypatch):
    active = env_assignments(ENV_EXAMPLE.read_text())
    everything = env_assignments(ENV_EXAMPLE.read_text(), commented=True)
    assert "STUDIO_ADMIN_PASSWORD" in active and "STUDIO_METRICS_TOKEN" in everything
    check_settings_env(everything | {"STUDIO_METRICS_TOKEN": "x" * 24}, monkeypatch, tmp_path)
    settings = check_settings_env(active, monkeypatch, tmp_path)
    assert settings.idle_unload_minutes == 30 and settings.idle_shutdown_minutes == 0


def test_cloud_init_is_a_cloud_config_that_installs_and_starts_the_service():
    text = CLOUD_INIT.read_text()
    assert text.splitlines()[0] == "#cloud-config", "cloud-init ignores user data without this first line"
    config = cloud_config()
    assert {"python3-venv", "git", "ufw"} <= set(config["packages"])
    studio_user = next(u for u in config["users"] if isinstance(u, dict) and u.get("name") == "studio")
    assert studio_user["system"] and studio_user["shell"] == "/usr/sbin/nologin" and studio_user["lock_passwd"]
    assert "default" in config["users"], "the cloud's default (SSH) user is kept"
    commands = [c if isinstance(c, str) else shlex.join(c) for c in config["runcmd"]]
    assert any(re.search(r"studio-install && .*systemctl enable --now studio", c) for c in commands), commands


def test_the_install_script_is_valid_bash_and_installs_this_unit(tmp_path):
    script = written_file("/usr/local/sbin/studio-install")
    assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
    path = tmp_path / "studio-install"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    installed = re.search(r'install -m 0644 "\$top/src/(\S+)" /etc/systemd/system/studio.service', script)
    assert installed and (ROOT / installed.group(1)) == UNIT, "the unit comes from the installed source"
    assert 'pip" install -e "$top/src"' in script, "installed as the README installs it"
    assert 'ufw allow "$port/tcp"' in script and "ufw default deny incoming" in script
    source = env_assignments(written_file("/etc/studio/install.env"))
    assert source["STUDIO_SOURCE"] and source["STUDIO_REF"]


def test_the_env_cloud_init_writes_is_real_and_parses(tmp_path, monkeypatch):
    env = env_assignments(written_file("/etc/studio/studio.env"))
    settings = check_settings_env(env, monkeypatch, tmp_path)
    assert settings.idle_shutdown_command == ["systemctl", "poweroff"]
    placeholder = env_assignments(ENV_EXAMPLE.read_text())["STUDIO_ADMIN_PASSWORD"]
    assert env["STUDIO_ADMIN_PASSWORD"] == placeholder, "the install script replaces exactly this placeholder"
    assert f"^STUDIO_ADMIN_PASSWORD={placeholder}$" in written_file("/usr/local/sbin/studio-install")
