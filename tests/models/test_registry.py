"""ModelRegistry: register every type through the one import path, dedupe, probe vs declared, lookups,
visibility, rename/delete/previews, file refs; on SQLite and on PostgreSQL."""

from __future__ import annotations

import functools
import io
import json

import pytest

from tests.models.conftest import admin_of, make_user, store_keys
from webapp.records import ModelStatus, ModelType, Visibility
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied


@pytest.fixture
def make_settings(make_settings, database_url):
    """Every studio these tests build uses ``database_url``: each test runs on SQLite and on PostgreSQL."""
    return functools.partial(make_settings, database_url=database_url)


def test_register_each_type_detects_type_base_and_hashes(mstudio, tiny):
    import hashlib

    from pipelines.hashes import hash_file

    registry, admin = mstudio.models, admin_of(mstudio)
    expected = {
        tiny.checkpoint: (ModelType.CHECKPOINT, "sd1"), tiny.lora: (ModelType.LORA, "sd1"),
        tiny.embedding: (ModelType.EMBEDDING, None), tiny.hypernetwork: (ModelType.HYPERNETWORK, None),
        tiny.vae: (ModelType.VAE, None), tiny.controlnet: (ModelType.CONTROLNET, None),
        tiny.inpaint: (ModelType.CHECKPOINT, "sd1-inpaint"),
    }
    for path, (model_type, base) in expected.items():
        record = registry.register_file(actor=admin, path=path)  # no declared type: detected from tensors
        assert (record.type, record.status) == (model_type, ModelStatus.ACTIVE)
        assert record.base == base
        stored = mstudio.store.stat(record.store_key)
        assert stored is not None and stored.sha256 == record.sha256 and stored.size == record.size
        assert record.autov2 == record.sha256[:10]
        assert record.name == path.stem and record.file_name == path.name
    lora = registry.find(actor=admin, type="lora", ref="style")
    hashes = hash_file(tiny.lora)
    assert lora.sha256 == hashlib.sha256(tiny.lora.read_bytes()).hexdigest() == hashes.sha256
    assert lora.lora_hash == hashes.lora_sha256 and lora.lora_hash != lora.sha256
    # pickles are stored converted (TI) or kept as verified .pt (hypernetwork, which the engine reads as .pt)
    emb = registry.find(actor=admin, type="embedding", ref="tinyemb")
    assert emb.file_format == "safetensors"
    assert emb.source_sha256 == hashlib.sha256(tiny.embedding.read_bytes()).hexdigest()
    from safetensors.torch import load

    with mstudio.store.open(emb.store_key) as handle:
        assert list(load(handle.read())) == ["emb_params"]
    hyper = registry.find(actor=admin, type="hypernetwork", ref="tinyhyper")
    assert hyper.store_key.endswith(".pt") and hyper.file_format in ("pickle", "torch_zip")


def test_same_bytes_twice_is_one_model_even_as_a_converted_ckpt(mstudio, tiny):
    registry, admin = mstudio.models, admin_of(mstudio)
    first = registry.register_file(actor=admin, path=tiny.checkpoint)
    again = registry.register_file(actor=admin, path=tiny.checkpoint, name="another-name")
    old_format = registry.register_file(actor=admin, path=tiny.checkpoint_ckpt)  # converts to the same tensors
    assert again.id == first.id == old_format.id
    assert registry.count_models(actor=admin, status=None) == 1
    assert len(store_keys(mstudio)) == 1


def test_converted_ckpt_alone_keeps_its_source_hash(mstudio, tiny):
    import hashlib

    registry, admin = mstudio.models, admin_of(mstudio)
    record = registry.register_file(actor=admin, path=tiny.checkpoint_ckpt)
    ckpt_sha = hashlib.sha256(tiny.checkpoint_ckpt.read_bytes()).hexdigest()
    assert record.source_sha256 == ckpt_sha and record.sha256 != ckpt_sha
    assert record.file_format == "safetensors" and record.store_key.endswith(".safetensors")
    assert registry.find(actor=admin, type="checkpoint", ref=ckpt_sha).id == record.id
    assert registry.find(actor=admin, type="checkpoint", ref="tiny-sd15-old.ckpt").id == record.id


