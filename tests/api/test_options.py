"""/sdapi/v1/options: the full dict, per-user values over server defaults, checkpoint aliases, validation."""

from __future__ import annotations

import pytest

from tests.api.conftest import ADMIN, ALICE, BOB, api_studio
from tests.fixtures.studio_models import CHECKPOINT
from webapp.services.a1111_options import DEFAULTS


@pytest.fixture(scope="module")
def second_checkpoint(fake_studio):
    """A second checkpoint (the tiny inpaint model) so switching models is observable."""
    from tests.tiny.fixtures import tiny_files

    path = tiny_files().checkpoint("sd15_inpaint")
    record = fake_studio.studio.models.register_file(actor=fake_studio.admin, path=path, declared_type="checkpoint",
                                                     name="tiny-inpaint")
    # With no choice anywhere the first checkpoint by name would serve ("tiny-inpaint"): pin the default.
    assert fake_studio.client.get("/sdapi/v1/options", auth=ALICE).json()["sd_model_checkpoint"] == record.title
    fake_studio.client.post("/sdapi/v1/options", auth=ADMIN,
                            json={"sd_model_checkpoint": fake_studio.models.checkpoint.name})
    return record


def test_get_returns_every_option_with_the_current_model(fake_studio):
    options = fake_studio.client.get("/sdapi/v1/options", auth=ALICE).json()
    assert set(DEFAULTS) <= set(options)
    ckpt = fake_studio.models.checkpoint
    assert options["sd_model_checkpoint"] == ckpt.title == f"{CHECKPOINT} [{ckpt.autov2}]"
    assert options["sd_checkpoint_hash"] == ckpt.sha256
    assert options["sd_vae"] == "Automatic" and options["CLIP_stop_at_last_layers"] == 1
    assert "forge_preset" not in options  # SillyTavern would take the studio for Forge


