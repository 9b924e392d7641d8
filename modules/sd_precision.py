"""How a loaded model computes: per-component dtypes, channels-last, the attention kernel, torch.compile.

On a CPU with bfloat16 instructions (AVX512-BF16, AMX) a bfloat16 UNet runs about twice as fast
as float32. Only the networks run in bfloat16: the sampler keeps its latents, noise and guidance
in float32 (`SDModel.sample_dtype`), and `upcast_io` makes the UNet take float32 in and give
float32 out, so the sampler's arithmetic (the part that accumulates over steps) is exact as before.
The timestep is never cast (bfloat16 cannot hold 981).

Everything is explicit: `PrecisionOptions` comes from the flags (`options_from_args`) or from the
caller, and `apply` sets it on one model's modules; nothing here is global.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("sd_precision")

ATTENTION = ("sdpa", "classic")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) that oneDNN uses.

    torch's own probes first; /proc/cpuinfo's flags where torch has none (both must agree that
    oneDNN is there: without it bfloat16 matmuls are emulated and slower than float32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    if probes:
        return any(p() for p in probes)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Whether `--precision autocast` (the default) means a bfloat16 UNet and text encoder on a CPU with bfloat16 (issue 21's
# rule: where the embedded model's evaluation in bfloat16 keeps float32's figures within one image, README "Speed").
# Measured on an AMD EPYC with AVX512-BF16: the figures within one image, the SD 1.5-shaped txt2img 0.48x diffusers'
# float32 time, the embedded model's UNet 0.94x float32's. A CPU without bfloat16 instructions stays float32 (emulated
# bfloat16 is several times slower); `--precision full` / `--no-half` give float32 anywhere.
CPU_BF16_DEFAULT = True


@dataclass(frozen=True)
class PrecisionOptions:
    """None for a dtype: load_model's default for the device (fp16 on CUDA, float32 on the CPU)."""

    unet_dtype: torch.dtype | None = None
    text_dtype: torch.dtype | None = None
    vae_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    attention: str = "sdpa"
    compile_backend: str = "inductor"  # torch.compile's backend; inductor needs a C++ compiler on the CPU

    def describe(self) -> str:
        def name(d):
            return "default" if d is None else str(d).replace("torch.", "")

        parts = [f"UNet {name(self.unet_dtype)}", f"text encoder {name(self.text_dtype)}", f"VAE {name(self.vae_dtype)}",
                 f"attention {self.attention}"]
        return ", ".join(parts + (["channels-last"] if self.channels_last else [])
                         + (["compiled"] if self.compile else []))


