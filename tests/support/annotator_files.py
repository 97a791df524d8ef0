"""Pytest plugin: random-weight annotator files of the real architectures, as the store's ``annotators/``.

Loaded by ``tests/conftest.py``. Each file holds a controlnet-aux network of the real
size and layout (OpenPose body/hand/face, HED, MiDaS dpt_hybrid, M-LSD, lineart,
lineart_anime, normal_bae), seeded random weights stored in fp16 (half the bytes of
the published fp32 files; the loader accepts both), with the published key layouts:
OpenPose body/hand keys without their first component, ``module.`` prefixes on
lineart_anime and normal_bae, normal_bae nested under ``"model"``.

That is ~0.8 GB and ~25 s of work, so the folder is generated once and kept under
``$SD_TEST_CACHE`` (default ``~/.cache/sd-endpoint-tests``), keyed by the controlnet-aux
version and :data:`LAYOUT_VERSION`; it is generated code output, never committed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Bump when the files written below change, so stale caches are not reused.
LAYOUT_VERSION = 1
_DONE = ".complete"


def _networks() -> dict:
    """Annotator file name → (builder of the package's network, how the published file lays it out)."""
    import functools
    import types

    from torch import nn

    from pipelines import preprocess_names as names
    from pipelines.preprocess_models import quiet_import

    with quiet_import():
        from controlnet_aux.hed import ControlNetHED_Apache2
        from controlnet_aux.lineart import Generator
        from controlnet_aux.lineart_anime import UnetGenerator
        from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
        from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
        from controlnet_aux.normalbae.nets.NNET import NNET
        from controlnet_aux.open_pose.face import FaceNet
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    bae_args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
    instance_norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return {
        names.OPENPOSE_FILES[0]: (bodypose_model, "drop_first"),
        names.OPENPOSE_FILES[1]: (handpose_model, "drop_first"),
        names.OPENPOSE_FILES[2]: (FaceNet, "plain"),
        names.HED_FILE: (ControlNetHED_Apache2, "plain"),
        names.MIDAS_FILE: (lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True), "plain"),
        names.MLSD_FILE: (MobileV2_MLSD_Large, "plain"),
        names.LINEART_FILE: (lambda: Generator(3, 1, 3), "plain"),
        names.LINEART_COARSE_FILE: (lambda: Generator(3, 1, 3), "plain"),
        names.LINEART_ANIME_FILE: (lambda: UnetGenerator(3, 1, 8, 64, norm_layer=instance_norm, use_dropout=False), "module"),
        names.NORMAL_BAE_FILE: (lambda: NNET(bae_args), "nested_module"),
    }


def write_annotator_files(folder: Path, *, seed: int = 0, dtype: str = "float16") -> dict[str, Path]:
    """Write every annotator file into ``folder`` (seeded, published layout); returns name → path.

    ``dtype="float32"`` writes them as published (benchmarks: a load then costs what a real one does).
    """
    import torch

    from pipelines.preprocess_models import quiet_import

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, (file_name, (make, layout)) in enumerate(sorted(_networks().items())):
        torch.manual_seed(seed * 1000 + index)
        with quiet_import():
            net = make()
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        if file_name.startswith("dpt_hybrid"):
            # Random weights end in a ReLU that zeroes the whole map (and the detector then divides
            # 0 by 0); a positive bias on the last conv keeps the depth map varied, as a real one is.
            state["scratch.output_conv.4.bias"].fill_(1.0)
        if layout == "drop_first":
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        elif layout == "module":
            state = {"module." + k: v for k, v in state.items()}
        elif layout == "nested_module":
            state = {"model": {"module." + k: v for k, v in state.items()}}
        path = folder / file_name
        torch.save(state, path)
        written[file_name] = path
    return written


def cached_annotators_dir(dtype: str = "float16") -> Path:
    """The shared, generated-once ``annotators/`` folder (created on first call, under a file lock
    so test processes started together generate it once)."""
    import fcntl

    base = Path(os.environ.get("SD_TEST_CACHE", Path.home() / ".cache" / "sd-endpoint-tests"))
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some CI runners): fall back to the temp folder
        base = Path(tempfile.gettempdir()) / "sd-endpoint-tests"
        base.mkdir(parents=True, exist_ok=True)
    suffix = "" if dtype == "float16" else f"-{dtype}"
    folder = base / f"annotators-cnaux{_package_version()}-v{LAYOUT_VERSION}{suffix}" / "annotators"
    if (folder / _DONE).is_file():
        return folder
    with open(base / ".annotators.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / _DONE).is_file():
            # Generate beside the target and rename: an interrupted run never leaves a half-written cache.
            shutil.rmtree(folder.parent, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=".annotators-", dir=base))
            try:
                write_annotator_files(staging / "annotators", dtype=dtype)
                (staging / "annotators" / _DONE).write_text("ok\n")
                staging.rename(folder.parent)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return folder


def _package_version() -> str:
    from importlib.metadata import version

    return version("controlnet-aux")


def link_annotators(source: Path, dest: Path) -> Path:
    """Symlink every annotator file of ``source`` into ``dest`` (a store's ``annotators/``); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not path.name.startswith("."):
            (dest / path.name).symlink_to(path)
    return dest


@pytest.fixture(scope="session")
def annotators_dir() -> Path:
    """Read-only folder of random-weight annotator files (every file :mod:`pipelines.preprocess` knows)."""
    return cached_annotators_dir()


@pytest.fixture(scope="session")
def annotator_store(tmp_path_factory, annotators_dir) -> Path:
    """A model store root whose ``annotators/`` links to the files above (other kinds empty)."""
    root = tmp_path_factory.mktemp("annotator-store")
    link_annotators(annotators_dir, root / "annotators")
    return root
