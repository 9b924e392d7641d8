"""Job cost estimates and --max-job-seconds: a shared server refuses a job that would hold it for hours."""
from __future__ import annotations

import time

import pytest

from modules import cmd_args, job_cost, processing
from modules.errors import InvalidParameter
from webui import jobs


def job(side: int, **kw):
    kw = {"prompt": "a", "steps": 20, "sampler_name": "DDIM", **kw}
    return processing.StableDiffusionProcessingTxt2Img(width=side, height=side, **kw)


def test_estimates_grow_with_pixels_steps_batch_and_branches(tiny_model):
    speed = job_cost.measure(tiny_model)
    assert speed.a > 0
    small, big = (job_cost.estimate_seconds(job(s), tiny_model, speed) for s in (64, 512))
    assert big >= 64 * small * 0.99  # 64x the pixels: at least 64x the time (attention grows faster)
    base = job_cost.estimate_seconds(job(64), tiny_model, speed)
    assert job_cost.estimate_seconds(job(64, batch_size=2), tiny_model, speed) == pytest.approx(2 * base)
    assert job_cost.estimate_seconds(job(64, n_iter=3), tiny_model, speed) == pytest.approx(3 * base)
    cfg1 = job_cost.estimate_seconds(job(64, cfg_scale=1), tiny_model, speed)
    perp = job_cost.estimate_seconds(job(64, guidance="Perp-Neg"), tiny_model, speed)
    assert cfg1 == pytest.approx(base / 2) and perp == pytest.approx(1.5 * base)
    heun = job_cost.estimate_seconds(job(64, sampler_name="Heun"), tiny_model, speed)
    assert heun == pytest.approx(2 * base)


def test_the_estimate_is_near_a_real_run(tiny_model):
    speed = job_cost.measure(tiny_model)
    p = job(128, steps=10, do_not_save_samples=True)
    start = time.perf_counter()
    processing.process_images(tiny_model, p)
    real = time.perf_counter() - start
    estimate = job_cost.estimate_seconds(p, tiny_model, speed)
    print(f"estimate {estimate:.3f} s, real {real:.3f} s")
    assert real / 10 < estimate < real * 10  # an order of magnitude: enough to refuse hour-long jobs


def test_max_job_seconds_refuses_with_the_limit_named(tiny_model, tmp_path):
    from webui.context import WebUIContext

    args = cmd_args.parse_args(["--precision", "full", "--ckpt", str(tiny_model.path), "--max-job-seconds", "30",
                                "--ui-settings-file", str(tmp_path / "config.json")])
    ctx = WebUIContext(args, tiny_model)
    ctx.unet_speed()
    start = time.perf_counter()
    with pytest.raises(InvalidParameter, match="max-job-seconds 30") as e:
        jobs.make_job("txt2img", {"prompt": "a", "width": 2048, "height": 2048, "steps": 150, "batch_size": 8,
                                  "n_iter": 100}, ctx)
    assert e.value.field == "max_job_seconds" and time.perf_counter() - start < 2
    assert jobs.make_job("txt2img", {"prompt": "a", "steps": 4}, ctx).p.steps == 4


def test_shared_servers_have_a_limit_by_default():
    assert cmd_args.parse_args([]).max_job_seconds is None
    assert cmd_args.parse_args(["--listen"]).max_job_seconds == cmd_args.SHARED_MAX_JOB_SECONDS
    assert cmd_args.parse_args(["--listen", "--max-job-seconds", "0"]).max_job_seconds == 0