@pytest.mark.parametrize("alias", ["title", "name", "autov2", "sha256", "file"])
def test_checkpoint_by_every_alias_changes_only_that_users_view(fake_studio, second_checkpoint, alias):
    c = fake_studio.client
    ref = {"title": second_checkpoint.title, "name": second_checkpoint.name, "autov2": second_checkpoint.autov2,
           "sha256": second_checkpoint.sha256, "file": second_checkpoint.file_name}[alias]
    try:
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": ref}, auth=BOB).json() is None
        assert c.get("/sdapi/v1/options", auth=BOB).json()["sd_model_checkpoint"] == second_checkpoint.title
        assert c.get("/sdapi/v1/options", auth=ALICE).json()["sd_model_checkpoint"] == fake_studio.models.checkpoint.title
        # Bob's next API job runs on his model; Alice's on the default.
        job = c.post("/sdapi/v1/txt2img", auth=BOB, json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
        assert job.status_code == 200, job.text
        import json

        assert json.loads(job.json()["info"])["sd_model_hash"] == second_checkpoint.autov2
    finally:
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": fake_studio.models.checkpoint.title}, auth=BOB)


def test_unknown_checkpoint_answers_404_naming_the_field_with_a1111s_message(fake_studio):
    c = fake_studio.client
    before = c.get("/sdapi/v1/options", auth=ALICE).json()["sd_model_checkpoint"]
    response = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"}, auth=ALICE)
    assert response.status_code == 404
    body = response.json()
    assert {"error", "detail", "body", "errors"} <= set(body)
    assert body["error"] == "NotFound" and body["errors"] == "model 'nope.safetensors' not found"
    assert body["field"] == "sd_model_checkpoint"
    assert c.get("/sdapi/v1/options", auth=ALICE).json()["sd_model_checkpoint"] == before


def test_whole_dict_posted_back_is_accepted_and_changes_nothing(fake_studio):
    from sqlmodel import select

    from webapp.records import UserOption

    c = fake_studio.client
    before = c.get("/sdapi/v1/options", auth=ALICE).json()
    assert c.post("/sdapi/v1/options", json=before, auth=ALICE).status_code == 200
    assert c.get("/sdapi/v1/options", auth=ALICE).json() == before
    alice = fake_studio.user("alice")
    with fake_studio.studio.db.read() as s:
        rows = s.exec(select(UserOption).where(UserOption.user_id == alice.id)).all()
    assert [r.key for r in rows] == [], "values equal to the defaults must not be stored per user"


def test_restricted_unknown_and_derived_keys_are_skipped(fake_studio):
    c = fake_studio.client
    response = c.post("/sdapi/v1/options", auth=ALICE, json={
        "outdir_samples": "/etc", "api_enable_requests": True, "no_such_option": 1, "sd_checkpoint_hash": "0" * 64})
    assert response.status_code == 200
    options = c.get("/sdapi/v1/options", auth=ALICE).json()
    assert options["outdir_samples"] == "" and options["api_enable_requests"] is False
    assert "no_such_option" not in options and options["sd_checkpoint_hash"] == fake_studio.models.checkpoint.sha256


def test_bad_values_are_refused_naming_the_option_and_nothing_is_written(fake_studio):
    c = fake_studio.client
    response = c.post("/sdapi/v1/options", auth=ALICE, json={"samples_format": "jpg", "CLIP_stop_at_last_layers": "two"})
    assert response.status_code == 422 and response.json()["field"] == "CLIP_stop_at_last_layers"
    assert c.get("/sdapi/v1/options", auth=ALICE).json()["samples_format"] == "png"
    for body, field in (({"samples_format": "bmp"}, "samples_format"), ({"jpeg_quality": 0}, "jpeg_quality"),
                        ({"enable_pnginfo": "yes"}, "enable_pnginfo"), ({"sd_vae": "missing-vae"}, "sd_vae")):
        response = c.post("/sdapi/v1/options", auth=ALICE, json=body)
        assert response.status_code == 422 and response.json()["field"] == field, body
    assert c.post("/sdapi/v1/options", auth=ALICE, content=b"[1, 2]",
                  headers={"content-type": "application/json"}).status_code == 422


def test_admin_sets_server_defaults_users_override_them(fake_studio):
    c = fake_studio.client
    try:
        c.post("/sdapi/v1/options", auth=ADMIN, json={"CLIP_stop_at_last_layers": 2, "samples_format": "webp"})
        assert c.get("/sdapi/v1/options", auth=BOB).json()["CLIP_stop_at_last_layers"] == 2
        c.post("/sdapi/v1/options", auth=BOB, json={"CLIP_stop_at_last_layers": 3})
        assert c.get("/sdapi/v1/options", auth=BOB).json()["CLIP_stop_at_last_layers"] == 3
        assert c.get("/sdapi/v1/options", auth=ALICE).json()["CLIP_stop_at_last_layers"] == 2
        assert c.get("/sdapi/v1/options", auth=ADMIN).json()["CLIP_stop_at_last_layers"] == 2
    finally:
        c.post("/sdapi/v1/options", auth=ADMIN, json={"CLIP_stop_at_last_layers": 1, "samples_format": "png"})
        c.post("/sdapi/v1/options", auth=BOB, json={"CLIP_stop_at_last_layers": 1})
    assert c.get("/sdapi/v1/options", auth=BOB).json()["CLIP_stop_at_last_layers"] == 1


def test_options_and_tokens_survive_a_restart(tmp_path_factory):
    with api_studio(tmp_path_factory, backend="fake") as first:
        first.client.post("/sdapi/v1/options", auth=ALICE, json={"sd_vae": "tinyvae", "jpeg_quality": 55})
        token = first.client.post("/api/v1/tokens", auth=ALICE, json={"name": "survives"}).json()["token"]
        settings = first.studio.settings
    import app

    again = app.build(settings)
    try:
        from fastapi.testclient import TestClient

        with TestClient(again.app) as c:
            options = c.get("/sdapi/v1/options", auth=ALICE).json()
            me = c.get("/api/v1/me", headers={"authorization": f"Bearer {token}"})
        assert options["sd_vae"] == "tinyvae" and options["jpeg_quality"] == 55
        assert me.status_code == 200 and me.json()["username"] == "alice"
    finally:
        again.close()


def test_posting_back_the_fallback_model_does_not_pin_it(tmp_path_factory):
    """Open WebUI posts the whole dict back on a fresh server: the user must keep following server defaults."""
    from sqlmodel import select

    from tests.tiny.fixtures import tiny_files
    from webapp.records import UserOption

    with api_studio(tmp_path_factory, backend="fake") as fresh:
        c = fresh.client
        shown = c.get("/sdapi/v1/options", auth=BOB).json()
        assert shown["sd_model_checkpoint"] == fresh.models.checkpoint.title  # the fallback: nobody chose it
        assert c.post("/sdapi/v1/options", auth=BOB, json=shown).status_code == 200
        with fresh.studio.db.read() as s:
            assert s.exec(select(UserOption).where(UserOption.user_id == fresh.user("bob").id)).all() == []
        other = fresh.studio.models.register_file(actor=fresh.admin, path=tiny_files().checkpoint("sd15_inpaint"),
                                                  declared_type="checkpoint", name="zz-later-default")
        assert c.post("/sdapi/v1/options", auth=ADMIN, json={"sd_model_checkpoint": other.name}).status_code == 200
        assert c.get("/sdapi/v1/options", auth=BOB).json()["sd_model_checkpoint"] == other.title
