"""ControlNet loading and per-unit injection on tiny models (original single-file layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.checkpoint import load_pipeline
from pipelines.control_hook import (
    BALANCED,
    CONTROL,
    PROMPT,
    ControlHook,
    HookUnit,
    hint_tensor,
    residual_scales,
)
from pipelines.controlnet import check_compatible, load_controlnet
from pipelines.errors import InvalidParameter, ModelRejected
from pipelines.params import Txt2ImgParams
from pipelines.txt2img import txt2img
from tests.support.controlnet_files import (
    build_tiny_controlnet,
    write_diffusers_controlnet,
    write_original_controlnet,
    write_pickle_bomb,
)

torch.set_num_threads(1)
SIZE = 64


@pytest.fixture(scope="module")
def sd1(tiny_sd1_checkpoint):
    return load_pipeline(tiny_sd1_checkpoint)


@pytest.fixture(scope="module")
def cn_files(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    return {
        "a": write_original_controlnet(folder, "cn-a", sd1.pipe.unet, seed=1),
        "b": write_original_controlnet(folder, "cn-b", sd1.pipe.unet, seed=2),
        "pth": write_original_controlnet(folder, "cn-pth", sd1.pipe.unet, seed=1, suffix=".pth"),
    }


@pytest.fixture(scope="module")
def nets(cn_files):
    return {k: load_controlnet(cn_files[k]).model for k in ("a", "b")}


def _hint(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return hint_tensor(img, device="cpu", dtype=torch.float32)


def _params(**kw) -> Txt2ImgParams:
    base = {"prompt": "a photo of a cat", "negative_prompt": "", "seeds": [7], "subseeds": [0], "subseed_strength": 0.0,
            "sampler_name": "Euler", "schedule_type": "Automatic", "steps": 3, "cfg_scale": 7.0, "width": SIZE,
            "height": SIZE, "batch_size": 1, "n_iter": 1}
    return Txt2ImgParams(**{**base, **kw})


def _run(loaded, units, *, record=False, **kw):
    hook = ControlHook(loaded.pipe, units, record=record)
    with hook:
        images = txt2img(loaded.pipe, dict(loaded.pipe.scheduler.config), _params(**kw))
    return np.asarray(images[0], dtype=np.int16), hook


def _unit(net, index=0, hint_seed=0, **kw) -> HookUnit:
    return HookUnit(index=index, controlnet=net, hint=_hint(hint_seed), **kw)


def test_original_layout_loads_exactly(sd1, cn_files):
    ref = build_tiny_controlnet(sd1.pipe.unet, seed=1).state_dict()
    for key in ("a", "pth"):
        loaded = load_controlnet(cn_files[key])
        assert loaded.layout == "original" and loaded.family == "sd1"
        got = loaded.model.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_diffusers_folder_and_unsafe_pickle(sd1, tmp_path):
    folder = write_diffusers_controlnet(tmp_path / "cn-diff", sd1.pipe.unet, seed=1)
    loaded = load_controlnet(folder)
    assert loaded.layout == "diffusers"
    bomb = write_pickle_bomb(tmp_path / "evil.pth")
    with pytest.raises(ModelRejected, match="refusing to unpickle"):
        load_controlnet(bomb)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelRejected):
        load_controlnet(tmp_path / "junk.safetensors")


def test_sdxl_controlnet_on_sd1_checkpoint_is_refused(sd1, tmp_path):
    from pipelines.tiny import build_tiny_pipeline

    xl = build_tiny_pipeline("sdxl", 0)
    loaded = load_controlnet(write_original_controlnet(tmp_path, "cn-xl", xl.unet, seed=1))
    assert loaded.family == "sdxl"
    with pytest.raises(InvalidParameter) as err:
        check_compatible(loaded, sd1.pipe.unet, "sd1", name="cn-xl", checkpoint="tiny-sd1", field="args[0].model")
    assert "SDXL" in err.value.message and "SD1" in err.value.message and err.value.field == "args[0].model"


def test_soft_injection_scales():
    assert residual_scales(13, 1.0, BALANCED) == [1.0] * 13
    soft = residual_scales(13, 2.0, PROMPT)
    assert soft[12] == 2.0 and soft[0] == pytest.approx(2.0 * 0.825**12)
    assert residual_scales(10, 1.0, CONTROL) == residual_scales(13, 1.0, CONTROL)[:10]


def test_one_unit_changes_the_image_and_weight_zero_does_not(sd1, nets):
    base, _ = _run(sd1, [])
    with_cn, _ = _run(sd1, [_unit(nets["a"])])
    assert np.abs(with_cn - base).max() > 10
    zero, _ = _run(sd1, [_unit(nets["a"], weight=0.0)])
    assert np.array_equal(zero, base)
    # the hook is gone after the block
    assert np.array_equal(_run(sd1, [])[0], base)
    # a batch: the hint follows the batch size (and the conditional half only, in ControlNet mode)
    hook = ControlHook(sd1.pipe, [_unit(nets["a"], mode=CONTROL)])
    with hook:
        batch = txt2img(sd1.pipe, dict(sd1.pipe.scheduler.config), _params(batch_size=2, seeds=[7, 8], subseeds=[0, 0], steps=2))
    assert len(batch) == 2


def test_modes_weights_and_units_differ(sd1, nets):
    images = {mode: _run(sd1, [_unit(nets["a"], mode=mode)])[0] for mode in (BALANCED, PROMPT, CONTROL)}
    for m1, m2 in ((BALANCED, PROMPT), (BALANCED, CONTROL), (PROMPT, CONTROL)):
        assert np.abs(images[m1] - images[m2]).max() > 3, (m1, m2)
    two, _ = _run(sd1, [_unit(nets["a"], weight=1.0), _unit(nets["b"], index=1, hint_seed=1, weight=0.5, mode=PROMPT)])
    two_other, _ = _run(sd1, [_unit(nets["a"], weight=0.5, guidance_end=0.5), _unit(nets["b"], index=1, hint_seed=1, weight=1.0)])
    assert np.abs(two - images[BALANCED]).max() > 3
    assert np.abs(two - two_other).max() > 3


def test_guidance_ranges_switch_at_the_right_steps(sd1, nets):
    units = [_unit(nets["a"], guidance_start=0.0, guidance_end=0.5), _unit(nets["b"], index=3, guidance_start=0.5, guidance_end=1.0)]
    _, hook = _run(sd1, units, record=True, steps=4)
    # A1111: unit acts when start <= step/steps <= end; steps 0..3 → 0, .25, .5, .75
    assert [(c.step, c.units) for c in hook.calls] == [(0, [0]), (1, [0]), (2, [0, 3]), (3, [3])]
    # a second-order sampler calls the UNet twice per step; both calls share the step
    _, heun = _run(sd1, units, record=True, steps=3, sampler_name="Heun")
    steps = [c.step for c in heun.calls]
    assert steps == [0, 0, 1, 1, 2] and all(c.steps == 3 for c in heun.calls)
    assert [c.units for c in heun.calls] == [[0], [0], [0], [0], [3]]  # 0, 1/3 → unit 0; 2/3 → unit 3


def test_sdxl_unit_changes_the_image(tiny_sdxl_checkpoint, tmp_path):
    xl = load_pipeline(tiny_sdxl_checkpoint)
    net = load_controlnet(write_original_controlnet(tmp_path, "cn-xl", xl.pipe.unet, seed=4)).model
    check_compatible(load_controlnet(tmp_path / "cn-xl.safetensors"), xl.pipe.unet, "sdxl", name="cn-xl", checkpoint="x", field="f")
    base, _ = _run(xl, [], steps=2)
    for mode in (BALANCED, CONTROL):
        out, hook = _run(xl, [_unit(net, mode=mode)], steps=2, record=True)
        assert np.abs(out - base).max() > 3 and all(c.units == [0] for c in hook.calls)


@pytest.mark.parametrize("folder, unet, params", [
    ("controlnet-sd15", "sd15", 361_279_120),  # ControlNet v1.1 SD1.5, as published
    ("controlnet-sd21", "sd21", None),
    ("controlnet-sdxl", "sdxl-base", 1_251_014_160),  # diffusers/controlnet-canny-sdxl-1.0
])
def test_bundled_configs_match_their_unets(folder, unet, params):
    import json
    from pathlib import Path

    from diffusers import ControlNetModel

    root = Path(__file__).resolve().parents[2] / "container" / "configs"
    cn = json.loads((root / folder / "config.json").read_text())
    un = json.loads((root / unet / "unet" / "config.json").read_text())
    shared = [k for k in cn if k in un and not k.startswith("_")]
    assert len(shared) > 15 and {k: cn[k] for k in shared} == {k: un[k] for k in shared}
    with torch.device("meta"):
        model = ControlNetModel.from_config(cn)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_hires_second_pass_gets_its_own_hint_and_hr_option(sd1, nets):
    from pipelines.hires import txt2img_hires
    from pipelines.params import HiresParams

    hires = HiresParams(width=96, height=96, upscale_to=(96, 96), upscaler="Latent", steps=2, denoising_strength=0.5,
                        sampler_name="Euler", schedule_type="Automatic", prompt="a photo of a cat", negative_prompt="", scale=1.5)
    source = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    units = [HookUnit(0, nets["a"], hint_tensor(source.resize((SIZE, SIZE)), device="cpu", dtype=torch.float32), source=source),
             HookUnit(1, nets["b"], _hint(1), hr_option="Low res only")]
    hook = ControlHook(sd1.pipe, units, record=True)
    with hook:
        images = txt2img_hires(sd1.pipe, dict(sd1.pipe.scheduler.config), _params(steps=2, hires=hires))
    assert images[0].size == (96, 96)
    assert [c.units for c in hook.calls] == [[0, 1], [0, 1], [0], [0]]  # first pass both, second pass unit 0 only
    assert (96, 96) in units[0]._hints and not units[1]._hints
