"""LoRA / LoCon, textual inversion, hypernetworks and VAE through the Engine: effect, weights, exact restore."""

from __future__ import annotations

import re

import pytest
import torch

from pipelines.engine import Engine
from pipelines.errors import UnsafeModelError
from pipelines.networks.hypernetwork import read_hypernetwork
from pipelines.networks.textual_inversion import read_embedding
from pipelines.types import ModelRef
from tests.pipelines.test_gen_fixtures import (
    PIPE_FILES,
    Provider,
    diff,
    engine,
    fresh_pipeline,
    request,
    world,
)


@pytest.fixture(scope="module")
def eng() -> Engine:
    return engine()


@pytest.fixture(scope="module")
def fresh() -> Engine:
    """An engine on pristine pipelines that no network ever touched: the reference for exact restores."""
    w = world()
    pipes = {PIPE_FILES[k]: fresh_pipeline(k) for k in ("sd15", "sdxl")}
    return Engine(Provider({**w.pipes, **pipes}))


def _base(eng: Engine, kind: str = "sd15", **kw) -> bytes:
    return eng.generate(request(**kw), world().models(kind)).images[0]


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under their original names (peft's ``base_layer`` wrapping removed, adapters dropped)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


# -- LoRA -----------------------------------------------------------------------------------------------

def test_lora_changes_the_image_and_weight_zero_equals_base(eng, fresh):
    base = _base(fresh)
    with_lora = eng.generate(request(prompt="a photo of a cat <lora:style:1>"), world().models())
    zero = eng.generate(request(prompt="a photo of a cat <lora:style:0>"), world().models())
    assert diff(with_lora.images[0], base) > 0.5
    assert diff(zero.images[0], base) == 0
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', with_lora.infotexts[0])
    assert with_lora.infotexts[0].startswith("a photo of a cat <lora:style:1>\n")


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_lora_strength_matches_the_weights_merged_by_hand(eng, weight):
    """The engine's ``<lora:style:w>`` against the kohya definition W += w * alpha/rank * up @ down."""
    from tests.tiny.networks import merged_copy

    w = world()
    merged = merged_copy(fresh_pipeline("sd15"), w.loras["style"].path, weight)
    reference = Engine(Provider({**w.pipes, PIPE_FILES["sd15"]: merged})).generate(request(), w.models())
    applied = eng.generate(request(prompt=f"a photo of a cat <lora:style:{weight}>"), w.models())
    assert diff(applied.images[0], _base(eng)) > 0.5, "the LoRA has an effect"
    assert diff(applied.images[0], reference.images[0]) < 0.5, "and exactly the effect of its merged weights"


def test_after_a_lora_job_the_pipeline_is_bit_identical_to_a_fresh_one(eng, fresh):
    eng.generate(request(prompt="a cat <lora:style:0.8> <lora:locon:1>"), world().models())
    after = _base(eng)
    assert diff(after, _base(fresh)) == 0
    pipe = world().pipes[PIPE_FILES["sd15"]]
    pristine = fresh.provider.pipes[PIPE_FILES["sd15"]]
    for name in ("unet", "text_encoder"):
        used, ref = _base_weights(getattr(pipe, name)), _base_weights(getattr(pristine, name))
        assert used.keys() == ref.keys()
        assert all(torch.equal(used[k], ref[k]) for k in ref), f"{name} base weights changed"


def test_weights_two_loras_and_separate_te_unet(eng):
    w = world()
    outs = {p: eng.generate(request(prompt=f"a cat {p}"), w.models()).images[0] for p in (
        "<lora:style:1>", "<lora:style:0.5>", "<lora:detail:1>", "<lora:style:1> <lora:detail:1>",
        "<lora:style:1:0>", "<lora:style:0:1>", "<lora:style:te=1:unet=0>")}
    assert diff(outs["<lora:style:1>"], outs["<lora:style:0.5>"]) > 0
    assert diff(outs["<lora:style:1> <lora:detail:1>"], outs["<lora:style:1>"]) > 0
    assert diff(outs["<lora:style:1> <lora:detail:1>"], outs["<lora:detail:1>"]) > 0
    assert diff(outs["<lora:style:1:0>"], outs["<lora:style:0:1>"]) > 0
    assert diff(outs["<lora:style:1:0>"], outs["<lora:style:te=1:unet=0>"]) == 0


def test_switching_weights_and_loras_never_reloads(eng):
    w = world()
    eng.generate(request(prompt="a cat <lora:style:1>"), w.models())
    loads, gets = eng.loras.loads, eng.provider.gets
    for weight in (0.3, 0.6, 1.0):
        eng.generate(request(prompt=f"a cat <lora:style:{weight}>"), w.models())
    assert eng.loras.loads == loads
    assert eng.provider.gets == gets + 3  # one cache lookup per job, no reload


def test_locon_and_sdxl_lora(eng, fresh):
    w = world()
    assert diff(eng.generate(request(prompt="a cat <lora:locon:1>"), w.models()).images[0], _base(fresh)) > 0
    xl = eng.generate(request(prompt="a cat <lora:xlstyle:1>"), w.models("sdxl"))
    assert diff(xl.images[0], _base(fresh, "sdxl")) > 0.5
    assert diff(_base(eng, "sdxl"), _base(fresh, "sdxl")) == 0


def test_unusable_loras_are_reported_not_ignored(eng, fresh):
    w = world()
    res = eng.generate(request(prompt="a cat <lora:xlstyle:1> <lora:loha:1> <lora:missing:1> <lyco:gone:1>"),
                       w.models())
    assert res.warnings[0] == "Networks not found: missing, gone"
    assert any("'xlstyle' is for SDXL" in m for m in res.warnings)
    assert any("LoHa" in m and "not supported" in m for m in res.warnings)
    assert diff(res.images[0], _base(fresh, prompt="a cat")) == 0
    assert "Lora hashes" not in res.infotexts[0]


# -- textual inversion ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind"), [("tipt", "sd15"), ("tisafe", "sd15"), ("tixl", "sdxl")])
def test_textual_inversion_changes_the_image_and_leaves_nothing_behind(eng, fresh, name, kind):
    w = world()
    pipe = w.pipes[PIPE_FILES[kind]]
    vocab = len(pipe.tokenizer)
    table = pipe.text_encoder.get_input_embeddings().weight.clone()
    with_ti = eng.generate(request(prompt=f"a photo of {name}"), w.models(kind))
    without = eng.generate(request(prompt=f"a photo of {name}"), w.models(kind, embeddings={}))
    assert diff(with_ti.images[0], without.images[0]) > 0.5
    assert re.search(rf'TI hashes: "{name}: [0-9a-f]{{12}}"', with_ti.infotexts[0])
    assert len(pipe.tokenizer) == vocab and torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    assert diff(_base(eng, kind), _base(fresh, kind)) == 0


def test_textual_inversion_in_the_negative_prompt(eng):
    w = world()
    a = eng.generate(request(negative_prompt="tipt"), w.models())
    b = eng.generate(request(negative_prompt="tipt"), w.models(embeddings={}))
    assert diff(a.images[0], b.images[0]) > 0 and "TI hashes" in a.infotexts[0]


def test_textual_inversion_formats_and_fit(tmp_path):
    w = world()
    pt = read_embedding(w.embeddings["tipt"])
    assert pt.vectors["clip_l"].shape == (2, 32)
    xl = read_embedding(w.embeddings["tixl"])
    assert xl.vectors["clip_l"].shape == (2, 32) and xl.vectors["clip_g"].shape == (2, 64)
    res = engine().generate(request(prompt="a tixl cat"), w.models("sd15"))
    assert any("'tixl' is for SDXL" in m for m in res.warnings)
    res = engine().generate(request(prompt="a tipt cat"), w.models("sdxl"))
    assert any("'tipt' is for SD1.x" in m for m in res.warnings)


# -- hypernetworks ------------------------------------------------------------------------------------------

def test_hypernetwork_multiplier_and_restore(eng, fresh):
    w = world()
    base = _base(fresh)
    one = eng.generate(request(prompt="a photo of a cat <hypernet:hyper:1>"), w.models())
    half = eng.generate(request(prompt="a photo of a cat <hypernet:hyper:0.5>"), w.models())
    zero = eng.generate(request(prompt="a photo of a cat <hypernet:hyper:0>"), w.models())
    assert diff(one.images[0], base) > 0.5 and diff(one.images[0], half.images[0]) > 0
    assert diff(zero.images[0], base) == 0
    assert diff(_base(eng), base) == 0
    unet = w.pipes[PIPE_FILES["sd15"]].unet
    assert all(not m._forward_pre_hooks for m in unet.modules())
    with_lora = eng.generate(request(prompt="a photo of a cat <hypernet:hyper:1> <lora:style:1>"), w.models())
    assert diff(with_lora.images[0], one.images[0]) > 0


def test_hypernetwork_file_loads_with_weights_only_and_rejects_code(tmp_path):
    w = world()
    net = read_hypernetwork(w.hypernetworks["hyper"])
    assert net.layers and all(len(pair) == 2 for pair in net.layers.values())
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Boom()}, evil)
    ref = ModelRef("evil", evil, "0" * 64, "hypernetwork")
    with pytest.raises(UnsafeModelError):
        read_hypernetwork(ref)
    res = engine().generate(request(prompt="a cat <hypernet:evil:1>"),
                            w.models(hypernetworks={"evil": ref}))
    assert any("'evil' could not be loaded" in m for m in res.warnings)


# -- VAE -----------------------------------------------------------------------------------------------------

def test_vae_swap_changes_the_image_and_restores(eng, fresh):
    w = world()
    base = _base(fresh)
    other = eng.generate(request(), w.models(vae=w.vaes["othervae"]))
    assert diff(other.images[0], base) > 0.5
    assert other.vae_name == "othervae" and f"VAE hash: {w.vaes['othervae'].short_hash}, VAE: othervae" in other.infotexts[0]
    assert diff(_base(eng), base) == 0
    automatic = eng.generate(request(), w.models(vae="Automatic", companion_vae=w.vaes["othervae"]))
    assert diff(automatic.images[0], other.images[0]) == 0
    none = eng.generate(request(), w.models(vae="None", companion_vae=w.vaes["othervae"]))
    assert diff(none.images[0], base) == 0 and "VAE" not in none.infotexts[0]
    loads = eng.vaes.loads
    eng.generate(request(), w.models(vae=w.vaes["othervae"]))
    assert eng.vaes.loads == loads  # cached
