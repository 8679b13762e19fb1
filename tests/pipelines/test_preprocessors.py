"""ControlNet preprocessors: weight-free maps, weights only from the annotators folder, names, sliders, types."""

from __future__ import annotations

import socket
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.controlnet import preprocessors as pp
from pipelines.controlnet.poses import pose_json
from pipelines.errors import PipelineError

WEIGHT_FREE = [p.name for p in pp.PREPROCESSORS if not p.needs]
WITH_WEIGHTS = [p.name for p in pp.PREPROCESSORS if p.needs]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt, or a controlnet-aux hub download, fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import importlib

    for name in ("hed", "pidi", "mlsd", "midas", "zoe", "normalbae", "open_pose", "lineart", "lineart_anime",
                 "leres"):
        monkeypatch.setattr(importlib.import_module(f"controlnet_aux.{name}"), "hf_hub_download", refuse)


def squares(width: int = 96, height: int = 64) -> Image.Image:
    """White, a black square (strong edges) and a light grey one (weak edges)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 16, 33, 47], fill="black")
    draw.rectangle([56, 16, 79, 47], fill=(200, 200, 200))
    return img


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")).astype(int)


@pytest.fixture
def annotators(tmp_path) -> pp.Annotators:
    return pp.Annotators(tmp_path / "annotators")


# -- weight-free maps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_every_weight_free_module_makes_a_map_from_an_empty_folder(annotators, name):
    pre = pp.resolve(name)
    mask = Image.new("L", (96, 64), 0) if pre.requires_mask else None
    result = annotators.run(name, squares(), processor_res=128, mask=mask)
    if pre.resolution is None:
        assert result.image.size == (96, 64) and result.processor_res is None
    else:  # short side becomes processor_res, aspect kept exactly
        assert result.image.size == (192, 128) and result.processor_res == 128
    assert result.image.mode == ("RGBA" if pre.requires_mask else "RGB")
    assert result.warnings == []


def test_canny_edges_lie_on_the_squares_borders_and_thresholds_decide_the_weak_ones(annotators):
    default = pixels(annotators.run("canny", squares(), processor_res=64).image)
    assert default.shape == (64, 96)
    # the black square's border is found; its inside and the white background are not edges
    assert default[16:48, 9:12].max() == 255 and default[16:48, 32:35].max() == 255
    assert default[22:42, 16:28].max() == 0 and default[:, 40:50].max() == 0
    # the grey square's step (55) passes 100/200 but not a high threshold of 250
    assert default[16:48, 55:58].max() == 255
    strict = pixels(annotators.run("canny", squares(), processor_res=64, threshold_a=240, threshold_b=250).image)
    assert strict[20:44, 55:58].max() == 0 and strict[20:44, 9:12].max() == 255  # corners aside


def test_out_of_range_values_are_reset_to_the_default_with_a_warning(annotators):
    default = annotators.run("canny", squares(), processor_res=64)
    wild = annotators.run("canny", squares(), processor_res=64, threshold_a=999, threshold_b=0.5)
    assert (wild.threshold_a, wild.threshold_b) == (100, 200)
    assert np.array_equal(pixels(wild.image), pixels(default.image))
    assert len(wild.warnings) == 2 and "threshold_a 999 is outside 1..255 for canny; used 100" in wild.warnings[0]
    too_big = annotators.run("canny", squares(), processor_res=5000)
    assert too_big.processor_res == 512 and too_big.image.size == (768, 512) and "processor_res" in too_big.warnings[0]


def test_invert_and_none(annotators):
    src = squares()
    assert np.array_equal(np.asarray(annotators.run("invert", src).image), 255 - np.asarray(src))
    assert np.array_equal(np.asarray(annotators.run("none", src).image), np.asarray(src))


def test_scribble_xdog_marks_dark_lines_and_its_threshold_thins_them(annotators):
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).line([(8, 20), (56, 20)], fill="black", width=3)
    ImageDraw.Draw(img).line([(8, 44), (56, 44)], fill=(235, 235, 235), width=3)  # faint
    loose = pixels(annotators.run("scribble_xdog", img, processor_res=64, threshold_a=4).image)
    strict = pixels(annotators.run("scribble_xdog", img, processor_res=64, threshold_a=64).image)
    assert loose[19:22, 16:48].min() == 255 and loose[43:46, 16:48].min() == 255 and loose[:10].max() == 0
    assert strict[19:22, 16:48].min() == 255 and strict[36:].max() == 0


def test_lineart_standard_makes_dark_lines_bright_on_black(annotators):
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).line([(8, 32), (56, 32)], fill="black", width=3)
    out = pixels(annotators.run("lineart_standard", img, processor_res=64).image)
    assert out[31:34, 16:48].min() > 100 and out[:10].max() < 10


def test_shuffle_moves_content_but_keeps_its_colours(annotators):
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    ImageDraw.Draw(img).rectangle([0, 0, 31, 63], fill=(0, 0, 255))
    out = np.asarray(annotators.run("shuffle", img, processor_res=64).image).astype(int)
    assert out.shape == (64, 64, 3) and not np.array_equal(out, np.asarray(img))
    assert out[:, :, 1].max() < 5  # only red/blue mixtures: green never appears
    assert (out[:, :, 0] > 200).sum() > 50 and (out[:, :, 2] > 200).sum() > 50


def test_tile_resample_downsamples_by_its_rate(annotators):
    assert annotators.run("tile_resample", squares(), threshold_a=2).image.size == (48, 32)
    assert annotators.run("tile_resample", squares()).image.size == (96, 64)
    reset = annotators.run("tile_resample", squares(), threshold_a=9)
    assert reset.image.size == (96, 64) and "Down" not in reset.warnings[0] and "threshold_a 9" in reset.warnings[0]


def test_inpaint_needs_a_mask_of_the_image_size_and_carries_it_as_alpha(annotators):
    with pytest.raises(pp.PreprocessorInputError, match="needs a mask") as err:
        annotators.run("inpaint_only", squares())
    assert err.value.field == "mask" and isinstance(err.value, PipelineError)
    with pytest.raises(pp.PreprocessorInputError, match="mask is 10x10 but the image is 96x64"):
        annotators.run("inpaint_only", squares(), mask=Image.new("L", (10, 10)))
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 47, 63], fill=255)
    out = np.asarray(annotators.run("inpaint_global_harmonious", squares(), mask=mask).image)
    assert np.array_equal(out[:, :, 3], np.asarray(mask)) and np.array_equal(out[:, :, :3], np.asarray(squares()))


def test_a_mask_given_to_a_module_without_one_is_ignored_with_a_warning(annotators):
    result = annotators.run("canny", squares(), mask=Image.new("L", (96, 64)))
    assert result.image.mode == "RGB" and "does not use a mask" in result.warnings[0]


# -- weights: only from the annotators folder -----------------------------------------------------------------

@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_a_module_whose_weights_are_missing_names_the_file_and_the_folder(annotators, name):
    pre = pp.resolve(name)
    with pytest.raises(pp.MissingAnnotator) as err:
        annotators.run(name, squares())
    message = str(err.value)
    assert all(f.filename in message for f in pre.needs) and str(annotators.annotators_dir) in message
    assert pre.label in message and "lllyasviel/Annotators" in message
    assert isinstance(err.value, FileNotFoundError)
    assert annotators.missing(name) == list(pre.needs)


def write_pidinet(path: Path, *, zero: bool) -> None:
    """A PiDiNet state dict as table5_pidinet.pth ships it ({"state_dict": {"module.<key>": tensor}})."""
    import torch
    from controlnet_aux.pidi.model import pidinet

    state = pidinet().state_dict()
    if zero:
        state = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


def test_pidinet_loads_from_the_folder_without_the_hub_and_is_loaded_once(annotators):
    annotators.annotators_dir.mkdir()
    write_pidinet(annotators.annotators_dir / "table5_pidinet.pth", zero=True)
    result = annotators.run("softedge_pidinet", squares(), processor_res=64)
    # all-zero weights make every logit 0 -> sigmoid 0.5 everywhere: the map comes from our file's weights
    values = pixels(result.image)
    assert result.image.size == (96, 64) and values.min() == values.max() == 127
    assert annotators.missing("pidinet") == []
    detector = annotators.detector("pidinet")
    assert annotators.detector("scribble_pidinet") is detector  # shared, loaded once
    scribble = pixels(annotators.run("scribble_pidinet", squares(), processor_res=64).image)
    assert set(np.unique(scribble)) <= {0, 255}


def zero_weights(model) -> dict:
    """`model`'s state dict as zeros that take no room: each tensor a stride-0 view of one element, which
    torch.save stores as that one element (ResNeXt-101 LeReS would be 460 MB of real zeros)."""
    import torch

    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def write_leres(directory: Path, *, boost: bool) -> None:
    """res101.pth ({"depth_model": state} with "module." prefixes, as shipped) and, for boost, latest_net_G.pth."""
    import torch
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

    directory.mkdir(exist_ok=True)
    state = zero_weights(RelDepthModel(backbone="resnext101"))
    torch.save({"depth_model": {f"module.{k}": v for k, v in state.items()}}, directory / "res101.pth")
    if boost:
        from controlnet_aux.leres.pix2pix.models.networks import define_G

        torch.save(zero_weights(define_G(2, 1, 64, "unet_1024", "none", False, "normal", 0.02, [])),
                   directory / "latest_net_G.pth")


def test_leres_loads_from_the_folder_without_reading_the_command_line(annotators, monkeypatch):
    import sys

    # controlnet-aux's own loader parses sys.argv: this one would make it fail (gpu_ids must be numbers)
    monkeypatch.setattr(sys, "argv", ["studio", "--gpu_ids", "not-a-number", "--name", "elsewhere"])
    write_leres(annotators.annotators_dir, boost=True)
    assert (annotators.annotators_dir / "res101.pth").stat().st_size < 10_000_000
    result = annotators.run("depth_leres", squares(), processor_res=64, threshold_a=0, threshold_b=0)
    # zero weights give a flat depth, which the extension's normalisation turns into 0, inverted: all white
    values = pixels(result.image)
    assert result.image.size == (96, 64) and values.min() == values.max() == 255
    assert annotators.missing("depth_leres++") == []
    boosted = annotators.detector("depth_leres++")
    assert boosted.pix2pixmodel is not None and annotators.detector("depth_leres").pix2pixmodel is None
    assert not any(t.abs().sum() for t in boosted.pix2pixmodel.netG.state_dict().values())  # our file's weights


def test_leres_without_its_depth_network_names_the_file(annotators):
    annotators.annotators_dir.mkdir()
    (annotators.annotators_dir / "latest_net_G.pth").write_bytes(b"")
    with pytest.raises(pp.MissingAnnotator, match=r"res101\.pth") as err:
        annotators.run("depth_leres++", squares())
    assert "latest_net_G.pth" not in str(err.value)  # present: only the missing file is named


def test_a_weight_file_that_does_not_load_is_named(annotators):
    annotators.annotators_dir.mkdir()
    (annotators.annotators_dir / "table5_pidinet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(pp.BrokenAnnotator, match="table5_pidinet.pth in .* does not load as the softedge_pidinet"):
        annotators.run("pidinet", squares())


class _Touch:
    """Unpickling this would create a file: a stand-in for a weight file that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_weight_file_that_would_run_code_is_refused_unrun(annotators):
    import torch

    annotators.annotators_dir.mkdir()
    marker = annotators.annotators_dir / "ran"
    torch.save({"state_dict": {"x": _Touch(marker)}}, annotators.annotators_dir / "table5_pidinet.pth")
    with pytest.raises(pp.BrokenAnnotator, match="table5_pidinet.pth"):
        annotators.run("pidinet", squares())
    assert not marker.exists()


