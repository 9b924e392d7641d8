"""modules/interrupt.py: a job can be interrupted in the middle of a UNet call.

On the tiny UNet of tests/tiny_sd.py (diffusers' UNet2DConditionModel): a flag set from
another thread while a forward runs stops that forward before it completes; with the flag
never set the output is bit-equal to the UNet without hooks; no hook outlives the `with`.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from modules import interrupt
from modules.errors import InterruptedException


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet", local_files_only=True)
    return model.eval()


def unet_inputs(unet, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn((batch, unet.config.in_channels, size, size), generator=g)
    context = torch.randn((batch, 77, unet.config.cross_attention_dim), generator=g)
    return sample, torch.tensor([500] * batch), context


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_pre_hooks for m in model.modules())


def test_points_are_the_sub_blocks(unet):
    points = interrupt.interrupt_points(unet)
    assert points[0] is unet and len(points) == len({id(p) for p in points})
    expected = [unet]
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for part in ("resnets", "attentions", "downsamplers", "upsamplers"):
            expected += list(getattr(block, part, None) or [])
    assert points == expected
    kinds = {type(p).__name__ for p in points[1:]}
    assert {"ResnetBlock2D", "Transformer2DModel"} <= kinds
    assert len(points) > 10


def test_flag_set_from_another_thread_stops_the_forward_before_it_completes(unet):
    sample, t, context = unet_inputs(unet)
    points = interrupt.interrupt_points(unet)[1:]
    finished: list[torch.nn.Module] = []
    counters = [p.register_forward_hook(lambda m, a, o: finished.append(m)) for p in points]
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=context)
        total = len(finished)
        assert total >= len(points)

        # The forward runs in a worker thread (as jobs do); when it reaches the 4th sub-block
        # it tells this thread, which sets the flag, and only then goes on.
        finished.clear()
        reached, flag_set, stop = threading.Event(), threading.Event(), threading.Event()

        def pause_here(module, args):
            reached.set()
            assert flag_set.wait(10)

        pause = points[3].register_forward_pre_hook(pause_here)
        outcome: list[BaseException | str] = []

        def run() -> None:
            try:
                with interrupt.interruptible(unet, stop.is_set), torch.no_grad():
                    unet(sample, t, encoder_hidden_states=context)
                outcome.append("completed")
            except BaseException as e:  # noqa: BLE001 - the test looks at what it was
                outcome.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        assert reached.wait(30)
        stop.set()  # from this thread, while the worker is inside the UNet call
        flag_set.set()
        worker.join(30)
        pause.remove()
    finally:
        for handle in counters:
            handle.remove()
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], InterruptedException), outcome
    assert 0 < len(finished) < total  # some sub-blocks ran, the forward did not complete
    assert points[3] not in finished  # stopped right where the flag was first seen
    assert no_hooks_left(unet)


def test_never_set_flag_gives_bit_equal_output_and_overhead_is_small(unet, capsys):
    sample, t, context = unet_inputs(unet)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return False

    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=context).sample
        with interrupt.interruptible(unet, should_stop) as points:
            hooked = unet(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(plain, hooked)
    assert len(calls) >= len(points)  # every sub-block asked (some run more than once)
    assert no_hooks_left(unet)

    def timed(hooks: bool, n: int = 20) -> float:
        best = float("inf")
        for _ in range(n):
            start = time.perf_counter()
            with torch.no_grad():
                if hooks:
                    with interrupt.interruptible(unet, lambda: False):
                        unet(sample, t, encoder_hidden_states=context)
                else:
                    unet(sample, t, encoder_hidden_states=context)
            best = min(best, time.perf_counter() - start)
        return best

    timed(False, 3)
    without, with_hooks = timed(False), timed(True)
    with capsys.disabled():
        print(f"\n[interrupt] tiny UNet forward: {without * 1e3:.2f} ms without hooks, {with_hooks * 1e3:.2f} ms with "
              f"{len(points)} hooks (+{(with_hooks - without) * 1e3:.3f} ms, incl. registering and removing them)")


def test_hooks_are_removed_on_exit_on_error_and_when_nested(unet):
    sample, t, context = unet_inputs(unet, batch=1)
    with interrupt.interruptible(unet, lambda: False) as points:
        assert all(len(p._forward_pre_hooks) == 1 for p in points)
        with interrupt.interruptible(unet, lambda: True):
            assert all(len(p._forward_pre_hooks) == 2 for p in points)
            with pytest.raises(InterruptedException), torch.no_grad():
                unet(sample, t, encoder_hidden_states=context)
        assert all(len(p._forward_pre_hooks) == 1 for p in points)  # the inner one removed only its own
    assert no_hooks_left(unet)

    with pytest.raises(RuntimeError, match="boom"):
        with interrupt.interruptible(unet, lambda: False):
            raise RuntimeError("boom")
    assert no_hooks_left(unet)

    with pytest.raises(InterruptedException):  # an interrupted call leaves nothing behind either
        with interrupt.interruptible(unet, lambda: True), torch.no_grad():
            unet(sample, t, encoder_hidden_states=context)
    assert no_hooks_left(unet)
    with torch.no_grad():  # and the UNet works as before
        assert torch.isfinite(unet(sample, t, encoder_hidden_states=context).sample).all()


def test_other_denoisers_get_checks_too():
    class Transformerish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for block in self.transformer_blocks:
                x = block(x)
            return x

    model = Transformerish()
    assert interrupt.interrupt_points(model) == [model, *model.transformer_blocks]
    seen = []

    def stop_after_two() -> bool:
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(InterruptedException), interrupt.interruptible(model, stop_after_two):
        model(torch.zeros(1, 4))
    assert len(seen) == 3 and no_hooks_left(model)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert interrupt.interrupt_points(plain) == [plain, *plain.children()]


def test_a_job_stops_inside_a_step_and_returns_the_last_prediction(tiny_model):
    """process_images: an interrupt that arrives while the UNet runs stops that step, not the next one."""

    from modules import processing
    from modules.job_state import JobState

    state = JobState()
    calls = {"n": 0}
    real = tiny_model.unet.forward

    def counting(*args, **kw):  # the flag is set while step 3's UNet call runs
        calls["n"] += 1
        if calls["n"] == 3:
            state.interrupt()
        return real(*args, **kw)

    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", steps=10, width=64, height=64, seed=1,
                                                    sampler_name="DDIM", do_not_save_samples=True)
    tiny_model.unet.forward = counting
    try:
        processed = processing.process_images(tiny_model, p, state=state)
    finally:
        del tiny_model.unet.forward
    assert processed.interrupted and len(processed.images) == 1
    assert state.current_step_info.step == 1  # steps 1 and 2 finished; step 3 stopped inside its UNet call
    assert calls["n"] == 3
