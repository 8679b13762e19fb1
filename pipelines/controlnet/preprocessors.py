"""ControlNet preprocessors ("annotators"): turn an input image into the control map a ControlNet expects.

Module names, UI aliases, slider ranges and control types follow sd-webui-controlnet
(https://github.com/Mikubill/sd-webui-controlnet, `scripts/global_state.py` and `scripts/processor.py`), so
A1111 clients keep sending the names they know and `/controlnet/module_list` answers in its shape.

The networks come from controlnet-aux. Their weights are read only from the annotators folder an admin fills
(file names as in https://huggingface.co/lllyasviel/Annotators): `Annotators` checks every file a detector
needs is there *before* calling controlnet-aux, whose `from_pretrained` then takes the local-directory branch
and never reaches the hub. Preprocessors without weights (canny, xdog, shuffle, tile, inpaint, ...) always work.

LeReS (`depth_leres`, `depth_leres++`) is assembled in pipelines.controlnet.leres instead: controlnet-aux's own
loader reads the process's command line.

Left out on purpose: `reference_only` and friends (no map: their effect is attention hooks in the engine; add
them when the engine does), `depth_anything`, `dw_openpose_full`, `mediapipe_face`, segmentation and TEED (not
in controlnet-aux 0.0.10, or they need packages we do not ship).
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipelines.controlnet.leres import BOOST_WEIGHTS, DEPTH_WEIGHTS, load_leres
from pipelines.controlnet.poses import pose_json
from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

ANNOTATORS_SOURCE = "https://huggingface.co/lllyasviel/Annotators"


# -- errors ---------------------------------------------------------------------------------------------------

class UnknownPreprocessor(PipelineError):
    """The module name is neither a preprocessor nor one of its aliases."""

    def __init__(self, value: str) -> None:
        super().__init__(f"unknown ControlNet preprocessor {value!r}; see /controlnet/module_list for the names")
        self.value = value


class PreprocessorInputError(PipelineError):
    """The request cannot be preprocessed as given (a mask missing or of the wrong size)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class MissingAnnotator(FileNotFoundError):
    """A weight file the preprocessor needs is not in the annotators folder (an admin must add it)."""

    def __init__(self, module: str, files: Sequence[str], annotators_dir: Path) -> None:
        names = ", ".join(files)
        super().__init__(f"preprocessor {module!r} needs {names} in {annotators_dir}; download "
                         f"{'it' if len(files) == 1 else 'them'} from {ANNOTATORS_SOURCE} and put "
                         f"{'it' if len(files) == 1 else 'them'} there")
        self.module, self.files, self.annotators_dir = module, list(files), annotators_dir


class BrokenAnnotator(RuntimeError):
    """A weight file is there but does not load (truncated, another network's, or a pickle that runs code)."""


# -- records --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slider:
    label: str
    minimum: float
    maximum: float
    default: float
    step: float | None = None

    def detail(self) -> dict[str, Any]:
        """The extension's `module_detail` slider shape."""
        out: dict[str, Any] = {"name": self.label, "value": self.default, "min": self.minimum, "max": self.maximum}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class WeightFile:
    filename: str
    what: str


@dataclass(frozen=True)
class _Detector:
    files: tuple[WeightFile, ...]
    aux_class: str
    """controlnet-aux's class; its `from_pretrained(<existing directory>)` reads the files from there."""
    loader: Callable[[Path], Any] | None = None
    """Builds the detector from the directory instead, where controlnet-aux's `from_pretrained` cannot be used."""

    def load(self, directory: Path) -> Any:
        if self.loader is not None:
            return self.loader(directory)
        import controlnet_aux  # heavy (torch, timm): only when a detector with weights is first used

        return getattr(controlnet_aux, self.aux_class).from_pretrained(str(directory))


@dataclass
class _Call:
    """What a run function sees: the RGB input, the resolved slider values and the detector."""

    image: np.ndarray
    res: int
    a: float
    b: float
    mask: np.ndarray | None
    detector: Callable[[], Any]
    pose: dict[str, Any] | None = None
    """Set by the openpose run functions."""


