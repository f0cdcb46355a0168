"""Megatron parameter names / TP shards <-> the plain twin's names (twins/encoder.py).

Megatron side ("megatron names"): the training model's state dict, encoder under `encoder.`:
    encoder.blocks.{i}.self_attention.linear_qkv.{weight,bias}  TP-split on dim 0 by head;
        rows inside a rank: for each local head h: [q_h (hd rows), k_h, v_h]   (interleaved)
    encoder.blocks.{i}.self_attention.linear_proj.weight        TP-split on dim 1 (bias replicated)
    encoder.blocks.{i}.mlp.linear_fc1.{weight,bias}              TP-split on dim 0
    encoder.blocks.{i}.mlp.linear_fc2.weight                     TP-split on dim 1 (bias replicated)
    encoder.alibi_scale                                          TP-split on dim 0 (by head)
    BEiT (model/modalities/beit.py): ...linear_qkv.{q_bias,v_bias} TP-split on dim 0 (by head, no reorder:
    [H*hd] on both sides); encoder.rel_pos_bias.table TP-split on dim 1 (its columns are the heads)
    everything else                                              replicated
Plain side: see twins/encoder.py (qkv rows are [q all heads; k all heads; v all heads]).

Because heads are assigned to ranks contiguously, concatenating the per-rank qkv shards along
dim 0 gives the full interleaved [H, 3, hd, D] tensor; only the q/k/v <-> head reorder differs.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# (regex on the megatron name, partition dim); the first match wins; no match = replicated
_PARTITION_RULES = [
    (r"\.self_attention\.linear_qkv\.(weight|bias)$", 0),
    (r"\.self_attention\.linear_proj\.weight$", 1),
    (r"\.mlp\.linear_fc1\.(weight|bias)$", 0),
    (r"\.mlp\.linear_fc2\.weight$", 1),
    (r"(^|\.)alibi_scale$", 0),
    # BEiT (model/modalities/beit.py): q/v biases by head like the qkv rows; the relative position table's
    # columns are the heads
    (r"\.self_attention\.linear_qkv\.(q_bias|v_bias)$", 0),
    (r"(^|\.)rel_pos_bias\.table$", 1),
]

_RENAMES = [  # megatron -> plain (inside a block); specific names before the prefixes they contain
    (".self_attention.linear_qkv.q_bias", ".attn.q_bias"),  # BEiT (twins/beit.py): heads-contiguous,
    (".self_attention.linear_qkv.v_bias", ".attn.v_bias"),  # no reorder
    (".self_attention.linear_qkv.", ".attn.qkv."),
    (".self_attention.linear_proj.", ".attn.proj."),
    (".mlp.linear_fc1.", ".mlp.fc1."),
    (".mlp.linear_fc2.", ".mlp.fc2."),
]


def partition_dim(name: str) -> int | None:
    """TP partition dim of a megatron-named parameter (None = replicated)."""
    for pat, dim in _PARTITION_RULES:
        if re.search(pat, name):
            return dim
    return None


def partition_dims_from_module(module: nn.Module) -> dict[str, int | None]:
    """The same information read from Megatron's parameter attributes (for cross-checks)."""
    return {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for n, p in module.named_parameters()}


def clean_state_dict(sd: dict) -> dict:
    """Drop Megatron's `_extra_state` entries (TE metadata, empty here)."""
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


# ---------------------------------------------------------------------------------------------
# TP shards
# ---------------------------------------------------------------------------------------------


def merge_tp_shards(shards: list[dict]) -> dict:
    """Per-rank state dicts (rank order) -> full tensors, megatron names and layout."""
    out = {}
    for k in clean_state_dict(shards[0]):
        dim = partition_dim(k)
        out[k] = torch.cat([s[k] for s in shards], dim=dim) if dim is not None and len(shards) > 1 \
            else shards[0][k]
    return out


def split_tp(full: dict, rank: int, size: int) -> dict:
    """Full megatron-named tensors -> this TP rank's shard."""
    out = {}
    for k, v in clean_state_dict(full).items():
        dim = partition_dim(k)
        out[k] = v.chunk(size, dim=dim)[rank].clone() if dim is not None and size > 1 else v
    return out


def _tp_group():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), \
            ps.get_tensor_model_parallel_rank()
    return None, 1, 0


@torch.no_grad()
def gather_tp(named: dict) -> dict:
    """{megatron name: this rank's shard} -> {name: full tensor}; collective over the TP group
    (every TP rank must call it with the same names).  Works for weights and gradients alike."""
    import torch.distributed as dist

    group, size, _ = _tp_group()
    named = {k: v.detach().clone() for k, v in clean_state_dict(named).items()}
    if size == 1:
        return named
    out = {}
    for k, v in named.items():
        dim = partition_dim(k)
        if dim is None:
            out[k] = v
            continue
        parts = [torch.empty_like(v) for _ in range(size)]
        dist.all_gather(parts, v.contiguous(), group=group)
        out[k] = torch.cat(parts, dim=dim)
    return out


def gather_tp_state_dict(module: nn.Module) -> dict:
    """This TP group's full (unsharded) state dict, megatron names; collective over the TP group."""
    return gather_tp(module.state_dict())


@torch.no_grad()
def load_full_state_dict(module: nn.Module, full: dict, strict: bool = True) -> None:
    """Load full megatron-named tensors into a (possibly TP-sharded) module: each rank takes its
    shard.  strict: the key sets must match exactly (ignoring `_extra_state`)."""
    _, size, rank = _tp_group()
    sd = split_tp(full, rank, size)
    if strict:
        own = set(clean_state_dict(module.state_dict()))
        missing, unexpected = own - set(sd), set(sd) - own
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    module.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------------------------
# megatron <-> plain
# ---------------------------------------------------------------------------------------------


def _qkv_to_plain(w: Tensor, heads: int) -> Tensor:
    """[H*3*hd, ...] interleaved per head -> [3*H*hd, ...] (q all heads, k, v)."""
    rest = w.shape[1:]
    hd = w.shape[0] // (3 * heads)
    return w.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


def _qkv_to_megatron(w: Tensor, heads: int) -> Tensor:
    rest = w.shape[1:]
    hd = w.shape[0] // (3 * heads)
    return w.reshape(3, heads, hd, *rest).transpose(0, 1).reshape(3 * heads * hd, *rest)


def megatron_to_plain(full: dict, num_heads: int, prefix: str = "encoder.") -> dict:
    """Full (TP-merged) megatron state dict -> plain twin state dict (encoder only)."""
    out = {}
    for k, v in clean_state_dict(full).items():
        if not k.startswith(prefix):
            continue  # decoder etc. are not part of the encoder
        name = k[len(prefix):]
        for a, b in _RENAMES:
            name = name.replace(a, b)
        if ".attn.qkv." in name:
            v = _qkv_to_plain(v, num_heads)
        out[name] = v.contiguous()
    return out


def plain_to_megatron(plain: dict, num_heads: int, prefix: str = "encoder.") -> dict:
    """Plain twin state dict -> full megatron-named tensors (split with `split_tp`)."""
    out = {}
    for name, v in plain.items():
        if ".attn.qkv." in name:
            v = _qkv_to_megatron(v, num_heads)
        for a, b in _RENAMES:
            name = name.replace(b, a)
        out[prefix + name] = v.contiguous()
    return out
