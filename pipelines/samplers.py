"""A1111 sampler and schedule-type names, resolved to a diffusers scheduler recipe.

Pure Python on purpose: the HTTP process validates ``sampler_name`` /
``scheduler`` with this module, so it must never import torch or diffusers.
:mod:`pipelines.schedulers` turns a :class:`SamplerChoice` into a scheduler.

The tables mirror AUTOMATIC1111 WebUI 1.10 (``/sdapi/v1/samplers`` and
``/sdapi/v1/schedulers``). How A1111 resolves names, and what we do:

* ``sampler_name or sampler_index`` picks the sampler; the API model's
  ``sampler_index`` defaults to ``"Euler"``, so a body without either gets
  **Euler** (the UI's default, the first list entry, is "DPM++ 2M").
* A legacy combined name ("DPM++ 2M Karras", "LMS Karras", "DPM++ 2M SDE
  Exponential", ``k_dpmpp_2m_ka``) is split into sampler + schedule type. An
  explicit non-Automatic ``scheduler`` wins over the suffix, as in A1111; unlike
  A1111 the suffix also wins over an explicit "Automatic" (the user's intent).
* "Automatic" means the sampler's own default (``options["scheduler"]``): Karras
  for DPM++ 2M / DPM++ SDE / DPM2 / DPM2 a, Exponential for the 2M/3M SDE
  family, plain uniform sigmas otherwise (infotext then says "Automatic").
* A1111 falls back to its default on unknown names; we raise
  :class:`InvalidParameter` instead, listing the valid names.
* DDIM, PLMS and UniPC ignore the schedule type in A1111 (they use their own
  timesteps); we do the same and add a warning when one was set.

Schedule types → diffusers: Uniform/Normal/Automatic → ``timestep_spacing=
"linspace"`` (k-diffusion's uniform-in-t sigmas); Karras/Exponential/Beta →
``use_*_sigmas`` (same formulas, Beta with A1111's default alpha=beta=0.6);
Polyexponential → exponential sigmas (identical at A1111's default rho=1);
SGM Uniform and Simple → ``"trailing"`` (equal up to integer rounding); DDIM →
``"leading"`` with ``steps_offset=1``. KL Optimal and Align Your Steps need
hand-made sigma lists that diffusers' scheduler configs cannot express, so they
are rejected. Known approximations: A1111 drops the penultimate sigma for DPM2,
DPM2 a and DPM++ 3M SDE and uses a Brownian-tree noise sampler for the SDE
family; diffusers does neither (same algorithm, different noise draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.errors import InvalidParameter

DEFAULT_SAMPLER = "Euler"  # what A1111's API uses when the body names no sampler
DEFAULT_SCHEDULE = "Automatic"


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler: A1111 names for the infotext, a recipe for diffusers."""

    sampler: str  # canonical A1111 sampler name, e.g. "DPM++ 2M"
    schedule: str  # the "Schedule type" label A1111 writes, e.g. "Karras"
    scheduler_class: str  # diffusers scheduler class name
    scheduler_options: tuple[tuple[str, object], ...] = ()
    infotext_extra: tuple[tuple[str, object], ...] = ()  # extra infotext keys A1111 adds
    warnings: tuple[str, ...] = ()  # parameters accepted but not honoured (as A1111 does)

    @property
    def scheduler_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``SchedulerClass.from_config(base_config, **kwargs)``."""
        return dict(self.scheduler_options)


@dataclass(frozen=True)
class _Schedule:
    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


# A1111 1.10 ``sd_schedulers.schedulers``, in order.
SCHEDULES: tuple[_Schedule, ...] = (
    _Schedule("automatic", "Automatic"),
    _Schedule("uniform", "Uniform", need_inner_model=True),
    _Schedule("karras", "Karras", default_rho=7.0),
    _Schedule("exponential", "Exponential"),
    _Schedule("polyexponential", "Polyexponential", default_rho=1.0),
    _Schedule("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    _Schedule("kl_optimal", "KL Optimal"),
    _Schedule("align_your_steps", "Align Your Steps"),
    _Schedule("simple", "Simple", need_inner_model=True),
    _Schedule("normal", "Normal", need_inner_model=True),
    _Schedule("ddim", "DDIM", need_inner_model=True),
    _Schedule("beta", "Beta", need_inner_model=True),
)
_SCHEDULE_BY_NAME = {s.name: s for s in SCHEDULES}

UNSUPPORTED_SCHEDULES: dict[str, str] = {
    "KL Optimal": "its sigmas (tan-spaced, ending at sigma_min instead of 0) have no diffusers scheduler option",
    "Align Your Steps": "its tabulated, log-interpolated sigmas have no diffusers scheduler option",
}

_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SPACING = {  # schedule name -> diffusers options, for every scheduler class
    "automatic": {"timestep_spacing": "linspace"},
    "uniform": {"timestep_spacing": "linspace"},
    "normal": {"timestep_spacing": "linspace"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 1},
}
_SIGMAS = {  # schedule name -> flag, only for classes that have the use_*_sigmas options
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "polyexponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}
_ALL_K = frozenset(_SPACING) | frozenset(_SIGMAS)
_SPACING_ONLY = frozenset(_SPACING)


@dataclass(frozen=True)
class _Sampler:
    name: str
    aliases: tuple[str, ...]
    options: tuple[tuple[str, object], ...]  # A1111's options, as /sdapi/v1/samplers shows them
    kind: str  # "k" (sigma schedule applies), "timesteps" (schedule ignored), "unsupported"
    cls: str = ""
    kwargs: tuple[tuple[str, object], ...] = ()
    schedules: frozenset[str] = field(default=frozenset())


def _opts(**kw: object) -> tuple[tuple[str, object], ...]:
    return tuple(kw.items())


_KARRAS, _EXP = _opts(scheduler="karras"), _opts(scheduler="exponential")
_DPMPP = _opts(solver_type="midpoint", lower_order_final=True, euler_at_final=False,
               final_sigmas_type="zero", use_lu_lambdas=False)

# A1111 1.10 ``sd_samplers.all_samplers``, in order (k-diffusion, timesteps, LCM).
SAMPLERS: tuple[_Sampler, ...] = (
    _Sampler("DPM++ 2M", ("k_dpmpp_2m",), _KARRAS, "k", "DPMSolverMultistepScheduler",
             _opts(algorithm_type="dpmsolver++", solver_order=2) + _DPMPP, _ALL_K),
    _Sampler("DPM++ SDE", ("k_dpmpp_sde",), _KARRAS + _opts(second_order=True, brownian_noise=True),
             "k", "DPMSolverSDEScheduler", (), _ALL_K),
    _Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), _EXP + _opts(brownian_noise=True), "k",
             "DPMSolverMultistepScheduler", _opts(algorithm_type="sde-dpmsolver++", solver_order=2) + _DPMPP, _ALL_K),
    _Sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), _EXP + _opts(brownian_noise=True, solver_type="heun"),
             "k", "DPMSolverMultistepScheduler",
             _opts(algorithm_type="sde-dpmsolver++", solver_order=2) + _DPMPP + _opts(solver_type="heun"), _ALL_K),
    _Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), _KARRAS + _opts(uses_ensd=True, second_order=True), "unsupported"),
    _Sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), _EXP + _opts(discard_next_to_last_sigma=True, brownian_noise=True),
             "k", "DPMSolverMultistepScheduler",
             _opts(algorithm_type="sde-dpmsolver++", solver_order=3) + _DPMPP, _ALL_K),
    _Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), _opts(uses_ensd=True), "k",
             "EulerAncestralDiscreteScheduler", (), _SPACING_ONLY),
    _Sampler("Euler", ("k_euler",), (), "k", "EulerDiscreteScheduler", _opts(final_sigmas_type="zero"), _ALL_K),
    _Sampler("LMS", ("k_lms",), (), "k", "LMSDiscreteScheduler", (), _ALL_K),
    _Sampler("Heun", ("k_heun",), _opts(second_order=True), "k", "HeunDiscreteScheduler", (), _ALL_K),
    _Sampler("DPM2", ("k_dpm_2",), _KARRAS + _opts(discard_next_to_last_sigma=True, second_order=True), "k",
             "KDPM2DiscreteScheduler", (), _ALL_K),
    _Sampler("DPM2 a", ("k_dpm_2_a",),
             _KARRAS + _opts(discard_next_to_last_sigma=True, uses_ensd=True, second_order=True), "k",
             "KDPM2AncestralDiscreteScheduler", (), _ALL_K),
    _Sampler("DPM fast", ("k_dpm_fast",), _opts(uses_ensd=True), "unsupported"),
    _Sampler("DPM adaptive", ("k_dpm_ad",), _opts(uses_ensd=True), "unsupported"),
    _Sampler("Restart", ("restart",), _KARRAS + _opts(second_order=True), "unsupported"),
    _Sampler("DDIM", ("ddim",), (), "timesteps", "DDIMScheduler",
             _opts(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    _Sampler("DDIM CFG++", ("ddim_cfgpp",), (), "unsupported"),
    _Sampler("PLMS", ("plms",), (), "timesteps", "PNDMScheduler",
             _opts(skip_prk_steps=True, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)),
    # A1111's UniPC options: variant bh1, skip type time_uniform (= linspace), order 3, lower order
    # final; it stops at t=1/N (sigma_min), not at sigma 0 (where diffusers' bh1 divides by zero).
    _Sampler("UniPC", ("unipc",), (), "timesteps", "UniPCMultistepScheduler",
             _opts(solver_type="bh1", solver_order=3, lower_order_final=True, predict_x0=True,
                   timestep_spacing="linspace", final_sigmas_type="sigma_min", use_karras_sigmas=False,
                   use_exponential_sigmas=False, use_beta_sigmas=False)),
    # LCM runs on A1111's k-diffusion path with no default schedule; diffusers' LCMScheduler
    # picks its own timesteps from 50 original steps, so only the uniform schedules fit.
    _Sampler("LCM", ("k_lcm",), (), "k", "LCMScheduler", _opts(original_inference_steps=50),
             frozenset({"automatic", "uniform", "normal"})),
)

UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "ancestral single-step DPM-Solver++; diffusers' DPMSolverSinglestepScheduler adds no "
                  "ancestral noise, so it would be a different sampler",
    "DPM fast": "k-diffusion's DPM-Solver-fast splits steps into its own orders; no diffusers scheduler does",
    "DPM adaptive": "adaptive step-size DPM-Solver (error control picks the step count); no diffusers scheduler does",
    "Restart": "Restart sampling re-noises back and forth between sigmas; no diffusers scheduler does",
    "DDIM CFG++": "CFG++ changes classifier-free guidance itself; diffusers pipelines apply plain CFG",
}

# Combined names that older A1111 versions listed as aliases; "_ka" = Karras, "_exp" = Exponential.
LEGACY_ALIASES: dict[str, tuple[str, str]] = {
    "k_lms_ka": ("LMS", "karras"),
    "k_dpm_2_ka": ("DPM2", "karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
}


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


_SAMPLER_BY_KEY = {_key(n): s for s in SAMPLERS for n in (s.name, *s.aliases)}
_SCHEDULE_BY_KEY = {_key(n): s for s in SCHEDULES for n in (s.label, s.name, *s.aliases)}


def supported_sampler_names() -> list[str]:
    """Canonical names of the samplers this server can run, in A1111's order."""
    return [s.name for s in SAMPLERS if s.kind != "unsupported"]


