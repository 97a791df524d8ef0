"""Per-unit ControlNet injection into any diffusers SD/SDXL pipeline, through a UNet pre-hook.

diffusers' ControlNet pipelines have one ``guess_mode`` and one guidance window
per call; sd-webui-controlnet gives every unit its own weight, window and control
mode.  So instead of a ControlNet pipeline, :class:`ControlHook` registers a
forward *pre-hook* on ``pipe.unet`` for the duration of a ``with`` block.  On every
UNet call it sees ``(sample, timestep, encoder_hidden_states, added_cond_kwargs)``
exactly as the pipeline passes them, runs each unit active at this point of the
sampling itself, and hands the summed residuals to the UNet through its public
``down_block_additional_residuals`` / ``mid_block_additional_residual`` arguments.
The same hook serves txt2img and img2img pipelines, and the pipelines' own loops
(callbacks, prompt schedules) stay untouched.  Nothing in diffusers is patched.

Per-unit semantics (the extension's ``hook.py``):

- **progress**: the sampling step ``s`` of ``n`` (second-order samplers call the UNet
  more than once per step; those calls share ``s``); a unit acts when
  ``guidance_start <= s / n <= guidance_end``.  For img2img, ``n`` counts the steps
  actually run (after ``denoising_strength``).
- **Balanced**: every residual × ``weight``, on both CFG halves.
- **My prompt is more important**: "soft injection", residual ``i`` × ``weight·0.825^(12−i)``,
  ``i = 0..12`` for SD1's 13 residuals.  SDXL ControlNets have 10 residuals; the
  extension keeps the first 10 scales of the SD1 list (so the middle block gets
  ``0.825^3``), and so do we: the rule ``weight·0.825^(12−i)`` for ``i < n`` holds for any ``n``.
- **ControlNet is more important**: soft injection, and residuals on the conditional
  half only (the ControlNet runs on that half; the unconditional half gets none).
- **hires fix**: the second pass (a larger latent) gets the detected map fitted to its
  canvas; ``hr_option`` keeps a unit to one pass; canny/mlsd units use soft injection
  there, as the extension forces.

Under CFG diffusers batches ``cat([uncond, cond])``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

BALANCED, PROMPT, CONTROL = 0, 1, 2
SOFT_BASE = 0.825


@dataclass
class HookUnit:
    """One enabled unit, ready to run: its ControlNet, its canvas-sized hint, its schedule.

    ``source`` (the detected map before fitting) lets a later pass at another size —
    the hires fix's second pass — get a hint fitted to its own canvas, as the extension
    prepares one per pass; ``hr_option`` says in which passes the unit acts.
    """

    index: int
    controlnet: torch.nn.Module
    hint: torch.Tensor  # (1, 3, H, W) in [0, 1], the generation size
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    mode: int = BALANCED
    source: Image.Image | None = None
    resize_mode: str = "Crop and Resize"
    hr_option: str = "Both"  # "Both", "Low res only", "High res only"
    soft_in_hires: bool = False  # the extension forces soft injection for canny/mlsd maps in the hires pass
    _hints: dict = field(default_factory=dict, repr=False)

    def active_at(self, progress: float, *, hires: bool = False) -> bool:
        if self.hr_option == ("High res only" if not hires else "Low res only"):
            return False
        return self.weight != 0 and self.guidance_start <= progress <= self.guidance_end

    def hint_for(self, height: int, width: int) -> torch.Tensor:
        """The hint for a canvas of ``height`` x ``width`` pixels (the base one, or fitted once per size)."""
        if tuple(self.hint.shape[-2:]) == (height, width):
            return self.hint
        if (height, width) not in self._hints:
            if self.source is not None:
                from pipelines.control_units import fit_to_canvas

                image = fit_to_canvas(self.source, width, height, self.resize_mode)
                self._hints[height, width] = hint_tensor(image, device=self.hint.device, dtype=self.hint.dtype)
            else:
                self._hints[height, width] = torch.nn.functional.interpolate(self.hint, size=(height, width), mode="bilinear")
        return self._hints[height, width]


def hint_tensor(image: Image.Image, *, device, dtype) -> torch.Tensor:
    """An RGB image as the (1, 3, H, W) [0, 1] tensor diffusers' ControlNets take."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def residual_scales(n: int, weight: float, mode: int) -> list[float]:
    """Scale of each of the ``n`` residuals (down blocks, then the middle block) for a control mode."""
    if mode == BALANCED:
        return [weight] * n
    return [weight * SOFT_BASE ** float(12 - i) for i in range(n)]


