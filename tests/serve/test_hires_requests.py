"""Hires fix requests: A1111's target sizes, defaults and fall-backs, clear 422s for what cannot be honoured."""

import pytest

from pipelines.errors import InvalidParameter
from serve.requests import build_job
from serve.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(model_store=str(tmp_path), output=str(tmp_path / "out"), max_steps=60, max_side=2048, max_pixels=2048 * 2048)


def hires(settings, **kw):
    return build_job({"prompt": "a cat", "steps": 20, "width": 512, "height": 512, "enable_hr": True, **kw}, settings).params.hires


def test_defaults_are_a1111s(settings):
    hr = hires(settings)
    assert (hr.width, hr.height, hr.upscale_to) == (1024, 1024, (1024, 1024))
    assert (hr.upscaler, hr.steps, hr.denoising_strength, hr.scale) == ("Latent", 20, 0.75, 2.0)
    assert (hr.sampler_name, hr.prompt, hr.negative_prompt, hr.resize) == ("Euler", "a cat", "", None)


def test_second_pass_options(settings):
    hr = hires(settings, hr_scale=1.5, hr_upscaler="lanczos", hr_second_pass_steps=7, denoising_strength=0.4,
               hr_sampler_name="DPM++ 2M", hr_scheduler="Karras", hr_prompt="a dog", hr_negative_prompt="blurry")
    assert (hr.width, hr.height, hr.upscaler, hr.steps, hr.denoising_strength) == (768, 768, "Lanczos", 7, 0.4)
    assert (hr.sampler_name, hr.schedule_type, hr.prompt, hr.negative_prompt) == ("DPM++ 2M", "Karras", "a dog", "blurry")
    assert hires(settings, hr_sampler_name="Use same sampler").sampler_name == "Euler"


@pytest.mark.parametrize(
    "kw, target, upscale_to",
    [
        ({"hr_resize_x": 768}, (768, 768), (768, 768)),
        ({"hr_resize_y": 640}, (640, 640), (640, 640)),
        ({"hr_resize_x": 1024, "hr_resize_y": 768}, (1024, 768), (1024, 1024)),  # cover, then cut the centre
        ({"hr_resize_x": 768, "hr_resize_y": 1024}, (768, 1024), (1024, 1024)),
        ({"hr_scale": 1.3}, (664, 664), (664, 664)),  # 665.6 floored to a multiple of 8
    ],
)
def test_target_sizes(settings, kw, target, upscale_to):
    hr = hires(settings, **kw)
    assert ((hr.width, hr.height), hr.upscale_to) == (target, upscale_to)


@pytest.mark.parametrize(
    "kw, field, words",
    [
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "need weights"),
        ({"hr_scale": 8}, "hr_scale", "MAX_SIDE"),
        ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name", "not supported"),
        ({"hr_sampler_name": "Bogus"}, "hr_sampler_name", "Bogus"),
        ({"hr_second_pass_steps": 99}, "hr_second_pass_steps", "at most 60"),
        ({"denoising_strength": 2}, "denoising_strength", "less than or equal to 1"),
    ],
)
def test_bad_hires_fields(settings, kw, field, words):
    with pytest.raises(InvalidParameter) as info:
        hires(settings, **kw)
    assert info.value.field == field and words in info.value.message, info.value.message


def test_hr_fields_without_enable_hr_stay_quiet(settings):
    job = build_job({"hr_scale": 3, "hr_upscaler": "Bogus", "denoising_strength": 0.3}, settings)
    assert job.params.hires is None and job.warnings == []
