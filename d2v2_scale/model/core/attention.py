"""Core attention for Megatron's layer spec, plus the additive attention bias it consumes.

`SDPACoreAttention` is what `SelfAttentionSubmodules.core_attention` builds: Megatron's
`SelfAttention` computes q/k/v with its (tensor-parallel) `linear_qkv`, hands this module the
heads that live on this TP rank, and projects the result with its `linear_proj`.  We call
`torch.nn.functional.scaled_dot_product_attention`: it needs no CUDA-only RNG tracker or memory
buffer (Megatron's stock `DotProductAttention` does, see cpu-distributed-facts.md) and it is the
flash / memory-efficient kernel on GPU.  Its dropout draws from the per-TP-rank stream of
`tp_random.py` (this rank's heads drop independently of the other ranks' heads).

The bias is built once per forward by the encoder (`attention_bias`) and shared by every block:
  * key padding: -inf on padded keys;
  * ALiBi (audio): ``-|i - j| * slope_h * max(scale_h, 0)`` where i, j are the ORIGINAL
    positions of the tokens (the student sees only kept tokens, whose positions are not 0..T-1).
Under tensor parallelism each rank builds the bias for its own heads only.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .tp_random import TP_RANDOM


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi head slopes [H] (Press et al.): a geometric sequence starting at 2^(-8/n) for
    n = the largest power of two <= H; the remaining heads take every other slope of 2n."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(s, dtype=torch.float32)


def attention_bias(batch: int, seq: int, *, positions: Tensor | None = None,
                   key_padding: Tensor | None = None, slopes: Tensor | None = None,
                   scale: Tensor | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> Tensor | None:
    """Additive attention bias [B, H_local | 1, T, T], or None when there is nothing to add.

    positions:   [B, T] int64 original position of each token (None: 0..T-1); only ALiBi uses it.
    key_padding: [B, T] bool, True = padded key (gets -inf); None when no key is padded (the
                 callers' token padding is None then, data/layout.py), so the bias is built
                 without reading the mask back to the host.
    slopes:      [H_local] ALiBi slopes of this rank's heads (None: no ALiBi).
    scale:       [H_local] learned ALiBi scale of this rank's heads, clamped at 0 here.
    """
    bias = None
    if slopes is not None:
        if positions is None:
            positions = torch.arange(seq, device=device).expand(batch, seq)
        dist = (positions[:, :, None] - positions[:, None, :]).abs().to(dtype)  # [B, T, T]
        per_head = slopes.to(device=dist.device, dtype=dtype)
        if scale is not None:
            per_head = per_head * scale.clamp_min(0).to(dtype)
        bias = -dist[:, None] * per_head[None, :, None, None]  # [B, H, T, T]
    if key_padding is not None:
        pad = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
        pad = pad.masked_fill(key_padding, float("-inf"))[:, None, None, :]  # [B, 1, 1, T]
        bias = pad if bias is None else bias + pad
    return bias


class SDPACoreAttention(nn.Module):
    """Megatron core-attention drop-in: q, k, v [T, B, h_local, hd] -> [T, B, h_local * hd].

    `attention_mask` is the additive float bias from `attention_bias` ([B, h_local|1, T, T]) or
    None.  Set `recompute = True` for "selective" activation checkpointing: the attention
    probabilities (the big activation) are recomputed in backward instead of kept.
    """

    def __init__(self, config, layer_number: int = 1, attn_mask_type=None, attention_type: str = "self",
                 softmax_scale: float | None = None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__()
        self.config = config
        self.dropout_p = float(config.attention_dropout)
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), SDPA's default
        self.recompute = False

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        # [T, B, h, d] -> [B, h, T, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if bias is not None:
            bias = bias.to(q.dtype)
        p = self.dropout_p if self.training else 0.0
        # this rank's heads drop independently of the other TP ranks' (model/core/tp_random.py)
        with TP_RANDOM.fork() if p > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.softmax_scale)
        t, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(t, b, -1)  # [T, B, h*d]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None,
                **kwargs) -> Tensor:
        bias = attention_mask if attention_bias is None else attention_bias
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._attend, query, key, value, bias, use_reentrant=False,
                              context_fn=TP_RANDOM.checkpoint_contexts)
        return self._attend(query, key, value, bias)
