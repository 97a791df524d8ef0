"""ControlNet preprocessors (annotators) as sd-webui-controlnet runs them, through controlnet-aux.

``Preprocessors.run(module, image, processor_res=…, threshold_a=…, threshold_b=…)`` turns
a unit's image into its detected map, the way the extension does:

* the image is scaled so its short side is ``processor_res`` (the other side rounded),
  padded at the right/bottom edge to multiples of 64, detected, and cropped back — so
  the map is ``round(H·k) × round(W·k)`` with ``k = processor_res / min(H, W)``;
* ``none`` and ``invert`` ignore ``processor_res`` and keep the image's size;
* ``threshold_a``/``threshold_b`` keep the extension's meaning per module (canny
  low/high, mlsd value/distance, normal_midas background), -1 meaning its default.

Weights come from the model store's ``annotators/`` folder through the injected
``annotators`` source (a local folder, or a function that fetches one file and returns
its local path); nothing here downloads. Each network is loaded once per file and kept,
on the worker's device, until :meth:`Preprocessors.clear`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import preprocess_models as models
from pipelines import preprocess_names as names
from pipelines.errors import InvalidParameter, ModelNotFound
from pipelines.preprocess_names import (
    known_modules,
    needs_weights,
    normalize_module,
    weight_files,
)

log = logging.getLogger(__name__)

__all__ = ["Preprocessors", "known_modules", "needs_weights", "normalize_module", "weight_files"]

# Largest detected map: a 4096-px square (the highest processor_res allowed).
MAX_MAP_PIXELS = names.MAX_PROCESSOR_RES**2

# A folder holding the annotator files, or: file name → local path (raising ModelNotFound when absent).
AnnotatorSource = str | os.PathLike | Callable[[str], Path]


class Preprocessors:
    """Runs preprocessors by the extension's module names; loads and caches their networks."""

    def __init__(self, annotators: AnnotatorSource | None, *, device: str = "cpu"):
        self._source = annotators
        self.device = device
        self._lock = threading.Lock()
        # file name → ((path, size, mtime), network): one entry per file; a changed file replaces it.
        self._networks: dict[str, tuple[tuple, object]] = {}
        self.load_seconds: dict[str, float] = {}  # file name → time its last load took (for logs and benchmarks)

    known_modules = staticmethod(known_modules)
    normalize_module = staticmethod(normalize_module)
    needs_weights = staticmethod(needs_weights)
    weight_files = staticmethod(weight_files)

    def run(
        self,
        module: str,
        image: Image.Image,
        *,
        processor_res: float | None = -1,
        threshold_a: float | None = -1,
        threshold_b: float | None = -1,
        field: str = "module",
        seed: int | None = None,
    ) -> Image.Image:
        """The detected map of ``image`` (an RGB PIL image), as sd-webui-controlnet makes it.

        ``field`` names the unit's ``module`` field in errors (e.g.
        ``alwayson_scripts.controlnet.args[0].module``); bad ``processor_res``/thresholds are
        reported on its sibling fields. ``seed`` makes ``shuffle`` reproducible (the extension
        seeds it from the job's seed). Raises InvalidParameter (422) for an unknown module or a
        bad value, ModelNotFound (404) for a missing annotator file, ModelRejected (422) for an
        unusable one.
        """
        name = normalize_module(module, field)
        spec = names.SPECS[name]
        res = names.resolve_processor_res(processor_res, names.sibling_field(field, "processor_res"))
        a = names.resolve_threshold(threshold_a, spec.threshold_a, names.sibling_field(field, "threshold_a"))
        b = names.resolve_threshold(threshold_b, spec.threshold_b, names.sibling_field(field, "threshold_b"))
        pixels = _hwc3(image)
        if name == "none":
            return Image.fromarray(pixels)
        if name == "invert":
            return Image.fromarray(255 - pixels)
        h, w = pixels.shape[:2]
        if round(h * res / min(h, w)) * round(w * res / min(h, w)) > MAX_MAP_PIXELS:
            # A thin strip scaled to processor_res on its short side would be huge on the long one.
            raise InvalidParameter(
                f"{names.sibling_field(field, 'processor_res')}: a {w}x{h} image at processor_res {res} "
                f"would make a map over {MAX_MAP_PIXELS} pixels; lower processor_res or crop the image",
                field=names.sibling_field(field, "processor_res"),
            )
        nets = {file_name: self.network(file_name, field=field) for file_name in spec.files}
        padded, (height, width) = _resize_with_pad(pixels, res)
        if name == "shuffle":  # the extension shuffles the unpadded image
            detected = _shuffle(padded[:height, :width], np.random.default_rng(seed))
        else:
            detected = _detect(name, padded, nets, a, b)
        return Image.fromarray(_hwc3_array(detected)[:height, :width])

    def network(self, file_name: str, *, field: str = "module") -> object:
        """The loaded network of annotator file ``file_name``, loading it on first use."""
        path = self._locate(file_name, field)
        try:
            st = path.stat()
        except OSError as exc:
            raise ModelNotFound(f"annotator file '{file_name}' not found in annotators/ (looked at {path})", field=field) from exc
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:  # one load per file even when two jobs race for it
            cached = self._networks.get(file_name)
            if cached is not None and cached[0] == key:
                return cached[1]
            started = time.perf_counter()
            network = models.build(file_name, path, self.device)
            self.load_seconds[file_name] = time.perf_counter() - started
            log.info("loaded annotator %s from %s in %.2fs", file_name, path, self.load_seconds[file_name])
            self._networks[file_name] = (key, network)
            return network

    def loaded(self) -> list[str]:
        """Annotator files whose networks are in memory."""
        with self._lock:
            return sorted(self._networks)

    def clear(self) -> None:
        """Drop every loaded network (the caller frees device memory afterwards)."""
        with self._lock:
            self._networks.clear()

    def _locate(self, file_name: str, field: str) -> Path:
        if self._source is None:
            raise ModelNotFound(f"annotator file '{file_name}' needed but no annotators/ folder is configured", field=field)
        if callable(self._source):
            try:
                return Path(self._source(file_name))
            except ModelNotFound as exc:  # report it on the unit's field, where the user can act on it
                raise ModelNotFound(f"annotator file '{file_name}' is missing: {exc.message}", field=field) from exc
        folder = Path(self._source)
        path = folder / file_name
        # A converted copy beside or instead of the pickle: prefer it, it loads without unpickling.
        converted = path.with_suffix(".safetensors")
        if converted.is_file():
            return converted
        if not path.is_file():
            raise ModelNotFound(f"annotator file '{file_name}' not found in annotators/ ({folder})", field=field)
        return path