def test_declared_type_contradicting_content_is_refused_saying_what_it_is(mstudio, tiny):
    with pytest.raises(InvalidInput) as caught:
        mstudio.models.register_file(actor=admin_of(mstudio), path=tiny.lora, declared_type="checkpoint")
    assert caught.value.field == "type"
    assert "LoRA for sd1" in caught.value.message and "checkpoint" in caught.value.message
    assert mstudio.models.count_models(actor=admin_of(mstudio), status=None) == 0
    assert store_keys(mstudio) == []


def test_find_by_every_a1111_reference(mstudio, tiny, import_root):
    registry, admin = mstudio.models, admin_of(mstudio)
    nested = import_root / "Stable-diffusion" / "sub" / "tiny-sd15.safetensors"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(tiny.checkpoint.read_bytes())
    record = registry.register_file(actor=admin, path=nested, file_name="sub/tiny-sd15.safetensors",
                                    name="sub/tiny-sd15")
    for ref in ("sub/tiny-sd15", "sub/tiny-sd15.safetensors", "tiny-sd15", "tiny-sd15.safetensors",
                f"sub/tiny-sd15 [{record.autov2}]", f"sub/tiny-sd15.safetensors [{record.autov2}]",
                f"tiny-sd15 [{record.legacy_hash}]", record.autov2, record.legacy_hash, record.sha256,
                record.sha256.upper()):
        found = registry.find(actor=admin, type="checkpoint", ref=ref)
        assert found is not None and found.id == record.id, ref
    assert registry.find(actor=admin, type="checkpoint", ref="sub/tiny-sd15 [0123456789]") is None
    assert registry.find(actor=admin, type="lora", ref="sub/tiny-sd15") is None
    assert registry.find(actor=admin, type="checkpoint", ref="nothing-like-it") is None
    lora = registry.register_file(actor=admin, path=tiny.lora)
    assert registry.find(actor=admin, type="lora", ref=lora.lora_hash[:12]).id == lora.id


def test_private_models_are_invisible_to_other_users(mstudio, tiny):
    registry, admin = mstudio.models, admin_of(mstudio)
    alice, bob = make_user(mstudio, "alice"), make_user(mstudio, "bob")
    private = registry.register_file(actor=alice, path=tiny.lora, visibility="private")
    shared = registry.register_file(actor=alice, path=tiny.lora2)
    assert {m.id for m in registry.list_models(actor=alice)} == {private.id, shared.id}
    assert {m.id for m in registry.list_models(actor=bob)} == {shared.id}
    assert {m.id for m in registry.list_models(actor=admin)} == {private.id, shared.id}
    assert registry.find(actor=bob, type="lora", ref="style") is None
    with pytest.raises(NotFound):
        registry.get(actor=bob, model_id=private.id)
    # same bytes as a private model of someone else: bob gets a model of his own, as for any fresh import
    bobs = registry.register_file(actor=bob, path=tiny.lora, visibility="private")
    assert bobs.id != private.id and bobs.owner_id == bob.id
    assert {m.id for m in registry.list_models(actor=bob)} == {shared.id, bobs.id}
    assert {m.id for m in registry.list_models(actor=alice)} == {private.id, shared.id}
    with pytest.raises(PermissionDenied):
        registry.update(actor=bob, model_id=shared.id, name="mine-now")
    with pytest.raises(PermissionDenied):
        registry.delete(actor=bob, model_id=shared.id)
    with pytest.raises(PermissionDenied):  # in place means a server file: administrators only
        registry.register_file(actor=bob, path=tiny.vae, in_place=True)


def test_rename_update_and_name_rules(mstudio, tiny):
    registry, admin = mstudio.models, admin_of(mstudio)
    a = registry.register_file(actor=admin, path=tiny.lora)
    b = registry.register_file(actor=admin, path=tiny.lora2)
    with pytest.raises(Conflict) as caught:
        registry.update(actor=admin, model_id=b.id, name=a.name)
    assert caught.value.field == "name"
    for bad in ("", "a:b", "<x>", "x [y]", "../up", "a//b"):
        with pytest.raises(InvalidInput):
            registry.update(actor=admin, model_id=b.id, name=bad)
    renamed = registry.update(actor=admin, model_id=b.id, name="styles/ink", description=" nice ",
                              visibility=Visibility.PRIVATE, metadata={"trigger": "ink"})
    assert (renamed.name, renamed.description, renamed.visibility) == ("styles/ink", "nice", Visibility.PRIVATE)
    assert json.loads(renamed.metadata_json)["trigger"] == "ink"
    assert registry.find(actor=admin, type="lora", ref="styles/ink").id == b.id
    assert registry.find(actor=admin, type="lora", ref="ink").id == b.id  # A1111 also takes the bare stem