def supported_schedule_labels() -> list[str]:
    """Labels of the schedule types at least one supported sampler can use."""
    return [s.label for s in SCHEDULES if s.label not in UNSUPPORTED_SCHEDULES]


def _split_name(raw: str) -> tuple[_Sampler | None, _Schedule | None]:
    """Find the sampler for ``raw``, splitting a trailing schedule name off like A1111."""
    key = _key(raw)
    if key in _SAMPLER_BY_KEY:
        return _SAMPLER_BY_KEY[key], None
    if key in LEGACY_ALIASES:
        name, schedule = LEGACY_ALIASES[key]
        return _SAMPLER_BY_KEY[_key(name)], _SCHEDULE_BY_NAME[schedule]
    for schedule in SCHEDULES:
        for option in (schedule.label, schedule.name, *schedule.aliases):
            suffix = " " + option.casefold()
            if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_BY_KEY:
                return _SAMPLER_BY_KEY[key[: -len(suffix)]], schedule
    return None, None


def _lookup_schedule(raw: str | None) -> _Schedule | None:
    if raw is None or not raw.strip():
        return None
    found = _SCHEDULE_BY_KEY.get(_key(raw))
    if found is None:
        raise InvalidParameter(
            f"unknown schedule type {raw!r}; valid: {', '.join(supported_schedule_labels())}", field="scheduler"
        )
    return found


