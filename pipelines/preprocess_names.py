"""ControlNet preprocessor (annotator) names as sd-webui-controlnet's API takes them.

Pure Python on purpose: the HTTP process imports this to refuse an unknown
``module`` with a 422 before a job is queued, and to tell the model cache which
annotator files a unit will need. The torch side lives in :mod:`pipelines.preprocess`.

Canonical names are the extension's UI labels (``depth_midas``, ``softedge_hed``,
``lineart_realistic``); its older internal names (``depth``, ``hed``, ``lineart``),
its long labels (``invert (from white bg & black line)``) and ControlNet 1.0 names
(``fake_scribble``) are accepted as aliases. Matching ignores case and surrounding blanks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.errors import InvalidParameter

# A1111's default "Preprocessor Resolution" slider value; -1 in the API means "use it".
DEFAULT_PROCESSOR_RES = 512
# The extension's slider goes to 2048; pixel-perfect mode can ask for more on large
# canvases, so allow headroom but refuse sizes that would only exhaust memory.
MIN_PROCESSOR_RES = 64
MAX_PROCESSOR_RES = 4096

# Annotator file names, as the extension and controlnet-aux name them (the store's annotators/ folder).
OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
HED_FILE = "ControlNetHED.pth"
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"
MLSD_FILE = "mlsd_large_512_fp32.pth"
LINEART_FILE = "sk_model.pth"
LINEART_COARSE_FILE = "sk_model2.pth"
LINEART_ANIME_FILE = "netG.pth"
NORMAL_BAE_FILE = "scannet.pt"


@dataclass(frozen=True)
class ModuleSpec:
    """One preprocessor: which detector family runs it, which files it needs, its slider defaults.

    ``family`` groups modules that share one loaded detector (every ``openpose*`` module
    shares the OpenPose networks); ``""`` means no weights. ``threshold_a``/``threshold_b``
    are the defaults a -1 stands for, None when the module has no such slider.
    """

    name: str
    family: str
    files: tuple[str, ...] = ()
    threshold_a: float | None = None
    threshold_b: float | None = None
    uses_resolution: bool = True


_SPECS = (
    ModuleSpec("none", "", uses_resolution=False),
    ModuleSpec("invert", "", uses_resolution=False),
    ModuleSpec("canny", "", threshold_a=100, threshold_b=200),
    ModuleSpec("shuffle", ""),
    ModuleSpec("lineart_standard", ""),
    ModuleSpec("openpose", "openpose", OPENPOSE_FILES[:1]),
    ModuleSpec("openpose_hand", "openpose", OPENPOSE_FILES[:2]),
    ModuleSpec("openpose_face", "openpose", OPENPOSE_FILES[:1] + OPENPOSE_FILES[2:]),
    ModuleSpec("openpose_faceonly", "openpose", OPENPOSE_FILES[:1] + OPENPOSE_FILES[2:]),
    ModuleSpec("openpose_full", "openpose", OPENPOSE_FILES),
    ModuleSpec("depth_midas", "midas", (MIDAS_FILE,)),
    ModuleSpec("normal_midas", "midas", (MIDAS_FILE,), threshold_a=0.4),
    ModuleSpec("softedge_hed", "hed", (HED_FILE,)),
    ModuleSpec("softedge_hedsafe", "hed", (HED_FILE,)),
    ModuleSpec("scribble_hed", "hed", (HED_FILE,)),
    ModuleSpec("mlsd", "mlsd", (MLSD_FILE,), threshold_a=0.1, threshold_b=0.1),
    ModuleSpec("lineart_realistic", "lineart", (LINEART_FILE,)),
    ModuleSpec("lineart_coarse", "lineart_coarse", (LINEART_COARSE_FILE,)),
    ModuleSpec("lineart_anime", "lineart_anime", (LINEART_ANIME_FILE,)),
    ModuleSpec("normal_bae", "normal_bae", (NORMAL_BAE_FILE,)),
)
SPECS: dict[str, ModuleSpec] = {spec.name: spec for spec in _SPECS}

# Other spellings the extension (or ControlNet 1.0 before it) accepts for the same preprocessors.
ALIASES: dict[str, str] = {
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "depth": "depth_midas",
    "normal_map": "normal_midas",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "fake_scribble": "scribble_hed",
    "lineart": "lineart_realistic",
}

# sd-webui-controlnet preprocessors this server does not run: named in the error so a
# user can tell "not provided here" from a typo.
NOT_PROVIDED = frozenset({
    "animal_openpose", "blur_gaussian", "clip_vision", "color", "densepose", "densepose_parula",
    "depth_anything", "depth_anything_v2", "depth_hand_refiner", "depth_leres", "depth_leres++", "depth_zoe",
    "dw_openpose_full", "inpaint", "inpaint_global_harmonious", "inpaint_only", "inpaint_only+lama",
    "instant_id_face_embedding", "instant_id_face_keypoints", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl",
    "ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter_face_id", "ip-adapter_face_id_plus",
    "lineart_anime_denoise", "mediapipe_face", "mobile_sam", "oneformer_ade20k", "oneformer_coco",
    "pidinet", "pidinet_safe", "pidinet_scribble", "pidinet_sketch", "recolor_intensity", "recolor_luminance",
    "reference_adain", "reference_adain+attn", "reference_only", "revision_clipvision", "revision_ignore_prompt",
    "scribble_pidinet", "scribble_xdog", "seg_anime_face", "seg_ofade20k", "seg_ofcoco", "seg_ufade20k",
    "segmentation", "softedge_pidinet", "softedge_pidisafe", "softedge_teed", "t2ia_color_grid",
    "t2ia_sketch_pidi", "t2ia_style_clipvision", "te_hed", "threshold", "tile_colorfix",
    "tile_colorfix+sharp", "tile_resample", "normal_dsine",
})


def known_modules() -> list[str]:
    """The canonical preprocessor names this server runs, in a stable order."""
    return list(SPECS)


def normalize_module(name: object, field: str = "module") -> str:
    """The canonical name for a unit's ``module`` value, or InvalidParameter (422) naming ``field``.

    ``None`` and ``""`` mean ``none`` (the extension's default). The error lists the known names.
    """
    if name is None:
        return "none"
    if not isinstance(name, str):
        raise InvalidParameter(f"{field}: must be a preprocessor name, not {type(name).__name__}", field=field)
    key = name.strip().lower()
    if not key:
        return "none"
    key = ALIASES.get(key, key)
    if key in SPECS:
        return key
    known = ", ".join(known_modules())
    if key in NOT_PROVIDED:
        raise InvalidParameter(
            f"{field}: preprocessor {name!r} is an sd-webui-controlnet preprocessor this server does not provide; "
            f"known preprocessors: {known}",
            field=field,
        )
    raise InvalidParameter(f"{field}: unknown preprocessor {name!r}; known preprocessors: {known}", field=field)


def spec(module: str, field: str = "module") -> ModuleSpec:
    """The :class:`ModuleSpec` of ``module`` (any accepted spelling)."""
    return SPECS[normalize_module(module, field)]


def weight_files(module: str, field: str = "module") -> list[str]:
    """Annotator file names ``module`` loads from the store's ``annotators/`` folder (empty: none)."""
    return list(spec(module, field).files)


def needs_weights(module: str, field: str = "module") -> bool:
    """True when ``module`` loads annotator weights (so the server must fetch them first)."""
    return bool(spec(module, field).files)


def resolve_processor_res(value: object, field: str = "processor_res") -> int:
    """A unit's ``processor_res``: -1 (or None) → 512, A1111's default; else an int in range, or 422."""
    if value is None:
        return DEFAULT_PROCESSOR_RES
    if not _is_number(value):
        raise InvalidParameter(f"{field}: must be a number, got {value!r}", field=field)
    if value == -1:
        return DEFAULT_PROCESSOR_RES
    res = round(value)
    if not MIN_PROCESSOR_RES <= res <= MAX_PROCESSOR_RES:
        raise InvalidParameter(
            f"{field}: must be -1 or between {MIN_PROCESSOR_RES} and {MAX_PROCESSOR_RES}, got {value!r}", field=field
        )
    return res


def resolve_threshold(value: object, default: float | None, field: str) -> float | None:
    """A unit's ``threshold_a``/``threshold_b``: -1 (or None) → the module's default; else the number as sent."""
    if value is None or default is None:
        return default
    if not _is_number(value):
        raise InvalidParameter(f"{field}: must be a number, got {value!r}", field=field)
    if value == -1:
        return default
    return float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sibling_field(field: str, name: str) -> str:
    """``alwayson_scripts.controlnet.args[0].module`` → ``alwayson_scripts.controlnet.args[0].<name>``."""
    head, dot, _last = field.rpartition(".")
    return f"{head}{dot}{name}"
