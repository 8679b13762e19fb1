"""The job's model-dependent input checks, one function called before any network or image is touched."""

from __future__ import annotations

import pytest

from pipelines.job import check_inputs
from pipelines.types import InvalidRequestError
from tests.pipelines.test_gen_fixtures import PIPE_FILES, request, world


def test_check_inputs_judges_the_request_against_the_loaded_models():
    w = world()
    sd15, sdxl, refiner = (w.pipes[PIPE_FILES[k]] for k in ("sd15", "sdxl", "sdxl_refiner"))
    warnings: list[str] = []
    with pytest.raises(InvalidRequestError, match="cannot start from text") as err:
        check_inputs(request(), w.models("sdxl_refiner"), refiner, None, warnings)
    assert err.value.field == "sd_model_checkpoint"
    check_inputs(request(mode="img2img", init_images=(b"png",)), w.models("sdxl_refiner"), refiner, None, warnings)
    with pytest.raises(InvalidRequestError, match="cannot refine this model") as err:
        check_inputs(request(refiner_switch_at=0.5), w.models("sd15", refiner=w.checkpoints["sdxl_refiner"]),
                     sd15, refiner, warnings)
    assert err.value.field == "refiner_checkpoint"
    check_inputs(request(refiner_switch_at=0.5), w.models("sdxl", refiner=w.checkpoints["sdxl_refiner"]),
                 sdxl, refiner, warnings)
    assert warnings == []
    check_inputs(request(clip_skip=2), w.models(), sd15, None, warnings)
    check_inputs(request(clip_skip=2), w.models("sdxl"), sdxl, None, warnings)
    assert warnings == ["clip skip 2 is not applied to SDXL models: like A1111 (option sdxl_clip_l_skip off), "
                        "their text encoders are read at the penultimate layer"]
