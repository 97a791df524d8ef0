"""The resolved generation request handed from the HTTP process to the worker.

Pure Python (no torch): built and validated in ``serve/``, pickled across the
process boundary, consumed by ``pipelines.txt2img``. Every value here is final:
seeds are concrete, the sampler is canonical, so ``params.json`` can record the
request exactly as it ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    def to_dict(self) -> dict:
        return asdict(self)