def options_from_args(args, device: str | torch.device | None = None) -> PrecisionOptions:
    """The flags -> PrecisionOptions. `--precision full` / `--no-half` mean float32 everywhere (they win
    over the bf16 flags); `--precision autocast` (the default) gives a bfloat16 UNet and text encoder on a
    CPU with bfloat16 (CPU_BF16_DEFAULT); `--unet-in-bf16` / `--clip-in-bf16` / `--vae-in-bf16` ask
    for each explicitly (anywhere bfloat16 runs)."""
    device = torch.device(device or getattr(args, "device", None)
                          or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = bool(getattr(args, "no_half", False)) or getattr(args, "precision", "autocast") == "full"
    bf16 = torch.bfloat16
    unet = text = vae = None
    if not full:
        auto = (device.type == "cpu" and getattr(args, "precision", "autocast") == "autocast"
                and CPU_BF16_DEFAULT and cpu_supports_bf16())
        unet = bf16 if getattr(args, "unet_in_bf16", False) or auto else None
        text = bf16 if getattr(args, "clip_in_bf16", False) or auto else None
        vae = bf16 if getattr(args, "vae_in_bf16", False) else None
    attention = getattr(args, "attention", None) or "sdpa"
    return PrecisionOptions(unet_dtype=unet, text_dtype=text, vae_dtype=vae,
                            channels_last=bool(getattr(args, "opt_channelslast", False)),
                            compile=bool(getattr(args, "compile", False)), attention=attention)


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def upcast_io(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make a `dtype` UNet take and give float32: the sample, `encoder_hidden_states` and
    `added_cond_kwargs` are cast to `dtype` on the way in (the timestep is not: diffusers makes its
    embedding in float32 itself), the output to float32 on the way out. Forward hooks, so diffusers'
    own pipeline (training/evaluate.py) and the engine run the very same thing."""
    if getattr(unet, "_sdneg_upcast_io", None) is not None:
        return

    def before(module, args, kwargs):
        if args:
            args = (_cast_floats(args[0], dtype), *args[1:])
        for key in ("sample", "encoder_hidden_states", "added_cond_kwargs"):
            if key in kwargs:
                kwargs[key] = _cast_floats(kwargs[key], dtype)
        return args, kwargs

    def after(module, args, kwargs, output):
        if isinstance(output, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in output)
        if hasattr(output, "sample"):
            output.sample = output.sample.float()
        return output

    unet._sdneg_upcast_io = (unet.register_forward_pre_hook(before, with_kwargs=True),
                             unet.register_forward_hook(after, with_kwargs=True))


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """"sdpa": torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, its default);
    "classic": the explicit softmax(QK^T)V of diffusers' AttnProcessor (for comparison, or old torch)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if not hasattr(unet, "set_attn_processor"):
        return
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def cast_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype=dtype)`, without diffusers' warning about modules to keep in float32 when the model has
    none: diffusers warns on every cast of a model, even for an empty list, and a bfloat16 CPU default would print
    it at every start. A model that lists some goes through diffusers' `to`, warning and all."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
    else:
        torch.nn.Module.to(module, dtype=dtype)


def cast_modules(unet, vae, encoders, opts: PrecisionOptions, device: str | torch.device = "cpu") -> None:
    """The dtypes and memory format of `opts`, before the modules are placed or offloaded.

    On a CPU a bfloat16 UNet or VAE is always channels-last: torch sends a contiguous bfloat16 conv2d
    to its reference kernel (`_slow_conv2d_forward`) unless the CPU has AVX-512, and channels-last to
    oneDNN (a 128-channel 3x3 conv at batch 16, 16x16, on an AVX2-only EPYC: 1973 ms against 143 ms;
    no difference where bfloat16 is native)."""
    if opts.unet_dtype is not None and unet.dtype != opts.unet_dtype:
        cast_to(unet, opts.unet_dtype)
    if opts.unet_dtype is not None and opts.unet_dtype != torch.float32:
        upcast_io(unet, opts.unet_dtype)
    if opts.text_dtype is not None:
        for encoder in encoders:
            cast_to(encoder, opts.text_dtype)
    if opts.vae_dtype is not None:
        cast_to(vae, opts.vae_dtype)
    # from the modules' dtypes, whichever flag or `dtype` argument gave them
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and any(m.dtype == torch.bfloat16 for m in (unet, vae, *encoders)) and not cpu_supports_bf16():
        log.warning("bfloat16 asked for, but this CPU has no bfloat16 instructions (AVX512-BF16 / AMX): it is "
                    "emulated and several times slower than float32 here")
    for module in (unet, vae):
        if opts.channels_last or (on_cpu and module.dtype == torch.bfloat16):
            module.to(memory_format=torch.channels_last)
    set_attention(unet, opts.attention)


@dataclass
class CompiledUNet:
    """torch.compile of one model's UNet, called instead of the module by `SDModel.apply_model`.

    Static shapes: each new (batch, latent size, context length) compiles once, the first time it is
    called (minutes for SD 1.5 on a CPU), and is reused by every later job of the same shapes.
    `compile_seconds` holds each shape's first-call time; `take_report` hands the new ones to the job
    that paid for them (its infotext comment and the log). The module itself stays `model.unet`, so
    its config, LoRA layers and attention processors are the same objects the compiled code reads
    (a change to them is caught by dynamo's guards and compiles again).
    """

    unet: torch.nn.Module
    backend: str = "inductor"
    compiled: object = field(init=False, repr=False)
    compile_seconds: dict = field(default_factory=dict)
    _unreported: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.compiled = torch.compile(self.unet, dynamic=False, backend=self.backend)

    def __call__(self, x: torch.Tensor, t, **kwargs):
        # a 0-dim float64 tensor (what diffusers makes of a Python float): a float would be a new constant
        # each step, a recompile
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device) if not isinstance(t, torch.Tensor) else t
        cond = kwargs.get("encoder_hidden_states")
        key = (tuple(x.shape), tuple(cond.shape) if isinstance(cond, torch.Tensor) else None, str(x.dtype))
        if key in self.compile_seconds:
            return self.compiled(x, t, **kwargs)
        start = time.perf_counter()
        out = self.compiled(x, t, **kwargs)
        self.compile_seconds[key] = seconds = time.perf_counter() - start
        self._unreported.append(seconds)
        log.info("compiled the UNet for input %s in %.1f s", key[0], seconds)
        return out

    def take_report(self) -> str:
        """"UNet compiled for this job's shapes in N s" once, for the job that compiled; else ""."""
        if not self._unreported:
            return ""
        seconds, self._unreported = sum(self._unreported), []
        return f"torch.compile: the UNet was compiled for this job's shapes in {seconds:.1f} s (once per shape)"


def compiler_missing(backend: str = "inductor") -> str | None:
    """Why torch.compile cannot work here, or None: inductor on the CPU writes and builds C++ (g++ / c++ / $CXX)."""
    if backend != "inductor" or torch.cuda.is_available():
        return None
    if any(shutil.which(c) for c in filter(None, [os.environ.get("CXX"), "g++", "c++", "clang++"])):
        return None
    return "torch.compile (inductor) on the CPU needs a C++ compiler (g++, from Debian's build-essential / g++ package)"


def compile_unet(unet: torch.nn.Module, opts: PrecisionOptions) -> CompiledUNet | None:
    """The compiled UNet `opts` asks for, or None (not asked, or no compiler: then eager, with a warning)."""
    if not opts.compile:
        return None
    missing = compiler_missing(opts.compile_backend)
    if missing:
        log.warning("--compile ignored, the UNet runs eagerly: %s", missing)
        return None
    return CompiledUNet(unet, opts.compile_backend)


def compile_count() -> int:
    """Graphs dynamo has compiled in this process (torch._dynamo's own counter), for tests and benchmarks."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
