"""ControlNet imports: a pickled .pth is stored as safetensors holding only the ControlNet, and that stored
file loads through the ControlNet loader with the original weights."""

from __future__ import annotations

import torch

from tests.models.conftest import admin_of
from webapp.records import ModelType


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
