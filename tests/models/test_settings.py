"""Model settings: flags and STUDIO_* variables, defaults derived from the data dir, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

from webapp.settings import Settings, settings_from_args


def test_models_flags_and_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("STUDIO_IMPORT_ROOTS", raising=False)
    settings = settings_from_args(["--data-dir", str(tmp_path / "d"), "--models-dir", str(tmp_path / "m"),
                                   "--model-cache-budget-gb", "5", "--import-workers", "3"])
    assert settings.models_dir == (tmp_path / "m").resolve()
    assert settings.import_roots == [(tmp_path / "d" / "imports").resolve(), (tmp_path / "m").resolve()]
    assert settings.model_cache_dir == (tmp_path / "d").resolve() / "cache" / "models"
    assert (settings.model_cache_budget_gb, settings.import_workers, settings.url_import_allow) == (5, 3, [])
    roots = settings_from_args(["--import-root", str(tmp_path / "a"), "--import-root", str(tmp_path / "b")])
    assert roots.import_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


def test_environment_lists_and_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STUDIO_IMPORT_ROOTS", f"{tmp_path}/x:{tmp_path}/y")
    monkeypatch.setenv("STUDIO_URL_IMPORT_ALLOW", "127.0.0.1:8000, 10.0.0.0/8")
    monkeypatch.setenv("STUDIO_CIVITAI_TOKEN", "civ-secret-value")
    settings = Settings()
    assert settings.import_roots == [Path(f"{tmp_path}/x"), Path(f"{tmp_path}/y")]
    assert settings.url_import_allow == ["127.0.0.1:8000", "10.0.0.0/8"]
    assert settings.civitai_token.get_secret_value() == "civ-secret-value"
    assert "civ-secret-value" not in repr(settings) and "civ-secret-value" not in str(settings.model_dump())
