"""Typed backend options: the same validation for the Endpoints form, the API and the factories."""

from __future__ import annotations

import pytest

from deploy.backends.options import (
    HttpWorkerOptions,
    OptionsError,
    parse_options,
    plain_options,
    public_options,
    secret_fields,
)


def test_http_options_validate_url_and_secret_naming_the_field():
    good = parse_options("http", {"url": "https://gpu-box:8080/", "secret": "s" * 20})
    assert isinstance(good, HttpWorkerOptions) and good.url == "https://gpu-box:8080"
    assert "s" * 20 not in repr(good)  # a SecretStr never prints
    assert plain_options(good)["secret"] == "s" * 20
    for raw, field in [({"url": "ftp://x", "secret": "s" * 20}, "options.url"),
                       ({"url": "http://u:p@x", "secret": "s" * 20}, "options.url"),
                       ({"url": "http://x", "secret": "short"}, "options.secret"),
                       ({"secret": "s" * 20}, "options.url"),
                       ({"url": "http://x", "secret": "s" * 20, "slots": 0}, "options.slots"),
                       ({"url": "http://x", "secret": "s" * 20, "colour": 1}, "options.colour")]:
        with pytest.raises(OptionsError) as info:
            parse_options("http", raw)
        assert info.value.field == field


def test_unknown_kind_and_masking():
    with pytest.raises(OptionsError) as info:
        parse_options("teleport", {})
    assert info.value.field == "kind"
    assert secret_fields("http") == ("secret",) and secret_fields("local") == ()
    assert public_options("http", {"url": "http://x", "secret": "abc"})["secret"] == "********"
    assert parse_options("local", {}).model_dump()["devices"] == "auto"
