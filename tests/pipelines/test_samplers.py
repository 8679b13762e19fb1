"""A1111 sampler / schedule names: every listed sampler runs, names resolve like A1111, bad ones are named."""

from __future__ import annotations

import pytest

from pipelines import samplers
from pipelines.types import InvalidRequestError
from tests.pipelines.test_gen_fixtures import PIPE_FILES, diff, engine, request, world

ALL = [s.name for s in samplers.SAMPLERS]


@pytest.fixture(scope="module")
def sd_engine():
    return engine()


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ALL)
def test_every_sampler_runs_and_reproduces(sd_engine, name, model):
    w = world()
    first = sd_engine.generate(request(sampler_name=name, steps=3), w.models(model))
    again = sd_engine.generate(request(sampler_name=name, steps=3), w.models(model))
    assert diff(first.images[0], again.images[0]) == 0.0, f"{name} is not reproducible"
    assert first.sampler_name == name
    assert f"Sampler: {name}," in first.infotexts[0]


def test_samplers_build_the_mapped_scheduler_classes():
    config = dict(world().pipes[PIPE_FILES["sd15"]].scheduler.config)
    expected = {"Euler a": "EulerAncestralDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler",
                "DPM++ SDE": "DPMSolverSDEScheduler", "PLMS": "PNDMScheduler", "LCM": "LCMScheduler",
                "DPM2 a": "KDPM2AncestralDiscreteScheduler", "UniPC": "UniPCMultistepScheduler"}
    for name, cls in expected.items():
        sched = samplers.build_scheduler(samplers.resolve(name), config, seeds=[1])
        assert type(sched).__name__ == cls
    karras = samplers.build_scheduler(samplers.resolve("DPM++ 2M", "Karras"), config)
    assert karras.config.use_karras_sigmas is True
    sde3 = samplers.build_scheduler(samplers.resolve("DPM++ 3M SDE"), config)
    assert sde3.config.algorithm_type == "sde-dpmsolver++" and sde3.config.solver_order == 3
    assert sde3.config.use_exponential_sigmas is True  # its A1111 default schedule
    sgm = samplers.build_scheduler(samplers.resolve("Euler", "SGM Uniform"), config)
    assert sgm.config.timestep_spacing == "trailing"


def test_schedule_changes_the_image(sd_engine):
    w = world()
    auto = sd_engine.generate(request(sampler_name="Euler", scheduler="Automatic", steps=4), w.models())
    karras = sd_engine.generate(request(sampler_name="Euler", scheduler="Karras", steps=4), w.models())
    assert diff(auto.images[0], karras.images[0]) > 0
    assert "Schedule type: Karras" in karras.infotexts[0]


@pytest.mark.parametrize(("name", "scheduler", "sampler", "label"), [
    ("DPM++ 2M Karras", None, "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Exponential", "Automatic", "DPM++ 2M SDE", "Exponential"),
    ("DPM2 a Karras", None, "DPM2 a", "Karras"),
    ("k_dpmpp_2m", None, "DPM++ 2M", "Karras"),
    ("k_euler_a", None, "Euler a", "Automatic"),
    ("euler A", "karras", None, None),  # Euler a has no Karras sigmas in diffusers: named error below
    ("DPM++ 2M", "sgm_uniform", "DPM++ 2M", "SGM Uniform"),
    ("DPM++ 2M", "SGMUniform", "DPM++ 2M", "SGM Uniform"),
])
def test_names_aliases_and_legacy_combined_names(name, scheduler, sampler, label):
    if sampler is None:
        with pytest.raises(InvalidRequestError, match="not available for sampler 'Euler a'") as err:
            samplers.resolve(name, scheduler)
        assert err.value.field == "scheduler"
        return
    resolved = samplers.resolve(name, scheduler)
    assert (resolved.name, resolved.schedule_label) == (sampler, label)


@pytest.mark.parametrize("name", ["DPM fast", "k_dpm_ad", "Restart", "DDIM CFG++", "DPM++ 2M SDE Heun"])
def test_samplers_without_diffusers_equivalent_are_rejected(name):
    with pytest.raises(InvalidRequestError, match="no diffusers equivalent") as err:
        samplers.resolve(name)
    assert err.value.field == "sampler_name"


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(InvalidRequestError) as err:
        request(sampler_name="Eulerish").validate()
    assert "Eulerish" in str(err.value) and "DPM++ 2M" in str(err.value) and "UniPC" in str(err.value)
    assert err.value.field == "sampler_name"
    with pytest.raises(InvalidRequestError, match="Align Your Steps"):
        samplers.resolve("Euler", "align_your_steps")
    with pytest.raises(InvalidRequestError, match="not found") as err:
        samplers.resolve("Euler", "wobbly")
    assert err.value.field == "scheduler"


def test_a1111_list_shapes():
    items = samplers.list_samplers()
    assert [i["name"] for i in items] == ALL
    dpm = next(i for i in items if i["name"] == "DPM++ 2M")
    assert dpm == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert all(isinstance(v, str) for i in items for v in i["options"].values())
    schedules = samplers.list_schedulers()
    karras = next(s for s in schedules if s["name"] == "karras")
    assert karras == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                      "need_inner_model": False}
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} == set(schedules[0])


def test_static_schedule_table_matches_diffusers_signatures():
    import inspect

    import diffusers

    relevant = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "timestep_spacing"}
    for spec in samplers.SAMPLERS:
        params = set(inspect.signature(getattr(diffusers, spec.scheduler_class).__init__).parameters)
        assert samplers.SCHEDULE_ARGS[spec.scheduler_class] == params & relevant, spec.scheduler_class


def test_validating_a_request_does_not_import_the_model_stack():
    import subprocess
    import sys

    code = ("import sys; from pipelines.types import GenerationRequest; "
            "GenerationRequest(sampler_name='DPM++ 2M Karras', steps=5).validate(); "
            "print('diffusers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
