"""Every supported A1111 sampler runs through a tiny random-weight SD pipeline on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipelines import samplers
from pipelines.errors import InvalidParameter
from pipelines.schedulers import make_scheduler, model_config

# The SD 1.5 scheduler config (public facts of the checkpoint's scheduler_config.json).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")  # torchsde float rounding

REPRESENTATIVE = ("Automatic", "Karras", "Exponential", "SGM Uniform", "Beta")
EXTRA_CASES = [("Euler", "Uniform"), ("Euler", "DDIM"), ("DPM++ 2M", "Uniform")]
STEPS = 3


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins a byte-level BPE (GPT-2/CLIP) uses for bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core box OpenMP spinning made this file 5× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> StableDiffusionPipeline:
    folder = tmp_path_factory.mktemp("tokenizer")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5: the slow-tokenizer keywords (vocab_file=…) are ignored; vocab=/merges= are read.
    tokenizer = CLIPTokenizer(
        vocab=json.loads((folder / "vocab.json").read_text()),
        merges=(folder / "merges.txt").read_text().splitlines()[1:],
        model_max_length=77,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77,
    ))
    scheduler = make_scheduler(samplers.resolve_sampler("Euler", None), SD15_SCHEDULER)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _run(pipe, sampler, schedule, *, seed=0, config=SD15_SCHEDULER, steps=STEPS) -> np.ndarray:
    choice = samplers.resolve_sampler(sampler, schedule)
    pipe.scheduler = make_scheduler(choice, config, seed=seed)
    out = pipe(
        "a cat", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    )
    return out.images[0]


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name in samplers.supported_sampler_names():
        if name in ("DDIM", "PLMS", "UniPC"):  # the schedule type is ignored (as in A1111)
            cases.append((name, "Automatic"))
            continue
        for label in REPRESENTATIVE:
            try:
                samplers.resolve_sampler(name, label)
            except InvalidParameter:
                continue
            cases.append((name, label))
    return cases + EXTRA_CASES


@pytest.fixture(scope="module")
def images(pipe) -> dict[tuple[str, str], np.ndarray]:
    return {case: _run(pipe, *case) for case in _cases()}


def test_every_supported_sampler_and_schedule_gives_a_finite_image(images):
    assert {name for name, _ in images} == set(samplers.supported_sampler_names())
    assert len(images) > 45
    for case, image in images.items():
        assert image.shape == (64, 64, 3), case
        assert np.isfinite(image).all(), case


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("Euler", "Automatic"), ("Euler a", "Automatic")),
        (("Euler", "Automatic"), ("Heun", "Automatic")),
        (("Euler", "Automatic"), ("LMS", "Automatic")),
        (("Euler", "Automatic"), ("Euler", "Karras")),
        (("Euler", "Karras"), ("Euler", "Exponential")),
        (("Euler", "Automatic"), ("Euler", "SGM Uniform")),
        (("Euler", "Automatic"), ("Euler", "DDIM")),
        (("Euler", "Automatic"), ("Euler", "Beta")),
        (("DPM++ 2M", "Automatic"), ("DPM++ 2M", "Uniform")),
        (("DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "Karras")),
        (("DPM++ 2M SDE", "Automatic"), ("DPM++ 2M SDE Heun", "Automatic")),
        (("DPM2", "Automatic"), ("DPM2 a", "Automatic")),
        (("DDIM", "Automatic"), ("PLMS", "Automatic")),
        (("DDIM", "Automatic"), ("UniPC", "Automatic")),
        (("Euler", "Automatic"), ("LCM", "Automatic")),
        (("DPM++ SDE", "Automatic"), ("DPM++ 2M", "Automatic")),
    ],
)
def test_different_samplers_and_schedules_differ(images, a, b):
    assert np.abs(images[a] - images[b]).max() > 1e-4


def test_equivalent_names_give_the_same_image(images):
    # "Automatic" is the sampler's own default; "Uniform" equals "Automatic" without one;
    # Polyexponential at A1111's default rho=1 is exactly the exponential schedule.
    assert np.array_equal(images[("DPM++ 2M", "Automatic")], images[("DPM++ 2M", "Karras")])
    assert np.array_equal(images[("DPM++ 2M SDE", "Automatic")], images[("DPM++ 2M SDE", "Exponential")])
    assert np.array_equal(images[("Euler", "Automatic")], images[("Euler", "Uniform")])


def test_third_order_differs_once_it_gets_to_run(pipe):
    # Below 15 steps diffusers lowers the order of the last two steps, so 3M needs 5 steps to differ from 2M.
    assert np.abs(_run(pipe, "DPM++ 3M SDE", None, steps=5) - _run(pipe, "DPM++ 2M SDE", None, steps=5)).max() > 1e-4


def test_polyexponential_is_exponential(pipe, images):
    assert np.array_equal(_run(pipe, "Euler", "Polyexponential"), images[("Euler", "Exponential")])


def test_dpmpp_sde_noise_follows_the_seed(pipe):
    first, again, other = (_run(pipe, "DPM++ SDE", None, seed=s) for s in (7, 7, 8))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


def test_v_prediction_checkpoint_config_is_kept(pipe, images):
    v_config = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    for sampler in ("Euler", "DPM++ 2M", "DDIM", "Euler a"):
        choice = samplers.resolve_sampler(sampler, None)
        assert make_scheduler(choice, v_config).config.prediction_type == "v_prediction"
        image = _run(pipe, sampler, None, config=v_config)
        assert np.isfinite(image).all()
        assert np.abs(image - images[(sampler, "Automatic")]).max() > 1e-4


def test_sampler_flags_from_the_checkpoint_config_do_not_leak():
    leaky = {**SD15_SCHEDULER, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    euler = make_scheduler(samplers.resolve_sampler("Euler", None), leaky)
    assert euler.config.use_karras_sigmas is False
    dpm = make_scheduler(samplers.resolve_sampler("DPM++ 2M", "Exponential"), leaky)
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    assert (dpm.config.use_karras_sigmas, dpm.config.use_exponential_sigmas) == (False, True)
    assert "use_karras_sigmas" not in model_config(leaky)


def test_timesteps_follow_a1111_spacing():
    def timesteps(sampler, schedule, steps=20):
        scheduler = make_scheduler(samplers.resolve_sampler(sampler, schedule), SD15_SCHEDULER)
        scheduler.set_timesteps(steps)
        return [round(float(t)) for t in scheduler.timesteps]

    # A1111 DDIM/PLMS: range(0, 1000, 1000 // steps) + 1, reversed.
    assert timesteps("DDIM", None) == list(range(951, 0, -50))
    assert timesteps("Euler", "DDIM") == list(range(951, 0, -50))
    # k-diffusion uniform sigmas: t = linspace(999, 0, steps).
    assert np.allclose(timesteps("Euler", None), np.linspace(999, 0, 20), atol=0.5)
    # SGM Uniform: linspace(999, 0, steps + 1)[:-1].
    assert np.allclose(timesteps("Euler", "SGM Uniform"), np.linspace(999, 0, 21)[:-1], atol=1.0)


def test_karras_and_exponential_sigmas_match_the_k_diffusion_formulas():
    scheduler = make_scheduler(samplers.resolve_sampler("Euler", "Karras"), SD15_SCHEDULER)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.numpy()
    lo, hi = sigmas[-2], sigmas[0]
    ramp = np.linspace(0, 1, 10)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert np.allclose(sigmas[:-1], expected, rtol=1e-4) and sigmas[-1] == 0
    scheduler = make_scheduler(samplers.resolve_sampler("Euler", "Exponential"), SD15_SCHEDULER)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.numpy()
    assert np.allclose(sigmas[:-1], np.exp(np.linspace(np.log(hi), np.log(lo), 10)), rtol=1e-4)