def test_delete_refused_while_a_job_uses_it_then_removes_bytes(mstudio, tiny):
    registry, admin = mstudio.models, admin_of(mstudio)
    record = registry.register_file(actor=admin, path=tiny.lora)
    busy = {"value": "job 2026-txt2img-Running-abc of alice"}
    registry.set_in_use_check(lambda model: busy["value"] if model.id == record.id else None)
    with pytest.raises(Conflict) as caught:
        registry.delete(actor=admin, model_id=record.id)
    assert "job 2026-txt2img-Running-abc of alice" in caught.value.message
    assert mstudio.store.exists(record.store_key)
    busy["value"] = None
    registry.delete(actor=admin, model_id=record.id)
    assert not mstudio.store.exists(record.store_key)
    with pytest.raises(NotFound):
        registry.get(actor=admin, model_id=record.id)


def test_preview_image_set_get_replace_and_bad_images(mstudio, tiny):
    from PIL import Image

    registry, admin = mstudio.models, admin_of(mstudio)
    record = registry.register_file(actor=admin, path=tiny.lora)

    def png(color: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
        return buffer.getvalue()

    registry.set_preview(actor=admin, model_id=record.id, data=png("red"))
    first_key = registry.get(actor=admin, model_id=record.id).preview_key
    registry.set_preview(actor=admin, model_id=record.id, data=png("blue"))
    data, content_type = registry.preview(actor=admin, model_id=record.id)
    assert content_type == "image/png" and data == png("blue")
    assert not mstudio.store.exists(first_key)  # the replaced image is gone
    for bad in (b"", b"not an image at all", tiny.lora.read_bytes()[:2000]):
        with pytest.raises(InvalidInput) as caught:
            registry.set_preview(actor=admin, model_id=record.id, data=bad)
        assert caught.value.field == "image"


def test_file_ref_round_trips_and_materialises(mstudio, tiny, tmp_path):
    from deploy.model_files import ModelFileRef, ModelFiles

    registry, admin = mstudio.models, admin_of(mstudio)
    record = registry.register_file(actor=admin, path=tiny.lora)
    ref = registry.file_ref(record)
    assert ModelFileRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    files = ModelFiles(mstudio.store, tmp_path / "cache", budget_bytes=10**9)
    assert files.path_for(ref).read_bytes() == tiny.lora.read_bytes()


def test_delete_names_the_real_job_using_the_model(build_studio, tiny):
    """The job service's guard (registered at build) refuses deletion while a queued/running job uses it."""
    studio = build_studio(backend="fake", backend_options={"step_delay": 0.5})
    admin = admin_of(studio)
    studio.models.register_file(actor=admin, path=tiny.checkpoint)
    lora = studio.models.register_file(actor=admin, path=tiny.lora)
    job = studio.jobs.submit(actor=admin, mode="txt2img",
                             request={"prompt": "ink <lora:style:0.8>", "steps": 40, "width": 64, "height": 64})
    with pytest.raises(Conflict) as caught:
        studio.models.delete(actor=admin, model_id=lora.id)
    assert "job" in caught.value.message and "of admin" in caught.value.message
    studio.jobs.cancel(actor=admin, job_id=job.id)
    studio.jobs.wait(actor=admin, job_id=job.id, timeout=30)
    studio.models.delete(actor=admin, model_id=lora.id)
    assert studio.models.find(actor=admin, type="lora", ref="style") is None


@pytest.mark.parametrize("side", [10_000, 30_000])  # over PIL's warning limit, and over its error limit
def test_preview_decompression_bomb_is_refused_naming_the_field(mstudio, tiny, side):
    from tests.fixtures.images import bomb_png

    registry, admin = mstudio.models, admin_of(mstudio)
    record = registry.register_file(actor=admin, path=tiny.lora)
    with pytest.raises(InvalidInput) as caught:
        registry.set_preview(actor=admin, model_id=record.id, data=bomb_png(side, side))
    assert caught.value.field == "image" and "too large to decode safely" in caught.value.message
    assert registry.get(actor=admin, model_id=record.id).preview_key is None
    assert list(mstudio.store.list("previews/")) == []
