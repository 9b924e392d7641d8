"""Issue 21: bfloat16, channels-last, torch.compile and the RAM checkpoint cache, on tiny models.

Tolerances (8-bit pixels, mean absolute difference from float32 eager on the same seeds): bfloat16
UNet + text encoder + channels-last <= 2.0 (measured 0.6); a compiled UNet <= 0.1 (measured 0.00004).
The compile test uses torch.compile's `eager` backend: dynamo's capture, guards and cache (what
decides reuse vs recompile) are the real ones; inductor's C++ code generation of even the tiny UNet
takes minutes on this 2-core machine (benchmarks/bench_txt2img.py --compile measures it).
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from modules import cmd_args, options, processing, sd_checkpoint_cache, sd_models, sd_precision
from tests import tiny_checkpoints as tc
from tests.tiny_sd import build_tiny_sd

BF16 = sd_precision.PrecisionOptions(unet_dtype=torch.bfloat16, text_dtype=torch.bfloat16, channels_last=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("speed") / "tiny")


def images(model, size: int = 64, seed: int = 3) -> tuple[np.ndarray, processing.Processed]:
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="a red circle", negative_prompt="blue", steps=3, cfg_scale=7, seed=seed, width=size, height=size,
        batch_size=2, do_not_save_samples=True)
    out = processing.process_images(model, p)
    return np.stack([np.asarray(im, dtype=np.float64) for im in out.images]), out


@pytest.fixture(scope="module")
def reference(folder) -> np.ndarray:
    return images(sd_models.load_model(folder))[0]


@pytest.mark.parametrize("offload", [None, "medvram", "lowvram"])
def test_bf16_channels_last_close_to_float32(folder, reference, offload):
    model = sd_models.load_model(folder, precision=BF16, offload=offload)
    assert model.unet.dtype == torch.bfloat16 and model.cond_stage.text_encoder.dtype == torch.bfloat16
    assert model.dtype == torch.float32  # the sampler's latents stay float32
    got, _ = images(model)
    diff = np.abs(got - reference)
    assert 0 < diff.mean() <= 2.0, diff.mean()
    assert diff.max() <= 32


def test_a_bfloat16_unet_on_the_cpu_is_channels_last_and_float32_is_not(folder, caplog):
    """A contiguous bfloat16 conv2d falls to torch's reference kernel on a CPU without AVX-512 (sd_precision.cast_modules)."""
    def channels_last(module) -> bool:
        return module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    bf16 = sd_models.load_model(folder, precision=sd_precision.PrecisionOptions(unet_dtype=torch.bfloat16))
    plain = sd_models.load_model(folder)
    assert channels_last(bf16.unet) and not channels_last(bf16.vae.decoder)  # the VAE stayed float32, contiguous
    assert not channels_last(plain.unet)
    # the start-up log line reads the same from the weights
    assert bf16.describe_precision() == "UNet bfloat16, text encoder float32, VAE float32, channels-last"
    assert plain.describe_precision() == "UNet float32, text encoder float32, VAE float32"
    warned = any("no bfloat16 instructions" in r.getMessage() for r in caplog.records)
    assert warned == (not sd_precision.cpu_supports_bf16())


def test_flags_to_precision_options():
    parse = cmd_args.parse_args
    full = sd_precision.options_from_args(parse(["--precision", "full", "--unet-in-bf16"]), "cpu")
    assert (full.unet_dtype, full.text_dtype, full.vae_dtype) == (None, None, None)
    asked = sd_precision.options_from_args(parse(["--no-half", "--vae-in-bf16"]), "cpu")
    assert asked.vae_dtype is None  # --no-half keeps its meaning: float32 everywhere
    opts = sd_precision.options_from_args(parse(["--unet-in-bf16", "--vae-in-bf16", "--opt-channelslast", "--compile",
                                                 "--attention", "classic"]), "cpu")
    assert (opts.unet_dtype, opts.vae_dtype, opts.channels_last, opts.compile, opts.attention) == (
        torch.bfloat16, torch.bfloat16, True, True, "classic")
    default = sd_precision.options_from_args(parse([]), "cpu")
    expected = torch.bfloat16 if sd_precision.CPU_BF16_DEFAULT and sd_precision.cpu_supports_bf16() else None
    assert (default.unet_dtype, default.text_dtype, default.vae_dtype) == (expected, expected, None)
    assert sd_models.load_kwargs_from_args(parse([])).get("precision", sd_precision.PrecisionOptions()) == default
    assert sd_models.load_kwargs_from_args(parse(["--unet-in-bf16"]))["precision"].unet_dtype == torch.bfloat16


def test_compiled_unet_is_reused_across_jobs(folder, reference):
    if sd_precision.compiler_missing("eager"):
        pytest.skip(sd_precision.compiler_missing("eager"))
    torch._dynamo.reset()
    opts = sd_precision.PrecisionOptions(compile=True, compile_backend="eager")
    model = sd_models.load_model(folder, precision=opts)
    assert model.compiled_unet is not None
    first, out1 = images(model)
    compiled = sd_precision.compile_count()
    assert compiled >= 1 and "compiled for this job's shapes" in out1.comments
    second, out2 = images(model, seed=4)  # another job, same shapes: no new graph
    assert sd_precision.compile_count() == compiled
    assert "compiled" not in out2.comments
    assert np.abs(first - reference).mean() <= 0.1


def test_checkpoint_cache_hit_copies_without_reading(tmp_path):
    _, file = tc.build("sd1", tmp_path)
    cache = sd_checkpoint_cache.CheckpointCache().configure(options.Options({"sd_checkpoint_cache": 2}))
    assert cache.size == 2
    first = sd_models.load_model(file, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    with mock.patch.object(sd_models, "_read_safetensors", side_effect=AssertionError("file read again")):
        second = sd_models.load_model(file, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    for a, b in zip(first.modules(), second.modules()):
        assert sd_checkpoint_cache.state_dict_equal(a, b)
        assert all(pa.data_ptr() != pb.data_ptr() for pa, pb in zip(a.parameters(), b.parameters()))  # a copy
    with torch.no_grad():
        next(second.unet.parameters()).add_(1.0)  # a change to the served model never reaches the cache
    third = sd_models.load_model(file, cache=cache)
    assert sd_checkpoint_cache.state_dict_equal(first.unet, third.unet)
    # other dtypes are another entry; size 1 keeps only the newest
    sd_models.load_model(file, cache=cache, precision=BF16)
    assert cache.misses == 2 and len(cache) == 2
    cache.configure(options.Options({"sd_checkpoint_cache": 1}))
    assert len(cache) == 1
    cache.configure(options.Options({"sd_checkpoint_cache": 0, "sd_checkpoints_limit": 3}))
    assert cache.size == 3
