"""Request resolution: A1111 payloads and envelopes become jobs, or clear 4xx errors."""

import json

import pytest

from pipelines.errors import InvalidParameter
from serve.errors import MalformedBody
from serve.requests import build_job, parse_body
from serve.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(model_store=str(tmp_path), output=str(tmp_path / "out"), max_steps=60, max_side=1024)


def invalid(body, settings):
    with pytest.raises(InvalidParameter) as info:
        build_job(body, settings)
    return info.value


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(raw):
    with pytest.raises(MalformedBody):
        parse_body(raw)


def test_bare_payload_defaults_are_a1111s(settings):
    job = build_job({"prompt": "a cat", "seed": 7}, settings)
    p = job.params
    assert (p.steps, p.cfg_scale, p.width, p.height, p.batch_size, p.n_iter) == (50, 7.0, 512, 512, 1, 1)
    assert p.seeds == [7] and job.task == "txt2img" and len(job.job_id) == 36


def test_batch_and_n_iter_give_consecutive_seeds(settings):
    p = build_job({"seed": 100, "batch_size": 2, "n_iter": 3, "subseed": 5}, settings).params
    assert p.seeds == [100, 101, 102, 103, 104, 105]
    assert p.subseeds == [5, 6, 7, 8, 9, 10]


def test_random_seed_is_concrete(settings):
    p = build_job({"seed": -1, "batch_size": 2}, settings).params
    assert 0 <= p.seeds[0] < 2**32 and p.seeds[1] == (p.seeds[0] + 1) % 2**32


def test_envelope(settings):
    job = build_job({"task": "txt2img", "id": "job-1", "payload": {"prompt": "x", "steps": 3}, "output": {"uri": "s3://b/o/", "inline": False}}, settings)
    assert job.job_id == "job-1" and job.params.steps == 3 and job.output.uri == "s3://b/o/" and not job.output.inline


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"width": 500}, "width", "multiple of 8"),
        ({"height": 4096}, "height", "between 64 and 1024"),
        ({"steps": 61}, "steps", "between 1 and 60"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"cfg_scale": 99}, "cfg_scale", "30"),
        ({"seed": "abc"}, "seed", "integer"),
        ({"batch_size": 100}, "batch_size", "between 1 and 8"),
        ({"sampler_name": "Nope"}, "sampler_name", "Euler a"),
        ({"scheduler": "Nope"}, "scheduler", "Karras"),
        ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, "hr_upscaler", "Latent (bicubic)"),
        ({"prompt": "a <lora:foo:abc> cat"}, "prompt", "abc"),
        ({"prompt": "a <lora::1> cat"}, "prompt", "name"),
        ({"prompt": "a <wat:foo:1> cat"}, "prompt", "lora"),
        ({"negative_prompt": "a <lora:foo:1>"}, "negative_prompt", "belong in the prompt"),
        ({"prompt": "a cat AND a dog"}, "prompt", "AND"),
        ({"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.controlnet.args[0].model", "ControlNet model"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers", "between 1 and 12"),
        ({"override_settings": {"sd_vae": 3}}, "override_settings.sd_vae", "VAE file name"),
        ({"restore_faces": True}, "restore_faces", "not supported"),
    ],
)
def test_invalid_parameters_name_the_field(settings, body, field, words):
    err = invalid(body, settings)
    assert err.field == field
    assert words in err.message, err.message


def test_envelope_errors_are_prefixed(settings):
    err = invalid({"payload": {"width": 12}}, settings)
    assert err.field == "payload.width"
    err = invalid({"payload": {}, "bogus": 1}, settings)
    assert err.field == "bogus" and "unknown field" in err.message
    err = invalid({"task": "img2img", "payload": {}}, settings)
    assert err.field == "payload.init_images"
    err = invalid({"task": "paint", "payload": {}}, settings)
    assert err.field == "task"


def test_unknown_fields_and_overrides_are_reported_not_dropped_silently(settings):
    job = build_job({"prompt": "(a cat:1.2) <lora:x:0.5>", "frobnicate": 1, "override_settings": {"samples_format": "jpg", "sd_vae": "x.pt"}}, settings)
    text = json.dumps(job.warnings)
    assert "frobnicate" in text and "samples_format" in text and "sd_vae" not in text
    assert job.params.prompt == "(a cat:1.2) <lora:x:0.5>" and job.params.sd_vae == "x.pt"


def test_checkpoint_override_and_clip_skip(settings):
    job = build_job({"override_settings": {"sd_model_checkpoint": "v1-5.safetensors [6ce0161689]", "CLIP_stop_at_last_layers": 2}}, settings)
    assert job.params.checkpoint == "v1-5.safetensors [6ce0161689]"
    assert job.params.clip_stop_at_last_layers == 2


def test_legacy_sampler_name_carries_schedule(settings):
    p = build_job({"sampler_name": "DPM++ 2M Karras"}, settings).params
    assert (p.sampler_name, p.schedule_type) == ("DPM++ 2M", "Karras")


def test_inert_a1111_fields_are_accepted_quietly(settings):
    job = build_job({"hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7, "s_churn": 0, "s_noise": 1, "do_not_save_grid": False}, settings)
    assert job.warnings == []
    job = build_job({"s_churn": 0.5}, settings)
    assert "s_churn" in job.warnings[0]


def test_sdxl_clip_l_skip_override(settings):
    assert build_job({"override_settings": {"sdxl_clip_l_skip": True}}, settings).params.sdxl_clip_l_skip
    assert not build_job({}, settings).params.sdxl_clip_l_skip


def test_prompt_comments_are_dropped_as_in_a1111(settings):
    job = build_job({"prompt": "a cat # not this\non a mat"}, settings)
    assert "not this" not in job.params.prompt and "a cat" in job.params.prompt and "on a mat" in job.params.prompt
    assert job.parameters["prompt"] == "a cat # not this\non a mat"


def test_explicit_model_locations_are_checked_on_arrival(settings):
    from pipelines.errors import Forbidden

    uri = "s3://team-bucket/shared/x.safetensors"
    body = {"task": "txt2img", "payload": {"prompt": "p"}, "models": {"Stable-diffusion": [uri]}}
    with pytest.raises(Forbidden) as local:  # a local store has no S3 to read them through
        build_job(body, settings)
    assert local.value.field == "models.Stable-diffusion[0]"
    on_s3 = settings.model_copy(update={"model_store": "s3://team-bucket/models/"})
    with pytest.raises(Forbidden) as outside:
        build_job(body, on_s3)
    assert "ALLOWED_S3_PREFIXES" in outside.value.message
    allowed = on_s3.model_copy(update={"allowed_s3_prefixes": "s3://team-bucket/shared/"})
    job = build_job(body, allowed)
    assert job.params.checkpoint == "x.safetensors" and job.models.as_dict() == {"Stable-diffusion": [uri]}
    named = build_job({**body, "payload": {"prompt": "p", "override_settings": {"sd_model_checkpoint": "other"}}}, allowed)
    assert named.params.checkpoint == "other"
