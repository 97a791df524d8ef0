"""Build the diffusers scheduler for a resolved A1111 sampler (see :mod:`pipelines.samplers`).

The checkpoint's own scheduler config (``pipe.scheduler.config``) supplies what
belongs to the model — ``num_train_timesteps``, the beta schedule,
``prediction_type`` (epsilon or v), ``rescale_betas_zero_snr`` — and the
:class:`~pipelines.samplers.SamplerChoice` supplies everything that belongs to
the A1111 sampler: the solver, sigma flags and timestep spacing.

Timestep spacing, as A1111 does it (documented per schedule type in
``pipelines.samplers``): k-diffusion samplers with "Automatic"/"Uniform" sample
sigmas uniformly in t from 999 to 0, which is diffusers' ``"linspace"``; DDIM and
PLMS step ``range(0, 1000, 1000 // steps) + 1``, which is ``"leading"`` with
``steps_offset=1``; UniPC uses uniform time (``"linspace"``). Checkpoint configs
usually say ``"leading"`` (SD 1.x/2.x, SDXL), so the choice always overrides it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipelines.samplers import SamplerChoice

logger = logging.getLogger(__name__)

# Keys a checkpoint config may carry that describe a sampler, not the model: drop them so
# that a config saved from, say, a Karras DPM++ scheduler does not leak into Euler.
_SAMPLER_KEYS = frozenset({
    "_class_name", "_diffusers_version", "algorithm_type", "solver_order", "solver_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "timestep_spacing", "skip_prk_steps", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "noise_sampler_seed", "original_inference_steps", "predict_x0", "disable_corrector",
})


def model_config(base_config: Mapping[str, object]) -> dict[str, object]:
    """The model-describing part of a scheduler config (betas, prediction type, train steps, …)."""
    return {k: v for k, v in dict(base_config).items() if k not in _SAMPLER_KEYS}


def make_scheduler(
    choice: SamplerChoice, base_config: Mapping[str, object], *, seed: int | None = None
) -> SchedulerMixin:
    """Instantiate ``choice.scheduler_class`` from the checkpoint's scheduler config.

    ``seed`` seeds the Brownian-tree noise of "DPM++ SDE" (A1111 seeds it with
    the image seed); without it diffusers draws the tree's seed from torch's
    global RNG, so the same request would give different images.
    """
    cls = getattr(diffusers, choice.scheduler_class)
    kwargs = choice.scheduler_kwargs
    if choice.scheduler_class == "DPMSolverSDEScheduler":
        kwargs["noise_sampler_seed"] = seed
    scheduler = cls.from_config(model_config(base_config), **kwargs)
    logger.debug("scheduler %s for %s / %s: %s", choice.scheduler_class, choice.sampler, choice.schedule, kwargs)
    return scheduler