@dataclass(frozen=True)
class Preprocessor:
    name: str
    """The extension's module key (`module_list?alias_names=false`), e.g. ``hed``."""
    label: str
    """The name its UI shows (`alias_names=true`), e.g. ``softedge_hed``."""
    control_type: str
    run: Callable[[_Call], np.ndarray]
    resolution: Slider | None = None
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    detector: str | None = None
    requires_mask: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def needs(self) -> tuple[WeightFile, ...]:
        return _DETECTORS[self.detector].files if self.detector else ()

    @property
    def sliders(self) -> list[dict[str, Any] | None]:
        """processor_res, threshold_a, threshold_b; trailing absent ones dropped, inner ones None."""
        sliders = [self.resolution, self.threshold_a, self.threshold_b]
        while sliders and sliders[-1] is None:
            sliders.pop()
        return [s.detail() if s else None for s in sliders]


@dataclass(frozen=True)
class PreprocessResult:
    image: Image.Image
    """The detected map (RGB; RGBA with the mask as alpha for the inpaint preprocessors)."""
    pose: dict[str, Any] | None = None
    """OpenPose JSON of this image for the openpose modules (`/controlnet/detect` returns one per image)."""
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    warnings: list[str] = field(default_factory=list)
    """Values that were reset to defaults, or a mask that was ignored."""


# -- image helpers --------------------------------------------------------------------------------------------