def _hwc3(image: Image.Image) -> np.ndarray:
    """uint8 H×W×3 pixels; transparency is laid over white, as the extension's HWC3 does."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode in ("LA", "PA") else "RGB")
    return _hwc3_array(np.asarray(image, dtype=np.uint8))


def _hwc3_array(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(x, 3, axis=2))
    if x.shape[2] == 4:
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        blended = x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return blended.clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _resize_with_pad(pixels: np.ndarray, res: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale so the short side is ``res``; pad right/bottom (edge pixels) to multiples of 64.

    Returns the padded image and the unpadded (height, width) to crop the result back to.
    """
    import cv2

    h, w = pixels.shape[:2]
    k = res / min(h, w)
    height, width = max(1, round(h * k)), max(1, round(w * k))
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = -height % 64, -width % 64
    return np.pad(resized, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"), (height, width)


def _detect(name: str, img: np.ndarray, nets: dict[str, object], a: float | None, b: float | None) -> np.ndarray:
    """Run the controlnet-aux detector for ``name`` on a padded image whose sides are multiples of 64.

    Detection and output resolution are the image's own short side, so controlnet-aux's
    resizing (to that side, rounded to 64) leaves the image as it is.
    """
    import torch

    side = min(img.shape[:2])
    size = {"detect_resolution": side, "image_resolution": side, "output_type": "np"}
    with models.quiet_import(), torch.inference_mode():
        if name == "canny":
            from controlnet_aux.canny import CannyDetector

            return CannyDetector()(img, low_threshold=a, high_threshold=b, **size)
        if name == "lineart_standard":
            from controlnet_aux.lineart_standard import LineartStandardDetector

            return LineartStandardDetector()(img, detect_resolution=side, output_type="np")
        if name.startswith("openpose"):
            from controlnet_aux.open_pose import OpenposeDetector

            body, hand, face = (nets.get(f) for f in names.OPENPOSE_FILES)
            detector = OpenposeDetector(body, hand, face)
            return detector(
                img,
                include_body=name != "openpose_faceonly",
                include_hand=hand is not None,
                include_face=face is not None,
                **size,
            )
        if name in ("softedge_hed", "softedge_hedsafe", "scribble_hed"):
            from controlnet_aux.hed import HEDdetector

            hed = HEDdetector(nets[names.HED_FILE])
            return hed(img, safe=name == "softedge_hedsafe", scribble=name == "scribble_hed", **size)
        if name in ("depth_midas", "normal_midas"):
            from controlnet_aux.midas import MidasDetector

            midas = MidasDetector(nets[names.MIDAS_FILE])
            if name == "depth_midas":
                return midas(img, **size)
            _depth, normal = midas(img, depth_and_normal=True, bg_th=a, **size)
            return normal
        if name == "mlsd":
            return _mlsd(img, nets[names.MLSD_FILE], a, b)
        if name in ("lineart_realistic", "lineart_coarse"):
            from controlnet_aux.lineart import LineartDetector

            file_name = names.LINEART_FILE if name == "lineart_realistic" else names.LINEART_COARSE_FILE
            return LineartDetector(nets[file_name], None)(img, coarse=False, **size)
        if name == "lineart_anime":
            from controlnet_aux.lineart_anime import LineartAnimeDetector

            return LineartAnimeDetector(nets[names.LINEART_ANIME_FILE])(img, **size)
        if name == "normal_bae":
            from controlnet_aux.normalbae import NormalBaeDetector

            return NormalBaeDetector(nets[names.NORMAL_BAE_FILE])(img, **size)
    raise AssertionError(f"no detector wired for preprocessor {name!r}")  # SPECS and this function disagree


def _mlsd(img: np.ndarray, model: object, thr_v: float, thr_d: float) -> np.ndarray:
    """White 1-px line segments on black. Called directly: MLSDdetector swallows every exception."""
    import cv2
    from controlnet_aux.mlsd.utils import pred_lines

    out = np.zeros(img.shape[:2], dtype=np.uint8)
    for x0, y0, x1, y1 in pred_lines(img, model, [img.shape[0], img.shape[1]], thr_v, thr_d):
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return out


def _shuffle(img: np.ndarray, rng: np.random.Generator, scale: int = 256) -> np.ndarray:
    """Content shuffle: warp the image along a smooth random flow field (the extension's ``shuffle``).

    Same algorithm as controlnet-aux's ContentShuffleDetector (noise on a coarse grid of
    ``scale`` px, bicubically enlarged, one field per axis), with a local generator instead
    of numpy's global one so a seed reproduces the map and nothing else is disturbed.
    """
    import cv2

    h, w = img.shape[:2]

    def smooth_field() -> np.ndarray:
        coarse = rng.uniform(0.0, 1.0, size=(h // scale + 2, w // scale + 2))
        big = cv2.resize(coarse, (w + 2 * scale, h + 2 * scale), interpolation=cv2.INTER_CUBIC)
        field = big[scale:scale + h, scale:scale + w]
        field = field - field.min()
        return field / max(field.max(), 1e-12)

    flow_x = (smooth_field() * (w - 1)).astype(np.float32)
    flow_y = (smooth_field() * (h - 1)).astype(np.float32)
    return cv2.remap(img, flow_x, flow_y, cv2.INTER_LINEAR)