def test_module_level_run_uses_the_given_folder(tmp_path):
    with pytest.raises(pp.MissingAnnotator, match=str(tmp_path)):
        pp.run("mlsd", squares(), annotators_dir=tmp_path)
    assert pp.run("canny", squares(), annotators_dir=tmp_path, processor_res=64).image.size == (96, 64)


# -- names, details, control types ----------------------------------------------------------------------------

def test_resolve_accepts_keys_labels_and_aliases_case_insensitively():
    assert pp.resolve("hed") is pp.resolve("SoftEdge_HED") is pp.resolve(" softedge_hed ")
    assert pp.resolve("depth").label == "depth_midas" and pp.resolve("depth_midas").name == "depth"
    assert pp.resolve("fake_scribble").name == "scribble_hed"
    assert pp.resolve("invert (from white bg & black line)").name == "invert"
    with pytest.raises(pp.UnknownPreprocessor, match="'nonsense'") as err:
        pp.resolve("nonsense")
    assert isinstance(err.value, PipelineError) and err.value.value == "nonsense"


def test_module_list_and_detail_in_the_extension_shape():
    keys, labels = pp.list_modules(False), pp.list_modules(True)
    assert keys[:2] == ["none", "invert"] and labels[:2] == ["none", "invert (from white bg & black line)"]
    assert "softedge_hed" in labels and "hed" in keys and "softedge_hed" not in keys
    assert len(set(keys)) == len(keys) == len(labels) == len(set(labels))
    for alias_names, names in ((False, keys), (True, labels)):
        detail = pp.module_detail(alias_names)
        assert list(detail) == names and all(set(d) == {"model_free", "sliders"} for d in detail.values())
    detail = pp.module_detail()
    assert detail["canny"]["sliders"] == [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]
    assert detail["tile_resample"]["sliders"] == [
        None, {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}]
    assert detail["none"]["sliders"] == [] and detail["mlsd"]["sliders"][2]["max"] == 20.0