def _rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8; transparent pixels become white, as the extension's HWC3 does."""
    if image.mode == "RGB":
        return np.asarray(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        return (rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _three(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x[:, :, :3]


def _at_resolution(call: _Call, produce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Resize so the short side is `res`, pad (edge) to multiples of 64 for the networks, crop the map back.

    The map keeps the input's aspect ratio exactly, as the extension's `resize_image_with_pad` does."""
    height, width = call.image.shape[:2]
    k = call.res / min(height, width)
    h, w = max(1, round(height * k)), max(1, round(width * k))
    resized = cv2.resize(call.image, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(resized, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return _three(np.ascontiguousarray(produce(padded))[:h, :w])


def _aux_call(padded: np.ndarray, detector: Any, **kwargs: Any) -> np.ndarray:
    """Run a controlnet-aux detector at the padded size (its own resize then changes nothing)."""
    side = min(padded.shape[:2])
    return detector(padded, detect_resolution=side, image_resolution=side, output_type="np", **kwargs)


def _scribble(edges: np.ndarray) -> np.ndarray:
    """Thin, blurred, binarised edges: the extension's scribble from soft edges (via controlnet-aux's nms)."""
    from controlnet_aux.util import nms

    result = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(result > 4, 255, 0).astype(np.uint8)


# -- run functions: _Call -> map (H x W x 3, or x 4 for inpaint) ---------------------------------------------

def _inpaint(call: _Call) -> np.ndarray:
    assert call.mask is not None  # requires_mask is checked before
    return np.dstack([call.image, call.mask])


def _canny(call: _Call) -> np.ndarray:
    return _at_resolution(call, lambda img: cv2.Canny(img, int(call.a), int(call.b)))


def _xdog(call: _Call) -> np.ndarray:
    def xdog(img: np.ndarray) -> np.ndarray:
        fine = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
        coarse = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
        dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255)
        return np.where(2 * (255 - dog) > call.a, 255, 0).astype(np.uint8)

    return _at_resolution(call, xdog)


def _tile_resample(call: _Call) -> np.ndarray:
    if call.a < 1.1:
        return call.image
    height, width = call.image.shape[:2]
    size = (max(1, int(width / call.a)), max(1, int(height / call.a)))
    return cv2.resize(call.image, size, interpolation=cv2.INTER_AREA)


def _shuffle(call: _Call) -> np.ndarray:
    from controlnet_aux.shuffle import ContentShuffleDetector

    return _at_resolution(call, lambda img: _aux_call(img, ContentShuffleDetector()))


def _lineart_standard(call: _Call) -> np.ndarray:
    from controlnet_aux.lineart_standard import LineartStandardDetector

    detector = LineartStandardDetector()
    return _at_resolution(call, lambda img: detector(img, detect_resolution=min(img.shape[:2]), output_type="np"))


def _detected(scribble: bool = False, sliders: Callable[[_Call], dict[str, float]] | None = None,
              **fixed: Any) -> Callable[[_Call], np.ndarray]:
    """A run function calling the module's controlnet-aux detector with fixed and slider keyword arguments."""

    def run(call: _Call) -> np.ndarray:
        kwargs = {**fixed, **(sliders(call) if sliders else {})}
        edges = _at_resolution(call, lambda img: _aux_call(img, call.detector(), **kwargs))
        return _scribble(edges) if scribble else edges

    return run


def _normal_midas(call: _Call) -> np.ndarray:
    return _at_resolution(call, lambda img: _aux_call(img, call.detector(), depth_and_normal=True, bg_th=call.a)[1])


def _openpose(body: bool, hand: bool, face: bool) -> Callable[[_Call], np.ndarray]:
    """Draws the poses controlnet-aux finds and keeps them, as OpenPose JSON, in `call.pose`."""

    def run(call: _Call) -> np.ndarray:
        from controlnet_aux.open_pose import draw_poses

        found: list[Any] = []

        def detect(img: np.ndarray) -> np.ndarray:
            found.extend(call.detector().detect_poses(img, include_hand=hand, include_face=face))
            return draw_poses(found, *img.shape[:2], draw_body=body, draw_hand=hand, draw_face=face)

        image = _at_resolution(call, detect)
        height, width = image.shape[:2]
        call.pose = pose_json(found, width + -width % 64, height + -height % 64, canvas=(width, height))
        return image

    return run


# -- the registry ---------------------------------------------------------------------------------------------

_DETECTORS: dict[str, _Detector] = {
    "hed": _Detector((WeightFile("ControlNetHED.pth", "HED soft-edge network"),), "HEDdetector"),
    "pidinet": _Detector((WeightFile("table5_pidinet.pth", "PiDiNet soft-edge network"),), "PidiNetDetector"),
    "mlsd": _Detector((WeightFile("mlsd_large_512_fp32.pth", "M-LSD line-segment network"),), "MLSDdetector"),
    "midas": _Detector((WeightFile("dpt_hybrid-midas-501f0c75.pt", "MiDaS DPT-Hybrid depth network"),),
                       "MidasDetector"),
    "zoe": _Detector((WeightFile("ZoeD_M12_N.pt", "ZoeDepth depth network"),), "ZoeDetector"),
    "leres": _Detector((WeightFile(DEPTH_WEIGHTS, "LeReS depth network"),), "LeresDetector",
                       partial(load_leres, boost=False)),
    "leres_boost": _Detector((WeightFile(DEPTH_WEIGHTS, "LeReS depth network"),
                              WeightFile(BOOST_WEIGHTS, "LeReS++ pix2pix boosting network")), "LeresDetector",
                             partial(load_leres, boost=True)),
    "normalbae": _Detector((WeightFile("scannet.pt", "NormalBae normal-map network"),), "NormalBaeDetector"),
    "openpose": _Detector((WeightFile("body_pose_model.pth", "OpenPose body network"),
                           WeightFile("hand_pose_model.pth", "OpenPose hand network"),
                           WeightFile("facenet.pth", "OpenPose face network")), "OpenposeDetector"),
    "lineart": _Detector((WeightFile("sk_model.pth", "lineart (realistic) network"),
                          WeightFile("sk_model2.pth", "lineart (coarse) network")), "LineartDetector"),
    "lineart_anime": _Detector((WeightFile("netG.pth", "anime lineart network"),), "LineartAnimeDetector"),
}

RESOLUTION = Slider("Preprocessor Resolution", 64, 2048, 512)


def _p(name: str, label: str, control_type: str, run: Callable[[_Call], np.ndarray], **kwargs: Any) -> Preprocessor:
    kwargs.setdefault("resolution", RESOLUTION)
    return Preprocessor(name=name, label=label, control_type=control_type, run=run, **kwargs)


_INVERT_LABEL = "invert (from white bg & black line)"
_REMOVE_NEAR = Slider("Remove Near %", 0, 100, 0, 0.1)
_REMOVE_BACKGROUND = Slider("Remove Background %", 0, 100, 0, 0.1)


def _leres_sliders(call: _Call) -> dict[str, float]:
    return {"thr_a": call.a, "thr_b": call.b}


_LINEART_STANDARD_LABEL = "lineart_standard (from white bg & black line)"

PREPROCESSORS: tuple[Preprocessor, ...] = (
    _p("none", "none", "All", lambda call: call.image, resolution=None),
    _p("invert", _INVERT_LABEL, "All", lambda call: 255 - call.image, resolution=None),
    _p("canny", "canny", "Canny", _canny, threshold_a=Slider("Canny Low Threshold", 1, 255, 100),
       threshold_b=Slider("Canny High Threshold", 1, 255, 200)),
    _p("depth", "depth_midas", "Depth", _detected(), detector="midas"),
    _p("depth_zoe", "depth_zoe", "Depth", _detected(), detector="zoe"),
    _p("depth_leres", "depth_leres", "Depth", _detected(sliders=_leres_sliders, boost=False), detector="leres",
       threshold_a=_REMOVE_NEAR, threshold_b=_REMOVE_BACKGROUND),
    _p("depth_leres++", "depth_leres++", "Depth", _detected(sliders=_leres_sliders, boost=True),
       detector="leres_boost", threshold_a=_REMOVE_NEAR, threshold_b=_REMOVE_BACKGROUND),
    _p("normal_map", "normal_midas", "NormalMap", _normal_midas, detector="midas",
       threshold_a=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, 0.01)),
    _p("normal_bae", "normal_bae", "NormalMap", _detected(), detector="normalbae"),
    _p("openpose", "openpose", "OpenPose", _openpose(True, False, False), detector="openpose"),
    _p("openpose_face", "openpose_face", "OpenPose", _openpose(True, False, True), detector="openpose"),
    _p("openpose_faceonly", "openpose_faceonly", "OpenPose", _openpose(False, False, True), detector="openpose"),
    _p("openpose_hand", "openpose_hand", "OpenPose", _openpose(True, True, False), detector="openpose"),
    _p("openpose_full", "openpose_full", "OpenPose", _openpose(True, True, True), detector="openpose"),
    _p("mlsd", "mlsd", "MLSD", _detected(sliders=lambda call: {"thr_v": call.a, "thr_d": call.b}), detector="mlsd",
       threshold_a=Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
       threshold_b=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)),
    _p("lineart_standard", _LINEART_STANDARD_LABEL, "Lineart", _lineart_standard),
    _p("lineart", "lineart_realistic", "Lineart", _detected(coarse=False), detector="lineart"),
    _p("lineart_coarse", "lineart_coarse", "Lineart", _detected(coarse=True), detector="lineart"),
    _p("lineart_anime", "lineart_anime", "Lineart", _detected(), detector="lineart_anime"),
    _p("hed", "softedge_hed", "SoftEdge", _detected(), detector="hed"),
    _p("hed_safe", "softedge_hedsafe", "SoftEdge", _detected(safe=True), detector="hed"),
    _p("pidinet", "softedge_pidinet", "SoftEdge", _detected(), detector="pidinet"),
    _p("pidinet_safe", "softedge_pidisafe", "SoftEdge", _detected(safe=True), detector="pidinet"),
    _p("scribble_hed", "scribble_hed", "Scribble/Sketch", _detected(scribble=True), detector="hed",
       aliases=("fake_scribble",)),
    _p("pidinet_scribble", "scribble_pidinet", "Scribble/Sketch", _detected(scribble=True), detector="pidinet"),
    _p("scribble_xdog", "scribble_xdog", "Scribble/Sketch", _xdog, threshold_a=Slider("XDoG Threshold", 1, 64, 32)),
    _p("shuffle", "shuffle", "Shuffle", _shuffle),
    _p("tile_resample", "tile_resample", "Tile/Blur", _tile_resample, resolution=None,
       threshold_a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
    # the mask rides as alpha (255 = repaint), as the extension passes it; the engine builds the condition
    _p("inpaint", "inpaint_global_harmonious", "Inpaint", _inpaint, resolution=None, requires_mask=True),
    _p("inpaint_only", "inpaint_only", "Inpaint", _inpaint, resolution=None, requires_mask=True),
)

# Control type -> (default preprocessor label, extra lower-case words that select its models), in the
# extension's order; "All" lists everything.
CONTROL_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "All": ("none", ()),
    "Canny": ("canny", ()),
    "Depth": ("depth_midas", ()),
    "NormalMap": ("normal_bae", ("normal",)),
    "OpenPose": ("openpose_full", ("openpose", "densepose")),
    "MLSD": ("mlsd", ()),
    "Lineart": (_LINEART_STANDARD_LABEL, ()),
    "SoftEdge": ("softedge_pidinet", ()),
    "Scribble/Sketch": ("scribble_pidinet", ("scribble", "sketch")),
    "Shuffle": ("shuffle", ()),
    "Tile/Blur": ("tile_resample", ("tile", "blur")),
    "Inpaint": ("inpaint_only", ()),
    "InstructP2P": ("none", ("ip2p",)),
}
_INVERT_TYPES = ("Canny", "Lineart", "Scribble/Sketch", "MLSD")

_BY_NAME: dict[str, Preprocessor] = {}
for _pre in PREPROCESSORS:
    for _key in (_pre.name, _pre.label, *_pre.aliases):
        _BY_NAME.setdefault(_key.lower(), _pre)


def resolve(name: str) -> Preprocessor:
    """A preprocessor by module key, UI label or alias, case-insensitively."""
    found = _BY_NAME.get(str(name).strip().lower())
    if found is None:
        raise UnknownPreprocessor(name)
    return found


def list_modules(alias_names: bool = False) -> list[str]:
    return [p.label if alias_names else p.name for p in PREPROCESSORS]


def module_detail(alias_names: bool = False) -> dict[str, dict[str, Any]]:
    """Per module: `model_free` (no ControlNet model needed; none here) and its sliders, as the extension."""
    return {(p.label if alias_names else p.name): {"model_free": False, "sliders": p.sliders}
            for p in PREPROCESSORS}


def control_types(models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The extension's control-type table for these ControlNet model names ("name [hash]"); "None" is added
    first. A type's models are those whose name contains the type (or one of its words); its default model
    prefers a v1.1 one ("11" in the name), as the extension does."""
    all_models = ["None", *[m for m in models if m != "None"]]
    out: dict[str, dict[str, Any]] = {}
    for control_type, (default_option, words) in CONTROL_TYPES.items():
        if control_type == "All":
            out[control_type] = _type_entry(list_modules(True), all_models, default_option, "None")
            continue
        modules = ["none", *sorted(p.label for p in PREPROCESSORS if p.control_type == control_type)]
        if control_type in _INVERT_TYPES:
            modules.append(_INVERT_LABEL)
        patterns = (control_type.lower(), *words)
        matched = [m for m in all_models if m == "None" or any(w in m.lower() for w in patterns)]
        if default_option not in modules:
            default_option = modules[0]
        if len(matched) == 1:
            out[control_type] = _type_entry(modules, all_models, default_option, "None")
            continue
        default_model = next((m for m in matched[1:] if "11" in m.split("[")[0]), matched[1])
        out[control_type] = _type_entry(modules, matched, default_option, default_model)
    return out


def _type_entry(modules: list[str], models: list[str], default_option: str, default_model: str) -> dict[str, Any]:
    return {"module_list": modules, "model_list": models, "default_option": default_option,
            "default_model": default_model}


# -- running --------------------------------------------------------------------------------------------------

def _value(name: str, slider: Slider | None, given: float, module: str, warnings: list[str]) -> float | None:
    """The extension's bound check: -1 (or any negative) means the default; out-of-range values are reset."""
    if slider is None:
        return None
    if given < 0:
        return slider.default
    if not slider.minimum <= given <= slider.maximum:
        warnings.append(f"{name} {given:g} is outside {slider.minimum:g}..{slider.maximum:g} for {module}; "
                        f"used {slider.default:g}")
        return slider.default
    return given


class Annotators:
    """The annotators folder and the detectors loaded from it for one device, each loaded once and kept.

    The engine (or a worker) owns one; nothing here is global."""

    def __init__(self, annotators_dir: Path, device: str = "cpu") -> None:
        self.annotators_dir = Path(annotators_dir)
        self.device = device
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def missing(self, name: str) -> list[WeightFile]:
        """The weight files `name` needs that the folder lacks (empty: it can run)."""
        return [f for f in resolve(name).needs if not (self.annotators_dir / f.filename).is_file()]

    def detector(self, name: str) -> Any:
        pre = resolve(name)
        if pre.detector is None:
            raise ValueError(f"preprocessor {pre.label!r} uses no detector")
        with self._lock:
            if pre.detector not in self._loaded:
                self._loaded[pre.detector] = self._load(pre)
            return self._loaded[pre.detector]

    def _load(self, pre: Preprocessor) -> Any:
        missing = self.missing(pre.name)
        if missing:  # checked first, so controlnet-aux only ever sees an existing directory: no hub
            raise MissingAnnotator(pre.label, [f.filename for f in missing], self.annotators_dir)
        files = ", ".join(f.filename for f in pre.needs)
        log.info("loading ControlNet annotator %s (%s) on %s", pre.detector, files, self.device)
        try:
            loaded = _DETECTORS[pre.detector].load(self.annotators_dir)  # type: ignore[index]
        except (RuntimeError, pickle.UnpicklingError, KeyError, EOFError, ValueError) as exc:
            raise BrokenAnnotator(f"{files} in {self.annotators_dir} does not load as the {pre.label} "
                                  f"annotator ({exc}); replace it with the file from {ANNOTATORS_SOURCE}") from exc
        return loaded.to(self.device)

    def unload(self) -> None:
        with self._lock:
            self._loaded.clear()

    def run(self, name: str, image: Image.Image, *, processor_res: float = -1, threshold_a: float = -1,
            threshold_b: float = -1, mask: Image.Image | None = None) -> PreprocessResult:
        """The control map of `image` made by preprocessor `name` (key, label or alias)."""
        pre = resolve(name)
        warnings: list[str] = []
        res = _value("processor_res", pre.resolution, processor_res, pre.label, warnings)
        a = _value("threshold_a", pre.threshold_a, threshold_a, pre.label, warnings)
        b = _value("threshold_b", pre.threshold_b, threshold_b, pre.label, warnings)
        mask_array = None
        if pre.requires_mask:
            if mask is None:
                raise PreprocessorInputError(f"preprocessor {pre.label!r} needs a mask", field="mask")
            if mask.size != image.size:
                raise PreprocessorInputError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                             f"{image.size[0]}x{image.size[1]}", field="mask")
            mask_array = np.asarray(mask.convert("L"))
        elif mask is not None:
            warnings.append(f"{pre.label} does not use a mask; it was ignored")
        detector = self.detector(pre.name) if pre.detector else None  # a missing file fails before any work
        call = _Call(image=_rgb(image), res=int(res or RESOLUTION.default), a=a or 0.0, b=b or 0.0,
                     mask=mask_array, detector=lambda: detector)
        made = pre.run(call)
        return PreprocessResult(image=Image.fromarray(np.ascontiguousarray(made)), pose=call.pose,
                                processor_res=int(res) if res is not None else None, threshold_a=a,
                                threshold_b=b, warnings=warnings)


def run(name: str, image: Image.Image, *, annotators_dir: Path, device: str = "cpu", processor_res: float = -1,
        threshold_a: float = -1, threshold_b: float = -1, mask: Image.Image | None = None) -> PreprocessResult:
    """One-off `Annotators(annotators_dir, device).run(...)`; keep an `Annotators` to reuse loaded detectors."""
    return Annotators(annotators_dir, device).run(name, image, processor_res=processor_res,
                                                  threshold_a=threshold_a, threshold_b=threshold_b, mask=mask)