def resolve_sampler(
    sampler_name: str | None, scheduler: str | None, *, sampler_index: str | None = None
) -> SamplerChoice:
    """Resolve A1111 ``sampler_name`` / ``scheduler`` (/ legacy ``sampler_index``) to a :class:`SamplerChoice`.

    Raises :class:`InvalidParameter` naming the field for an unknown sampler or
    schedule type, a sampler without a diffusers equivalent (see
    :data:`UNSUPPORTED`), or a schedule the chosen sampler's diffusers
    scheduler cannot produce.
    """
    field_name = "sampler_name" if sampler_name else ("sampler_index" if sampler_index else "sampler_name")
    raw = (sampler_name or "").strip() or (sampler_index or "").strip() or DEFAULT_SAMPLER
    sampler, suffix = _split_name(raw)
    if sampler is None:
        raise InvalidParameter(
            f"unknown sampler {raw!r}; valid: {', '.join(supported_sampler_names())}", field=field_name
        )
    if sampler.kind == "unsupported":
        raise InvalidParameter(
            f"sampler {sampler.name!r} is not supported: {UNSUPPORTED[sampler.name]}; "
            f"supported: {', '.join(supported_sampler_names())}",
            field=field_name,
        )

    warnings: list[str] = []
    explicit = _lookup_schedule(scheduler)
    schedule_field = "scheduler"
    if explicit is not None and explicit.name != "automatic":
        requested = explicit
        if suffix is not None and suffix.name != explicit.name:
            warnings.append(
                f"sampler_name {raw!r} carries schedule type {suffix.label!r}, but scheduler="
                f"{explicit.label!r} was given and wins (as in A1111)"
            )
    elif suffix is not None:
        requested, schedule_field = suffix, field_name
    else:
        requested = _SCHEDULE_BY_NAME["automatic"]

    if sampler.kind == "timesteps":
        if requested.name != "automatic":
            warnings.append(
                f"schedule type {requested.label!r} is ignored by sampler {sampler.name!r} "
                "(A1111 uses its own timesteps for DDIM, PLMS and UniPC)"
            )
        return SamplerChoice(sampler.name, requested.label, sampler.cls, sampler.kwargs, (), tuple(warnings))

    effective = requested
    default = dict(sampler.options).get("scheduler")
    if requested.name == "automatic" and default:
        effective = _SCHEDULE_BY_NAME[str(default)]
    if effective.label in UNSUPPORTED_SCHEDULES:
        raise InvalidParameter(
            f"schedule type {effective.label!r} is not supported: {UNSUPPORTED_SCHEDULES[effective.label]}; "
            f"valid for {sampler.name!r}: {', '.join(_labels_for(sampler))}",
            field=schedule_field,
        )
    if effective.name not in sampler.schedules:
        raise InvalidParameter(
            f"schedule type {effective.label!r} cannot be used with sampler {sampler.name!r}: diffusers' "
            f"{sampler.cls} cannot produce it; valid for {sampler.name!r}: {', '.join(_labels_for(sampler))}",
            field=schedule_field,
        )

    options = dict(sampler.kwargs)
    if sampler.cls != "LCMScheduler":
        options.update(_SPACING.get(effective.name, {"timestep_spacing": "linspace"}))
    if "karras" in sampler.schedules:  # the class has use_*_sigmas: set all, overriding the checkpoint
        options.update({flag: flag == _SIGMAS.get(effective.name) for flag in _SIGMA_FLAGS})
    extra: tuple[tuple[str, object], ...] = ()
    if effective.name == "beta":  # A1111 records its (default) beta distribution parameters
        extra = (("Beta schedule alpha", 0.6), ("Beta schedule beta", 0.6))
    return SamplerChoice(sampler.name, effective.label, sampler.cls, tuple(options.items()), extra, tuple(warnings))


def _labels_for(sampler: _Sampler) -> list[str]:
    ok = set(sampler.schedules) | {"automatic"}
    return [s.label for s in SCHEDULES if s.name in ok]


def list_samplers(*, include_unsupported: bool = False) -> list[dict]:
    """The ``/sdapi/v1/samplers`` body: ``[{"name", "aliases", "options"}]`` in A1111's order."""
    return [
        {"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)}
        for s in SAMPLERS
        if include_unsupported or s.kind != "unsupported"
    ]


def list_schedulers(*, include_unsupported: bool = False) -> list[dict]:
    """The ``/sdapi/v1/schedulers`` body: ``[{"name", "label", "aliases", "default_rho", "need_inner_model"}]``."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases else None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULES
        if include_unsupported or s.label not in UNSUPPORTED_SCHEDULES
    ]
