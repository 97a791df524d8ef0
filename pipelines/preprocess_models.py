"""Build controlnet-aux's annotator networks from local files, loading every pickle safely.

controlnet-aux's ``Detector.from_pretrained`` reaches for the Hugging Face Hub unless
given a folder, and unpickles with a bare ``torch.load`` (unsafe on the torch versions
our dependency range admits, and whenever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set).
So we read each file ourselves — ``weights_only=True`` for pickles, or ``.safetensors``
— and put the tensors into the package's own model classes.

One builder per annotator file name (the file decides the architecture). Files may be
fp32 as published or fp16; parameters are always fp32, which is what the detectors feed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipelines import preprocess_names as names
from pipelines.checkpoint import safe_torch_load
from pipelines.errors import ModelRejected

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_import():
    """controlnet-aux warns about mediapipe, timm renames and torch.jit on import, and prints while building."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an annotator file: nested ``state_dict``/``model`` unwrapped, ``module.`` stripped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ModelRejected(f"{path.name}: unreadable annotator file ({type(exc).__name__}: {exc})") from exc
    else:
        data = safe_torch_load(path, "annotator")
    # Training checkpoints wrap the weights: {"model": …, "optimizer": …} (MiDaS, BAE) or {"state_dict": …}.
    while isinstance(data, dict):
        inner = data.get("state_dict", data.get("model"))
        if not isinstance(inner, dict):
            break
        data = inner
    if not isinstance(data, dict):
        raise ModelRejected(f"{path.name}: holds a {type(data).__name__}, not annotator weights")
    # DataParallel training leaves "module." in front of every key (lineart_anime, normal_bae).
    return {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _fill(make: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], path: Path, what: str,
          rename: Callable[[list[str], dict], dict] | None = None) -> nn.Module:
    """Build ``make()`` holding ``tensors`` (fp32, eval, no grad); a file of another architecture → ModelRejected.

    The network is built on the meta device and the file's tensors put in place: random
    initialisation of a 100M-parameter network costs seconds on a CPU, for weights we overwrite.
    ``rename`` maps the file's key names onto the model's (given the model's keys).
    """
    try:
        with torch.device("meta"):
            model = make()
    except (RuntimeError, NotImplementedError):  # a constructor computing on tensors (.item()) needs real ones
        model = make()
    expected = list(model.state_dict())
    if rename is not None:
        tensors = rename(expected, tensors)
    expected_set = set(expected)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected_set]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing weights, e.g. {missing[0]!r}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
        raise ModelRejected(f"{path.name}: not a {what} annotator file ({'; '.join(detail)})")
    converted = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.load_state_dict(converted, strict=True, assign=True)
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            model = make()  # a buffer outside the state dict has no value on meta: build for real
            model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:  # shape mismatch: same names, other sizes
        raise ModelRejected(f"{path.name}: not a {what} annotator file ({str(exc).splitlines()[-1].strip()})") from exc
    return model.float().eval().requires_grad_(False)


def _drop_first_component(keys: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published OpenPose body/hand files name ``conv1_1.weight`` what the model calls ``model0.conv1_1.weight``.

    A file already saved with the model's own names is taken as is.
    """
    if all(k in tensors for k in keys):
        return tensors
    return {k: tensors[k.split(".", 1)[1]] for k in keys if k.split(".", 1)[1] in tensors}


def _body(path: Path) -> object:
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model

    net = _fill(bodypose_model, read_tensors(path), path, "OpenPose body", _drop_first_component)

    class _Body(Body):
        def __init__(self, model):  # the package's __init__ unpickles the file itself
            self.model = model

    return _Body(net)


def _hand(path: Path) -> object:
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import handpose_model

    net = _fill(handpose_model, read_tensors(path), path, "OpenPose hand", _drop_first_component)

    class _Hand(Hand):
        def __init__(self, model):
            self.model = model

    return _Hand(net)


def _face(path: Path) -> object:
    from controlnet_aux.open_pose import face as face_module

    net = _fill(face_module.FaceNet, read_tensors(path), path, "OpenPose face")

    class _Face(face_module.Face):
        def __init__(self, model):  # same defaults as the package's constructor, without its torch.load
            self.inference_size = face_module.params["inference_img_size"]
            self.sigma = face_module.params["gaussian_sigma"]
            self.threshold = face_module.params["heatmap_peak_thresh"]
            self.model = model

    return _Face(net)


def _hed(path: Path) -> nn.Module:
    from controlnet_aux.hed import ControlNetHED_Apache2

    return _fill(ControlNetHED_Apache2, read_tensors(path), path, "HED")


def _midas(path: Path) -> nn.Module:
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    # dpt_hybrid: ViT-B/16 on a ResNet-50 stem; path=None so the package does not load (or fetch) anything.
    def make():
        return DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)

    return _fill(make, read_tensors(path), path, "MiDaS (dpt_hybrid)")


def _mlsd(path: Path) -> nn.Module:
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    return _fill(MobileV2_MLSD_Large, read_tensors(path), path, "M-LSD (large)")


def _lineart(path: Path) -> nn.Module:
    from controlnet_aux.lineart import Generator

    return _fill(lambda: Generator(3, 1, 3), read_tensors(path), path, "lineart")


def _lineart_anime(path: Path) -> nn.Module:
    from controlnet_aux.lineart_anime import UnetGenerator

    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return _fill(lambda: UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False), read_tensors(path), path, "lineart_anime")


def _normal_bae(path: Path) -> nn.Module:
    from controlnet_aux.normalbae.nets.NNET import NNET

    # The settings controlnet-aux uses for the ScanNet-trained BAE model ("client" mode: inference only).
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
    return _fill(lambda: NNET(args), read_tensors(path), path, "normal_bae (ScanNet)")


# Canonical annotator file name → builder of the network it holds.
BUILDERS: dict[str, Callable[[Path], object]] = {
    names.OPENPOSE_FILES[0]: _body,
    names.OPENPOSE_FILES[1]: _hand,
    names.OPENPOSE_FILES[2]: _face,
    names.HED_FILE: _hed,
    names.MIDAS_FILE: _midas,
    names.MLSD_FILE: _mlsd,
    names.LINEART_FILE: _lineart,
    names.LINEART_COARSE_FILE: _lineart,
    names.LINEART_ANIME_FILE: _lineart_anime,
    names.NORMAL_BAE_FILE: _normal_bae,
}


def build(file_name: str, path: Path, device: str) -> object:
    """The network in annotator file ``file_name`` (read from ``path``), on ``device``.

    Returns an ``nn.Module``, or for OpenPose controlnet-aux's Body/Hand/Face wrapper.
    """
    with quiet_import():
        built = BUILDERS[file_name](path)
    return built.to(device)
