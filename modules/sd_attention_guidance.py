"""Normalized Attention Guidance (NAG, Chen et al. 2025, arXiv 2505.21179): the negative prompt acts
inside the UNet's cross-attention layers, so it works at any CFG scale, CFG 1 included.

In every cross-attention layer (`attn2`), for the rows of the UNet batch that carry a prompt, the
attention output is computed twice in the same call, with the prompt's keys and values (Z+) and
with the negative prompt's (Z-), from the same queries, and then

    Z~ = Z+ + (s - 1) (Z+ - Z-)                 extrapolate away from the negative (s = nag_scale)
    Z^ = Z~ * min(r, tau) / r,  r = |Z~|_1 / |Z+|_1   per token: clip the L1 norm at tau times Z+'s
    Z  = alpha Z^ + (1 - alpha) Z+              blend with the plain output

before the layer's output projection. `nag_scale` follows the paper's and its reference code's
convention: s = 1 is no guidance (phi = s - 1 in `Z+ + phi (Z+ - Z-)`).

The processors are installed through diffusers' attention-processor interface
(`unet.attn_processors` / `unet.set_attn_processor`), on `attn2` only; nothing of diffusers'
classes is patched, and `nag_processors` puts the saved processor objects back when the job ends
(also when it fails).

How the negative conditioning reaches the processors: through a small per-job `NAGState` that the
denoiser fills before each UNet call and empties after it, not through `cross_attention_kwargs`.
diffusers does forward `cross_attention_kwargs` to every attention layer, but to the
self-attention layers (`attn1`) too, whose default processor does not take an unknown key and
logs a warning for it on every call (14 lines per UNet call on the embedded model); giving
`attn1` a processor only to swallow the key would touch the layers NAG leaves alone.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NAGCall:
    """NAG's inputs for one UNet call."""

    rows: torch.Tensor  # (R,) long: the batch rows that get NAG (prompt rows whose image has a negative)
    negative: torch.Tensor  # (R, T, C): the negative prompt's token states for those rows
    scale: float | torch.Tensor  # one for all rows, or (R, 1, 1): one per row
    tau: float
    alpha: float


class NAGState:
    """Shared by the NAG processors of one job; the denoiser sets the call's inputs, the processors read them."""

    def __init__(self):
        self.call: NAGCall | None = None

    @contextlib.contextmanager
    def inputs(self, call: NAGCall):
        self.call = call
        try:
            yield
        finally:
            self.call = None


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float | torch.Tensor, tau: float,
                alpha: float) -> torch.Tensor:
    """The paper's Algorithm 1 on attention outputs (..., tokens, channels): extrapolate, clip the
    per-token L1 norm ratio at tau, blend with the positive output. `scale` may be a tensor that
    broadcasts against the outputs (one scale per row)."""
    guided = z_pos * scale - z_neg * (scale - 1)
    norm_pos = z_pos.norm(p=1, dim=-1, keepdim=True)
    norm_guided = guided.norm(p=1, dim=-1, keepdim=True)
    ratio = norm_guided / norm_pos.clamp_min(torch.finfo(z_pos.dtype).tiny)
    guided = torch.where(ratio > tau, guided * (tau / ratio), guided)
    return guided * alpha + z_pos * (1 - alpha)


class NAGAttnProcessor:
    """A cross-attention processor: the layer's own processor when NAG has nothing to do in this call;
    otherwise scaled-dot-product attention (diffusers' AttnProcessor2_0, step for step) with NAG on the
    rows `state.call.rows`."""

    def __init__(self, original, state: NAGState):
        self.original = original
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        call = self.state.call
        if call is None or encoder_hidden_states is None or call.rows.numel() == 0:
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        negative = call.negative.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            negative = attn.norm_encoder_hidden_states(negative)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        def attend(q: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            key, value = heads(attn.to_k(context)), heads(attn.to_v(context))
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2).reshape(q.shape[0], -1, attn.heads * q.shape[-1]).to(q.dtype)

        query = heads(query)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        z = attend(query, encoder_hidden_states, attention_mask)
        rows = call.rows.to(z.device)
        z_neg = attend(query[rows], negative, None)  # the same queries, the negative prompt's keys and values
        z = z.index_copy(0, rows, nag_combine(z[rows], z_neg, call.scale, call.tau, call.alpha))
        hidden_states = attn.to_out[1](attn.to_out[0](z))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_active: "weakref.WeakKeyDictionary[torch.nn.Module, NAGState]" = weakref.WeakKeyDictionary()


def active_state(unet: torch.nn.Module) -> NAGState | None:
    """The NAG state of the job whose processors are installed on `unet`, if any."""
    return _active.get(unet)


def is_cross_attention(name: str) -> bool:
    return name.endswith("attn2.processor")


@contextlib.contextmanager
def nag_processors(unet: torch.nn.Module):
    """Install NAG processors on every cross-attention layer of `unet` for the duration of a job;
    restore the very processor objects that were there before, also after an exception."""
    saved = unet.attn_processors  # {name: processor}, a fresh dict
    state = NAGState()
    unet.set_attn_processor({name: NAGAttnProcessor(proc, state) if is_cross_attention(name) else proc
                             for name, proc in saved.items()})
    _active[unet] = state
    try:
        yield state
    finally:
        _active.pop(unet, None)
        unet.set_attn_processor(dict(saved))
