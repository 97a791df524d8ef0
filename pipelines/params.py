"""The resolved generation request handed from the HTTP process to the worker.

Pure Python (no torch): built and validated in ``serve/``, pickled across the
process boundary, consumed by ``pipelines.txt2img``. Every value here is final:
seeds are concrete, the sampler is canonical, so ``params.json`` can record the
request exactly as it ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class HiresParams:
    """A1111's hires fix, resolved: upscale the first pass to ``width`` x ``height`` and img2img it.

    ``upscale_to`` is the size the first pass is scaled to before the centre is cut
    to the target (A1111's ``hr_resize_x``/``hr_resize_y`` with another aspect ratio).
    """

    width: int
    height: int
    upscale_to: tuple[int, int]
    upscaler: str  # "Latent", "Latent (bicubic)", …, "None", "Lanczos", "Nearest"
    steps: int  # second-pass steps actually run
    denoising_strength: float
    sampler_name: str
    schedule_type: str
    prompt: str
    negative_prompt: str
    scale: float
    resize: tuple[int, int] | None = None  # hr_resize_x/y when given
    second_pass_steps: int = 0  # as requested (0 = same as the first pass)


@dataclass
class Txt2ImgParams:
    """One txt2img job, resolved. Image ``i`` (0-based over batch_size * n_iter) uses ``seeds[i]``."""

    prompt: str
    negative_prompt: str
    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float
    sampler_name: str
    schedule_type: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    n_iter: int
    checkpoint: str | None = None
    clip_stop_at_last_layers: int = 1
    sdxl_clip_l_skip: bool = False  # A1111 "Clip skip SDXL": apply clip skip to SDXL's CLIP-L too
    sd_vae: str | None = None  # override_settings.sd_vae: None/"Automatic", "None", or a VAE/ file name
    eta: float | None = None
    styles: list[str] = field(default_factory=list)
    hires: HiresParams | None = None

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Img2ImgParams(Txt2ImgParams):
    """One img2img job, resolved: a txt2img job plus the start image (and an optional mask).

    ``init_image`` and ``mask`` are PNG bytes already decoded and checked by the HTTP
    process (``pipelines.image_input``); the size to generate is ``width`` x ``height``
    and the image is brought there with A1111's ``resize_mode``.
    """

    init_image: bytes = b""
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: bytes | None = None
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    initial_noise_multiplier: float = 1.0

    def to_dict(self) -> dict:
        """Everything but the image bytes (``params.json`` records their sha256 instead)."""
        import hashlib

        data = asdict(self)
        data["init_image"] = {"sha256": hashlib.sha256(self.init_image).hexdigest(), "bytes": len(self.init_image)}
        if self.mask is not None:
            data["mask"] = {"sha256": hashlib.sha256(self.mask).hexdigest(), "bytes": len(self.mask)}
        return data
