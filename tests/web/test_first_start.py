"""``python app.py`` on an empty data dir: the generated admin password is shown once, pointing at the right tab,
and uvicorn is started without its own proxy-header trust (the app applies forwarded_allow_ips itself)."""

from __future__ import annotations

import logging

import uvicorn


def test_first_start_shows_the_password_once_and_names_the_account_tab(tmp_path, monkeypatch, capsys):
    import app

    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)  # main() must not reconfigure the test run
    served: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda _app, **kwargs: served.append(kwargs))
    data = str(tmp_path / "data")
    assert app.main(["--data-dir", data, "--backend", "fake", "--forwarded-allow-ips", "10.0.0.1"]) == 0
    err = capsys.readouterr().err
    assert "created user 'admin' with password: " in err
    assert "change it in the Account tab" in err and "Users tab" not in err
    assert served[0]["proxy_headers"] is False and served[0]["forwarded_allow_ips"] == ["10.0.0.1"]
    assert (tmp_path / "data" / "annotators").is_dir()  # ready for ControlNet preprocessor weights

    assert app.main(["--data-dir", data, "--backend", "fake"]) == 0  # second start: nothing shown
    assert "password" not in capsys.readouterr().err