def test_control_types_filter_modules_and_pick_default_models():
    models = ["control_sd15_canny [aaaa1111]", "control_v11p_sd15_canny [bbbb2222]",
              "control_v11f1p_sd15_depth [cccc3333]", "control_v11p_sd15_scribble [dddd4444]"]
    types = pp.control_types(models)
    assert set(types) >= {"All", "Canny", "Depth", "OpenPose", "Lineart", "SoftEdge", "MLSD", "NormalMap",
                          "Scribble/Sketch", "Shuffle", "Tile/Blur", "Inpaint"}
    for entry in types.values():
        assert set(entry) == {"module_list", "model_list", "default_option", "default_model"}
        assert entry["module_list"][0] == "none" and entry["default_option"] in entry["module_list"]
        assert entry["model_list"][0] == "None" and entry["default_model"] in entry["model_list"]
    canny = types["Canny"]
    assert canny["module_list"] == ["none", "canny", "invert (from white bg & black line)"]
    assert canny["model_list"] == ["None", *models[:2]] and canny["default_model"] == models[1]
    assert types["Depth"]["default_option"] == "depth_midas" and types["Depth"]["default_model"] == models[2]
    assert types["Scribble/Sketch"]["default_model"] == models[3]
    assert "scribble_xdog" in types["Scribble/Sketch"]["module_list"]
    # no model of the type: every model is offered and none is chosen, as the extension does
    assert types["OpenPose"]["model_list"] == ["None", *models] and types["OpenPose"]["default_model"] == "None"
    assert types["OpenPose"]["default_option"] == "openpose_full"
    assert types["All"]["module_list"] == pp.list_modules(True)


def test_pose_json_is_openpose_pixels_with_missing_points_zeroed():
    point = namedtuple("Keypoint", "x y")
    pose = namedtuple("Pose", "body left_hand right_hand face")
    body = namedtuple("Body", "keypoints")([point(0.5, 0.25), None])
    out = pose_json([pose(body, None, [point(-1, -1), point(0.1, 0.2)], None)], 128, 64, canvas=(100, 64))
    assert out == {"canvas_width": 100, "canvas_height": 64, "people": [{
        "pose_keypoints_2d": [64.0, 16.0, 1.0, 0.0, 0.0, 0.0], "face_keypoints_2d": None,
        "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": [0.0, 0.0, 0.0, 12.8, 12.8, 1.0]}]}
