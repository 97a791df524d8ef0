"""A1111 sampler / schedule-type resolution (pure Python; no torch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import samplers
from pipelines.errors import InvalidParameter
from pipelines.samplers import UNSUPPORTED, list_samplers, list_schedulers, resolve_sampler

ROOT = Path(__file__).resolve().parents[2]

# AUTOMATIC1111 WebUI 1.10, /sdapi/v1/samplers and /sdapi/v1/schedulers, in order.
A1111_SAMPLERS = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler",
    "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC",
    "LCM",
]
A1111_SCHEDULES = [
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
    "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
]


def _error(*args, **kwargs) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        resolve_sampler(*args, **kwargs)
    return info.value


def test_importing_samplers_leaves_torch_out():
    code = "import sys, pipelines.samplers; print(sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tables_match_a1111():
    assert [s["name"] for s in list_samplers(include_unsupported=True)] == A1111_SAMPLERS
    assert [s["label"] for s in list_schedulers(include_unsupported=True)] == A1111_SCHEDULES
    assert set(UNSUPPORTED) == {"DPM++ 2S a", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++"}
    assert [s["name"] for s in list_samplers()] == [n for n in A1111_SAMPLERS if n not in UNSUPPORTED]
    assert [s["label"] for s in list_schedulers()] == [
        s for s in A1111_SCHEDULES if s not in ("KL Optimal", "Align Your Steps")
    ]


def test_list_shapes_are_a1111s():
    by_name = {s["name"]: s for s in list_samplers()}
    assert by_name["Euler a"] == {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"],
                                  "options": {"uses_ensd": True}}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert by_name["DPM++ 3M SDE"]["options"]["scheduler"] == "exponential"
    by_label = {s["label"]: s for s in list_schedulers()}
    assert by_label["Karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                  "need_inner_model": False}
    assert by_label["SGM Uniform"]["aliases"] == ["SGMUniform"]
    assert by_label["Polyexponential"]["default_rho"] == 1.0
    assert by_label["Uniform"]["need_inner_model"] is True


def test_default_is_the_api_default_euler():
    # A1111's API: sampler_name or sampler_index, and sampler_index defaults to "Euler".
    choice = resolve_sampler(None, None)
    assert (choice.sampler, choice.schedule, choice.scheduler_class) == ("Euler", "Automatic", "EulerDiscreteScheduler")
    assert resolve_sampler("", "").sampler == "Euler"
    assert resolve_sampler(None, None, sampler_index="Euler a").sampler == "Euler a"
    assert resolve_sampler("DDIM", None, sampler_index="Euler a").sampler == "DDIM"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"), ("euler A", "Euler a"), ("k_dpmpp_2m", "DPM++ 2M"),
     ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"), ("k_lms", "LMS"), ("k_dpm_2_a", "DPM2 a"), ("ddim", "DDIM"),
     ("plms", "PLMS"), ("unipc", "UniPC"), ("k_lcm", "LCM"), ("  DPM++  2M ", "DPM++ 2M")],
)
def test_aliases(name, expected):
    assert resolve_sampler(name, None).sampler == expected


@pytest.mark.parametrize(
    ("name", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "Karras"),
        ("DPM++ 3M SDE Karras", "DPM++ 3M SDE", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("Euler SGM Uniform", "Euler", "SGM Uniform"),
        ("Euler a sgm_uniform", "Euler a", "SGM Uniform"),
        ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
        ("k_lms_ka", "LMS", "Karras"),
        ("k_dpmpp_3m_sde_exp", "DPM++ 3M SDE", "Exponential"),
    ],
)
def test_legacy_combined_names_split(name, sampler, schedule):
    choice = resolve_sampler(name, None)
    assert (choice.sampler, choice.schedule) == (sampler, schedule)
    assert resolve_sampler(name, "Automatic").schedule == schedule  # the suffix beats an explicit "Automatic"


def test_explicit_schedule_beats_the_suffix_with_a_warning():
    choice = resolve_sampler("DPM++ 2M Karras", "Exponential")
    assert (choice.sampler, choice.schedule) == ("DPM++ 2M", "Exponential")
    assert choice.scheduler_kwargs["use_exponential_sigmas"] is True
    assert choice.scheduler_kwargs["use_karras_sigmas"] is False
    assert "Karras" in choice.warnings[0]
    assert resolve_sampler("DPM++ 2M Karras", "karras").warnings == ()


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [("DPM++ 2M", "Karras"), ("DPM++ SDE", "Karras"), ("DPM++ 2M SDE", "Exponential"),
     ("DPM++ 2M SDE Heun", "Exponential"), ("DPM++ 3M SDE", "Exponential"), ("DPM2", "Karras"), ("DPM2 a", "Karras"),
     ("Euler", "Automatic"), ("Euler a", "Automatic"), ("LMS", "Automatic"), ("Heun", "Automatic"),
     ("DDIM", "Automatic"), ("PLMS", "Automatic"), ("UniPC", "Automatic"), ("LCM", "Automatic")],
)
def test_automatic_is_the_samplers_own_default(sampler, schedule):
    assert resolve_sampler(sampler, "Automatic").schedule == schedule
    assert resolve_sampler(sampler, None).schedule == schedule


@pytest.mark.parametrize("spelling", ["Karras", "karras", "KARRAS"])
def test_schedule_spellings(spelling):
    assert resolve_sampler("Euler", spelling).schedule == "Karras"


@pytest.mark.parametrize("spelling", ["SGM Uniform", "sgm_uniform", "SGMUniform"])
def test_schedule_aliases(spelling):
    assert resolve_sampler("Euler", spelling).scheduler_kwargs["timestep_spacing"] == "trailing"


def test_schedule_types_map_to_diffusers_options():
    def kw(schedule):
        return resolve_sampler("Euler", schedule).scheduler_kwargs

    assert kw("Automatic")["timestep_spacing"] == kw("Uniform")["timestep_spacing"] == "linspace"
    assert kw("Normal")["timestep_spacing"] == "linspace"
    assert kw("Karras")["use_karras_sigmas"] is True
    assert kw("Exponential")["use_exponential_sigmas"] is True
    assert kw("Polyexponential")["use_exponential_sigmas"] is True
    assert kw("Beta")["use_beta_sigmas"] is True
    assert kw("Simple")["timestep_spacing"] == "trailing"
    assert (kw("DDIM")["timestep_spacing"], kw("DDIM")["steps_offset"]) == ("leading", 1)
    assert not any(kw("Automatic")[f] for f in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
    beta_extra = (("Beta schedule alpha", 0.6), ("Beta schedule beta", 0.6))
    assert resolve_sampler("Euler", "Beta").infotext_extra == beta_extra


@pytest.mark.parametrize(
    ("name", "cls", "options"),
    [
        ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}),
        ("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        ("DPM++ SDE", "DPMSolverSDEScheduler", {}),
        ("Euler a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
        ("Euler", "EulerDiscreteScheduler", {}),
        ("LMS", "LMSDiscreteScheduler", {}),
        ("Heun", "HeunDiscreteScheduler", {}),
        ("DPM2", "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
        ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
        ("DDIM", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}),
        ("PLMS", "PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "leading"}),
        ("UniPC", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3}),
        ("LCM", "LCMScheduler", {"original_inference_steps": 50}),
    ],
)
def test_samplers_map_to_matching_diffusers_schedulers(name, cls, options):
    choice = resolve_sampler(name, None)
    assert choice.scheduler_class == cls
    assert options.items() <= choice.scheduler_kwargs.items()


def test_unknown_sampler_names_the_field_and_lists_valid_names():
    error = _error("Eulerr", None)
    assert error.field == "sampler_name"
    assert "'Eulerr'" in error.message
    for name in samplers.supported_sampler_names():
        assert name in error.message
    assert _error(None, None, sampler_index="nope").field == "sampler_index"


def test_unknown_schedule_names_the_field_and_lists_valid_ones():
    error = _error("Euler", "Linear")
    assert error.field == "scheduler"
    for label in ("Automatic", "Karras", "Exponential", "SGM Uniform", "Beta"):
        assert label in error.message


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_samplers_say_why(name):
    error = _error(name, None)
    assert error.field == "sampler_name"
    assert UNSUPPORTED[name] in error.message
    assert "DPM++ 2M" in error.message  # and list what is supported


def test_unsupported_legacy_combination():
    assert "not supported" in _error("DPM++ 2S a Karras", None).message


@pytest.mark.parametrize("schedule", ["KL Optimal", "Align Your Steps", "kl_optimal", "align_your_steps"])
def test_schedules_without_a_diffusers_equivalent_are_rejected(schedule):
    error = _error("Euler", schedule)
    assert error.field == "scheduler"
    assert "not supported" in error.message


def test_rejected_suffix_schedule_names_sampler_name():
    assert _error("DPM++ 2M Align Your Steps", None).field == "sampler_name"


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Polyexponential", "Beta"])
def test_euler_a_cannot_take_sigma_schedules(schedule):
    error = _error("Euler a", schedule)
    assert error.field == "scheduler"
    assert "EulerAncestralDiscreteScheduler" in error.message
    assert "SGM Uniform" in error.message  # what would work


def test_lcm_takes_only_uniform_schedules():
    assert resolve_sampler("LCM", "Uniform").sampler == "LCM"
    assert _error("LCM", "Karras").field == "scheduler"


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
def test_timestep_samplers_ignore_the_schedule_like_a1111(sampler):
    choice = resolve_sampler(sampler, "Karras")
    assert choice.schedule == "Karras"  # A1111 writes the requested label in the infotext
    assert "ignored" in choice.warnings[0]
    assert "use_karras_sigmas" not in choice.scheduler_kwargs or not choice.scheduler_kwargs["use_karras_sigmas"]
    assert resolve_sampler(sampler, "KL Optimal").warnings  # ignored too, so not an error
    assert resolve_sampler(sampler, None).warnings == ()


def test_choice_is_frozen_and_hashable():
    choice = resolve_sampler("DPM++ 2M", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.sampler = "Euler"  # type: ignore[misc]
    assert hash(choice) == hash(resolve_sampler("DPM++ 2M Karras", None))
    choice.scheduler_kwargs["solver_order"] = 9  # a copy: the choice is unchanged
    assert choice.scheduler_kwargs["solver_order"] == 2
