"""Request and response bodies: A1111 txt2img/img2img payloads and the design's envelope.

Strict where A1111 is strict (types, ranges), tolerant where A1111 clients send
extras: unknown keys are accepted and reported back as warnings, never silently
honoured or silently dropped when they would change the image.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

SEED_MAX = 2**32 - 1


class Txt2ImgPayload(BaseModel):
    """The body of A1111's ``POST /sdapi/v1/txt2img`` (defaults as A1111's API)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = Field(None, ge=0.0, le=1.0)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    # hires fix (only read with enable_hr, as A1111)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    hr_scale: float = Field(2.0, gt=0.0, le=8.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int, info: ValidationInfo) -> int:
        limits = (info.context or {}).get("limits")
        max_side = limits.max_side if limits else 2048
        if value < 64 or value > max_side:
            raise ValueError(f"must be between 64 and {max_side} (got {value})")
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int, info: ValidationInfo) -> int:
        return _at_most(value, info, "max_steps")

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int, info: ValidationInfo) -> int:
        return _at_most(value, info, "max_batch_size")

    @field_validator("n_iter")
    @classmethod
    def _n_iter(cls, value: int, info: ValidationInfo) -> int:
        return _at_most(value, info, "max_n_iter")


class Img2ImgPayload(Txt2ImgPayload):
    """The body of A1111's ``POST /sdapi/v1/img2img`` (defaults as A1111's API).

    Images stay strings here; ``serve.requests`` decodes and checks them.
    """

    init_images: list[Any] = Field(default_factory=list)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    resize_mode: int | str = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=1.5)
    include_init_images: bool = False


def _at_most(value: int, info: ValidationInfo, limit_name: str) -> int:
    limits = (info.context or {}).get("limits")
    if limits is not None:
        upper = getattr(limits, limit_name)
        if value > upper:
            raise ValueError(f"must be between 1 and {upper} (got {value}; the server's {limit_name.upper()} setting)")
    return value


class OutputSpec(BaseModel):
    """Where a job's images and records go, and whether images come back inline."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    inline: bool = True


class Envelope(BaseModel):
    """``{"task", "id", "payload", "models", "output"}`` as in the design."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["txt2img", "img2img"] = "txt2img"
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    payload: dict[str, Any]
    models: dict[str, list[str]] | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)


class ErrorBody(BaseModel):
    """Every non-2xx answer: what went wrong, which field, and the job if one was created."""

    error: str
    detail: str
    field: str | None = None
    job_id: str | None = None


class Txt2ImgResponse(BaseModel):
    """A1111's answer shape plus our job id and warnings."""

    images: list[str]
    parameters: dict[str, Any]
    info: str
    job_id: str
    warnings: list[str] = Field(default_factory=list)