@dataclass
class CallRecord:
    """One UNet call as the hook saw it (for tests and logs)."""

    step: int
    steps: int
    units: list[int] = field(default_factory=list)


class ControlHook:
    """``with ControlHook(pipe, units):`` — every UNet call inside gets the active units' residuals."""

    def __init__(self, pipe, units: list[HookUnit], *, record: bool = False):
        self.pipe = pipe
        self.units = units
        self.record = record
        self.calls: list[CallRecord] = []
        self._handle = None
        self._scheduler = None
        self._start = 0
        self._last = -1

    def __enter__(self):
        if self.units:
            self._handle = self.pipe.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- where are we in the sampling? ------------------------------------------------
    def _position(self, timestep) -> tuple[int, int]:
        """(sampling step, steps in this run) of the current UNet call."""
        sched = self.pipe.scheduler
        timesteps = sched.timesteps
        if sched is not self._scheduler:  # txt2img builds a fresh scheduler per batch: a new run
            self._scheduler, self._start, self._last = sched, None, -1
        index = getattr(sched, "step_index", None)
        if index is None:
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            hits = [i for i, v in enumerate(timesteps.tolist()) if v == t]
            later = [i for i in hits if i > self._last]
            index = later[0] if later else (hits[0] if hits else self._last + 1)
        if self._start is None or index < self._last:
            self._start = index  # img2img starts part-way into the schedule
        self._last = index
        order = max(1, int(getattr(sched, "order", 1)))
        steps = max(1, math.ceil((len(timesteps) - self._start) / order))
        return min((index - self._start) // order, steps - 1), steps

    # -- the hook -----------------------------------------------------------------------
    def _hook(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        step, steps = self._position(timestep)
        progress = step / steps
        factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        canvas = (int(sample.shape[-2]) * factor, int(sample.shape[-1]) * factor)
        # a canvas other than the units' own is the hires fix's second pass
        hires = canvas != tuple(self.units[0].hint.shape[-2:])
        active = [u for u in self.units if u.active_at(progress, hires=hires)]
        if self.record:
            self.calls.append(CallRecord(step, steps, [u.index for u in active]))
        if not active:
            return args, kwargs
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        added = kwargs.get("added_cond_kwargs")
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and sample.shape[0] % 2 == 0
        down_sum, mid_sum = None, None
        for unit in active:
            hint = unit.hint_for(*canvas)
            down, mid = self._run(unit, hint, sample, timestep, context, added, cfg)
            mode = PROMPT if hires and unit.soft_in_hires and unit.mode == BALANCED else unit.mode
            scales = residual_scales(len(down) + 1, unit.weight, mode)
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        old_down = kwargs.get("down_block_additional_residuals")
        if old_down is not None:
            down_sum = [a + b for a, b in zip(old_down, down_sum)]
            mid_sum = mid_sum + kwargs["mid_block_additional_residual"]
        kwargs = {**kwargs, "down_block_additional_residuals": down_sum, "mid_block_additional_residual": mid_sum}
        return args, kwargs

    def _run(self, unit: HookUnit, hint, sample, timestep, context, added, cfg: bool):
        """The unit's raw residuals for this call; with "ControlNet is more important" the uncond half is zero."""
        batch = sample.shape[0]
        if unit.mode == CONTROL and cfg:
            half = batch // 2
            t = timestep[half:] if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == batch else timestep
            cond_added = {k: v[half:] for k, v in added.items()} if added else None
            down, mid = self._call(unit.controlnet, hint, sample[half:], t, context[half:], cond_added, half)
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            return down, torch.cat([torch.zeros_like(mid), mid])
        return self._call(unit.controlnet, hint, sample, timestep, context, added, batch)

    @staticmethod
    def _call(net, hint, sample, timestep, context, added, batch: int):
        hint = hint.to(device=sample.device, dtype=net.dtype).expand(batch, -1, -1, -1)
        extra = {"added_cond_kwargs": added} if added else {}
        down, mid = net(
            sample.to(net.dtype),
            timestep,
            encoder_hidden_states=context.to(net.dtype),
            controlnet_cond=hint,
            conditioning_scale=1.0,
            return_dict=False,
            **extra,
        )
        return [d.to(sample.dtype) for d in down], mid.to(sample.dtype)
