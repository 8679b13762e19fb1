"""LeReS depth (`depth_leres`, and `depth_leres++` with pix2pix boosting) built from controlnet-aux's networks.

controlnet-aux's `LeresDetector.from_pretrained` cannot be used in a server: it builds the pix2pix options with
`TestOptions().parse()`, which reads the process's command line (`sys.argv`: the server's own flags, pytest's),
and it unpickles the weights with plain `torch.load`. So the detector is assembled here from the same classes:
the options are the parser's defaults (`parse_args([])`, never argv), and both weight files are read through
`safe_files.load_pickle` (weights only; a file that would run code is refused unrun).

Weights, as lllyasviel/Annotators names them, from the annotators folder only: `res101.pth` (the LeReS depth
network, `{"depth_model": state}`) and, for boosting, `latest_net_G.pth` (the pix2pix merge network).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines import safe_files

DEPTH_WEIGHTS = "res101.pth"
BOOST_WEIGHTS = "latest_net_G.pth"


def _depth_model(path: Path) -> Any:
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

    checkpoint = safe_files.load_pickle(path)
    state = checkpoint.get("depth_model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise KeyError(f"{path.name} holds no 'depth_model' weights")
    model = RelDepthModel(backbone="resnext101")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()


def _merge_model(path: Path) -> Any:
    """The pix2pix network that merges LeReS estimates at two resolutions, in test mode on the CPU (controlnet-aux
    does not move it: its `to` leaves pix2pix where it is)."""
    from controlnet_aux.leres.pix2pix.models import get_option_setter
    from controlnet_aux.leres.pix2pix.models.pix2pix4depth_model import Pix2Pix4DepthModel
    from controlnet_aux.leres.pix2pix.options.test_options import TestOptions

    parser = TestOptions().initialize(argparse.ArgumentParser())
    parser = get_option_setter("pix2pix4depth")(parser, False)
    options = parser.parse_args([])  # defaults only: the process's command line is not the model's
    options.isTrain, options.gpu_ids = False, []
    model = Pix2Pix4DepthModel(options)
    model.netG.load_state_dict(safe_files.tensors_of(safe_files.load_pickle(path), source=path.name), strict=True)
    model.eval()
    return model


def load_leres(directory: Path, *, boost: bool) -> Any:
    """A controlnet-aux `LeresDetector` from the annotators folder; with `boost`, its pix2pix network too."""
    from controlnet_aux.leres import LeresDetector

    directory = Path(directory)
    merge = _merge_model(directory / BOOST_WEIGHTS) if boost else None
    return LeresDetector(_depth_model(directory / DEPTH_WEIGHTS), merge)
