"""ControlNet imports: a pickled .pth is stored as safetensors holding only the ControlNet, and that stored
file loads through the ControlNet loader with the original weights; a diffusers folder (server path or the
models dir) is stored as one packed file whose jobs equal the folder's, and a broken one leaves nothing."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.models.conftest import admin_of, store_keys, wait_task
from webapp.records import ModelType
from webapp.services.errors import InvalidInput


def test_pth_controlnet_is_converted_to_just_the_controlnet(mstudio, tiny, tmp_path):
    from safetensors.torch import load_file

    from pipelines.controlnet.loader import load_controlnet
    from tests.tiny import controlnets, ldm
    from tests.tiny.fixtures import tiny_files

    pipe = tiny_files().pipeline("sd15")
    cn = controlnets.tiny_controlnet(pipe.unet)
    # an original v1.0 release: the whole SD model beside control_model.*, plus training bookkeeping
    state = {"control_model." + k: v for k, v in ldm.controlnet_to_ldm(cn).items()}
    state |= {"model.diffusion_model." + k: v for k, v in ldm.unet_to_ldm(pipe.unet).items()}
    source = tmp_path / "control_sd15_tiny.pth"
    torch.save({"state_dict": state, "global_step": 5}, source)

    record = mstudio.models.register_file(actor=admin_of(mstudio), path=source)
    assert record.type is ModelType.CONTROLNET and record.file_format == "safetensors"
    stored = tmp_path / "stored.safetensors"
    with mstudio.store.open(record.store_key) as handle:
        stored.write_bytes(handle.read())
    assert all(k.startswith("control_model.") for k in load_file(stored))
    loaded = load_controlnet(stored)
    for key, value in cn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _folder(root, kind: str, name: str | None = None):
    """A diffusers ControlNet folder for the job-test world's `kind` UNet, pooled (a config-only difference)."""
    from tests.pipelines.test_controlnet_folders import folder_controlnet
    from tests.pipelines.test_gen_fixtures import PIPE_FILES, world
    from tests.tiny import controlnets

    model = folder_controlnet(world().pipes[PIPE_FILES[kind]].unet)
    return controlnets.write_diffusers_folder(root / (name or f"controlnet-{kind}-canny"), model)


def _job_image(kind: str, path, annotators_dir) -> bytes:
    """One txt2img job on the tiny `kind` model with one unit of the ControlNet at `path`."""
    from pipelines.controlnet.apply import build_sources
    from pipelines.controlnet.loader import load_controlnet
    from pipelines.controlnet.preprocessors import Annotators
    from pipelines.controlnet.units import ControlUnit
    from pipelines.engine import Engine
    from pipelines.types import ModelRef
    from tests.pipelines.test_controlnet_engine import HINT
    from tests.pipelines.test_gen_fixtures import PIPE_FILES, Provider, png, request, world

    w = world()
    req = request()
    ref = ModelRef(name="cn", path=path, sha256=hashlib.sha256(str(path).encode()).hexdigest(), kind="controlnet")
    unit = ControlUnit(model="cn", module="none", image=png(HINT))  # parsed units hold the bytes
    sources = build_sources([unit], [ref], req, w.pipes[PIPE_FILES[kind]].unet.config,
                            lambda p, sha=None: load_controlnet(p), Annotators(annotators_dir), [])
    return Engine(Provider(w.pipes)).generate(req, w.models(kind), controls=sources).images[0]


@pytest.mark.parametrize(("kind", "base"), [("sd15", None), ("sdxl", "sdxl")])  # tiny SD1.5: no real context width
def test_a_diffusers_folder_imports_as_one_file_and_its_jobs_equal_the_folders(mstudio, import_root, tmp_path,
                                                                                kind, base):
    admin = admin_of(mstudio)
    folder = _folder(import_root, kind)
    done = wait_task(mstudio, mstudio.model_services.server.start(actor=admin, paths=str(folder), in_place=True).id)
    assert done.status.value == "succeeded", done.items_json
    record = mstudio.models.find(actor=admin, type="controlnet", ref=folder.name)
    assert (record.type, record.base, record.file_format) == (ModelType.CONTROLNET, base, "safetensors")
    assert record.local_path is None and record.store_key.endswith(f"{folder.name}.safetensors")  # packed, stored
    assert store_keys(mstudio) == [record.store_key]
    stored = tmp_path / "stored.safetensors"
    with mstudio.store.open(record.store_key) as handle:
        stored.write_bytes(handle.read())
    assert _job_image(kind, stored, tmp_path / "ann") == _job_image(kind, folder, tmp_path / "ann")

    again = wait_task(mstudio, mstudio.model_services.server.start(actor=admin, paths=str(folder)).id)
    assert [i["state"] for i in json.loads(again.items_json)] == ["known"]  # same folder, same packed bytes


def test_a_folder_with_a_broken_config_is_refused_naming_it_and_leaves_nothing(mstudio, import_root):
    admin = admin_of(mstudio)
    folder = _folder(import_root, "sd15", "broken")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 128]}))
    staging = list(mstudio.settings.data_dir.rglob("pack-*"))

    with pytest.raises(InvalidInput, match=r"broken/config\.json: the weights do not fill the ControlNet") as info:
        mstudio.models.register_file(actor=admin, path=folder)
    assert info.value.field == "file"
    done = wait_task(mstudio, mstudio.model_services.server.start(actor=admin, paths=str(folder)).id)
    (item,) = json.loads(done.items_json)
    assert item["state"] == "failed" and "tensors of the wrong shape" in item["message"]
    assert mstudio.models.list_models(actor=admin) == [] and store_keys(mstudio) == []
    assert list(mstudio.settings.data_dir.rglob("pack-*")) == staging  # no packed file left behind


def test_a_controlnet_folder_in_the_models_dir_is_one_model(build_studio, tmp_path):
    root = tmp_path / "webui" / "models"
    (root / "ControlNet" / "sdxl").mkdir(parents=True)
    folder = _folder(root / "ControlNet" / "sdxl", "sdxl", "canny")
    studio = build_studio(models_dir=root, import_roots=[])
    studio.models.rescan_models_dir()  # the first pass may have run at start
    admin = admin_of(studio)
    (record,) = studio.models.list_models(actor=admin)
    assert (record.name, record.type, record.base) == ("sdxl/canny", ModelType.CONTROLNET, "sdxl")
    assert record.local_path is None and studio.store.exists(record.store_key)
    assert studio.models.rescan_models_dir().unchanged == 1

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "global_pool_conditions": False}))
    summary = studio.models.rescan_models_dir()
    assert summary.updated == ["sdxl/canny"], summary.to_dict()
    (after,) = studio.models.list_models(actor=admin)
    assert after.id == record.id and after.sha256 != record.sha256


def test_a_single_file_whose_embedded_config_does_not_fit_is_refused(mstudio, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipelines.controlnet.folders import CONFIG_KEY, pack_folder
    from pipelines.safe_files import read_safetensors_header

    packed = pack_folder(_folder(tmp_path, "sd15"), tmp_path / "packed.safetensors")
    header = read_safetensors_header(packed)
    config = json.loads(header.metadata[CONFIG_KEY])
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(packed), forged, metadata={CONFIG_KEY: json.dumps({**config, "layers_per_block": 3})})
    with pytest.raises(InvalidInput, match=rf"forged\.safetensors \({CONFIG_KEY}\): the weights do not fill"):
        mstudio.models.register_file(actor=admin_of(mstudio), path=forged)
    assert mstudio.models.list_models(actor=admin_of(mstudio)) == [] and store_keys(mstudio) == []
