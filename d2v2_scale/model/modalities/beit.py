"""The BEiT-style ViT of data2vec 1.0 vision (docs/REFERENCE.md §2.4), from Megatron-core parts.

    x = patch_embed(image)                       [B, P, D]   Conv2d(C, D, p, stride p) with bias
    x = x * (1 - w) + mask_token * w             student: w = mask [B, P]; BEFORE the CLS token
    x = [cls; x]                                 [B, 1 + P, D]; no absolute position embedding
    bias = rel_pos_bias()                        [H/tp, 1 + P, 1 + P], one table for all blocks
    block i (pre-LN, eps 1e-6):
        x = x + DropPath_i(gamma_1 * Attn(LN1(x), bias))
        x = x + DropPath_i(gamma_2 * MLP(LN2(x)))          -> block i's "end" tap (teacher targets)
    out = final_norm(x)

Attention is Megatron's `SelfAttention` (as in blocks.py) with a qkv linear that has no bias
but learnable q and v biases (k's is fixed at 0), our SDPA core attention (dropout on this TP
rank's heads from the per-rank stream) and the row-parallel output projection.  DropPath drops a
sample's whole residual branch; it draws from the default generator, identical on all TP ranks
(the branch output is replicated), so TP=2 drops the same samples as TP=1.

Init (BEiT): trunc-normal(0.02, +-1 std) for the linears, the patch conv, CLS and mask token;
biases 0, LayerNorms (1, 0), relative position table 0, layer scales `layer_scale_init`; then
each block's attention output projection and fc2 weights / sqrt(2 * layer_id), layer_id 1-based.

Parameter names (megatron side; twins/mapping.py renames them for the plain twin, twins/beit.py):
    local.proj.{weight [D, C, p, p], bias [D]}           patch embedding
    extra_tokens [1, 1, D]                               CLS (`cls_token`; named as the 2.0 CLS so the
                                                         pipeline and no-weight-decay rules apply)
    mask_token [1, 1, D]
    rel_pos_bias.table [(2h-1)(2w-1) + 3, H/tp]          TP-split over heads (dim 1)
    blocks.{i}.norm1.{weight,bias}, norm2.{weight,bias} [D]
    blocks.{i}.self_attention.linear_qkv.weight [3D/tp, D]     per-head interleaved (q_h, k_h, v_h)
    blocks.{i}.self_attention.linear_qkv.{q_bias,v_bias} [D/tp]  this rank's heads
    blocks.{i}.self_attention.linear_proj.{weight [D, D/tp], bias [D]}
    blocks.{i}.mlp.linear_fc1.{weight [4D/tp, D], bias}, mlp.linear_fc2.{weight [D, 4D/tp], bias [D]}
    blocks.{i}.gamma_1, gamma_2 [D]                      layer scale (absent when layer_scale_init = 0)
    blocks.{i}.rel_pos_bias.table                        per-block tables (shared_rel_pos_bias = False)
    final_norm.{weight,bias} [D]
Blocks are keyed by global index (BlockStack), so pipeline stages keep their names; the shared
relative position table is needed by every stage (pipeline.replicated: its gradients are summed
over the stages).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron.core.tensor_parallel import ColumnParallelLinear, set_tensor_model_parallel_attributes

from ..core.blocks import make_transformer_config, megatron_attention, megatron_mlp
from ..core.encoder import BlockStack, _tp_rank_size
from ..core.layers import TruncNormalConv2d, trunc_normal_std_
from ..core.tp_random import TP_RANDOM


# ---------------------------------------------------------------------------------------------
# relative position bias
# ---------------------------------------------------------------------------------------------


def num_relative_distances(grid: tuple[int, int]) -> int:
    """Rows of the table: (2h - 1)(2w - 1) patch offsets + cls->token, token->cls, cls->cls."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """int64 [1 + h*w, 1 + h*w]: the table row of each (query, key) pair, token 0 = CLS, patches
    row-major.  As BEiT builds it: patch pair (i, j) -> (dy + h - 1) * (2w - 1) + (dx + w - 1) with
    (dy, dx) = pos_i - pos_j; CLS query -> n - 3, CLS key -> n - 2, CLS -> CLS: n - 1."""
    h, w = grid
    n = num_relative_distances(grid)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.reshape(-1), xs.reshape(-1)])  # [2, P]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, P, P]
    idx = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    idx[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    idx[0, :] = n - 3  # cls -> token
    idx[:, 0] = n - 2  # token -> cls
    idx[0, 0] = n - 1  # cls -> cls
    return idx


class SharedRelativePositionBias(nn.Module):
    """BEiT's relative position bias: forward() -> [H/tp, 1 + P, 1 + P], this TP rank's heads.

    table [(2h-1)(2w-1) + 3, H/tp], zero init; each TP rank holds the columns of its heads (the
    heads of its qkv shard), so Megatron's TP attributes say dim 1.  The index is a fixed,
    non-persistent buffer (derived from the grid; not in checkpoints, nothing for the EMA)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        rank, size = _tp_rank_size()
        if num_heads % size:
            raise ValueError(f"{num_heads} heads do not split over tensor parallel size {size}")
        self.table = nn.Parameter(torch.zeros(num_relative_distances(grid), num_heads // size))
        set_tensor_model_parallel_attributes(self.table, is_parallel=True, dim=1, stride=1)
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> Tensor:
        t = self.index.shape[0]
        bias = self.table[self.index.reshape(-1)].view(t, t, -1)  # [T, T, H/tp]
        return bias.permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# block
# ---------------------------------------------------------------------------------------------


class QVBiasColumnParallelLinear(ColumnParallelLinear):
    """The qkv projection of BEiT: Megatron's ColumnParallelLinear without bias, plus learnable
    q_bias and v_bias [H/tp * hd] (k's bias is a fixed 0), added in Megatron's per-head
    interleaved (q_h, k_h, v_h) column order.  Sharded like the qkv columns: by head."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = True, **kw):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=False, **kw)
        hd = config.kv_channels
        self.heads = self.output_size_per_partition // (3 * hd)
        self.q_bias = nn.Parameter(torch.zeros(self.heads * hd, dtype=config.params_dtype))
        self.v_bias = nn.Parameter(torch.zeros(self.heads * hd, dtype=config.params_dtype))
        for p in (self.q_bias, self.v_bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: Tensor, *args, **kwargs):
        out, _ = super().forward(x, *args, **kwargs)
        q = self.q_bias.view(self.heads, 1, -1)
        bias = torch.cat([q, torch.zeros_like(q), self.v_bias.view(self.heads, 1, -1)], dim=1)
        return out + bias.reshape(-1), None


class DropPath(nn.Module):
    """Stochastic depth on [T, B, D]: in training, each sample's branch is zeroed with probability
    p and the kept ones are scaled by 1 / (1 - p) (timm's drop_path); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # one draw per sample (batch dim 1), from the default generator: the same on all TP ranks
        mask = (torch.rand(1, x.shape[1], 1, device=x.device) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def beit_block_config(mcfg, layer_number: int):
    """Megatron TransformerConfig for BEiT block `layer_number` (1-based): trunc-normal init, the
    output projections (attention proj, fc2) scaled by 1/sqrt(2 * layer_number), attention dropout."""
    base = make_transformer_config(mcfg)
    scale = 1.0 / math.sqrt(2.0 * layer_number)

    def scaled(t: Tensor) -> Tensor:
        trunc_normal_std_(t)
        return t.mul_(scale)

    return dataclasses.replace(base, init_method=trunc_normal_std_, output_layer_init_method=scaled,
                               attention_dropout=mcfg.attention_dropout, hidden_dropout=0.0)


def patch_grid(mcfg) -> tuple[int, int]:
    g = mcfg.image_size // mcfg.patch_size
    return g, g


def drop_path_rates(mcfg) -> list[float]:
    """Stochastic depth per block: linear from 0 (first block) to model.drop_path (last), as BEiT."""
    return [float(x) for x in torch.linspace(0, mcfg.drop_path, mcfg.total_blocks, device="cpu")]


class BeitBlock(nn.Module):
    """One BEiT block: forward(x [T, B, D], bias [H/tp, T, T] | None) -> x [T, B, D] (the block's
    "end" output, after the second residual)."""

    def __init__(self, mcfg, layer_number: int, drop_path: float = 0.0):
        super().__init__()
        d = mcfg.embed_dim
        tcfg = beit_block_config(mcfg, layer_number)
        self.norm1 = nn.LayerNorm(d, eps=mcfg.layer_norm_eps)
        self.self_attention = megatron_attention(tcfg, layer_number, linear_qkv=QVBiasColumnParallelLinear)
        self.norm2 = nn.LayerNorm(d, eps=mcfg.layer_norm_eps)
        self.mlp = megatron_mlp(tcfg)
        if mcfg.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((d,), float(mcfg.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((d,), float(mcfg.layer_scale_init)))
        else:  # BEiT: no layer scale at all
            self.gamma_1 = self.gamma_2 = None
        self.drop_path = DropPath(drop_path)
        # a block's own table only when the table is not shared (BEiT's use_rel_pos_bias)
        self.rel_pos_bias = None if mcfg.shared_rel_pos_bias else SharedRelativePositionBias(
            patch_grid(mcfg), mcfg.num_heads)
        self.checkpointing = "none"
        self.set_checkpointing(mcfg.activation_checkpointing)

    def set_checkpointing(self, mode: str) -> None:
        """"none" | "full" (recompute the whole block in backward) | "selective" (the attention core)."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation_checkpointing={mode!r}: use none|full|selective")
        self.checkpointing = mode
        self.self_attention.core_attention.recompute = mode == "selective"

    def _branch(self, y: Tensor, b: Tensor | None, gamma: Tensor | None) -> Tensor:
        y = y + b if b is not None else y  # Megatron hands the output bias back separately
        return self.drop_path(y * gamma if gamma is not None else y)

    def _forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        x = x + self._branch(*self.self_attention(self.norm1(x), attention_mask=bias), self.gamma_1)
        return x + self._branch(*self.mlp(self.norm2(x)), self.gamma_2)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.checkpointing == "full" and self.training and torch.is_grad_enabled():
            # torch.utils.checkpoint replays the default generator (drop path); TP_RANDOM the
            # per-rank stream (attention dropout)
            return checkpoint(self._forward, x, bias, use_reentrant=False, context_fn=TP_RANDOM.checkpoint_contexts)
        return self._forward(x, bias)


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------


class BeitPatchEmbed(nn.Module):
    """[B, C, H, W] -> patches [B, P, D] (row-major), Conv2d(k = stride = patch) with bias."""

    def __init__(self, mcfg):
        super().__init__()
        p = mcfg.patch_size
        self.proj = TruncNormalConv2d(mcfg.in_chans, mcfg.embed_dim, kernel_size=p, stride=p)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images.to(self.proj.weight.dtype))  # fp32 batch into a bf16 model
        return x.flatten(2).transpose(1, 2)


class BeitEncoder(nn.Module):
    """The whole BEiT encoder (student and EMA teacher alike).

        forward(images [B, C, H, W], mask [B, P] bool | None, top_k) ->
            (out [B, 1 + P, D] after the final LayerNorm, taps: the "end" outputs [B, 1 + P, D]
             of the last `top_k` blocks, oldest first, before the final LayerNorm; CLS at 0)

    Pipeline stages (train/pipeline.py prune_to_stage) delete the blocks they do not own, and
    the front end (`local`, `extra_tokens`, `mask_token`: all but the first stage) or
    `final_norm` (all but the last); `embed` runs on the first stage, `run_blocks_tbd` on every
    stage (each holds the shared relative position table)."""

    num_extra_tokens = 1

    def __init__(self, mcfg):
        super().__init__()
        if mcfg.prenet_depth:
            raise ValueError("the BEiT encoder has no prenet: model.prenet_depth must be 0")
        d = mcfg.embed_dim
        self.mcfg = mcfg
        self.grid = patch_grid(mcfg)
        self.local = BeitPatchEmbed(mcfg)
        self.extra_tokens = nn.Parameter(trunc_normal_std_(torch.empty(1, 1, d)))  # CLS
        self.mask_token = nn.Parameter(trunc_normal_std_(torch.empty(1, 1, d)))
        self.rel_pos_bias = SharedRelativePositionBias(self.grid, mcfg.num_heads) if mcfg.shared_rel_pos_bias \
            else None
        rates = drop_path_rates(mcfg)
        self.blocks = BlockStack({str(i): BeitBlock(mcfg, i + 1, rates[i]) for i in range(mcfg.total_blocks)})
        self.final_norm = nn.LayerNorm(d, eps=mcfg.layer_norm_eps)
        self.total_blocks = mcfg.total_blocks

    @property
    def cls_token(self) -> Tensor:
        """[1, 1, D]: BEiT's name for the CLS token (stored as `extra_tokens`)."""
        return self.extra_tokens

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer does not decay besides the 1-D ones (timm's convention, which the
        reference's optimizer follows: the CLS token; the mask token and the bias table decay)."""
        return {"extra_tokens"}

    def set_checkpointing(self, mode: str) -> None:
        for blk in self.blocks:
            blk.set_checkpointing(mode)

    def embed(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """images [B, C, H, W], mask [B, P] bool (True = masked) | None -> [B, 1 + P, D].

        Masked patch embeddings become the mask token (x * (1 - w) + mask_token * w, as BEiT)
        before the CLS token is prepended; there is no absolute position embedding."""
        x = self.local(images)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match the {tuple(x.shape[:2])} patches")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    def attention_bias(self) -> Tensor | None:
        """The shared relative position bias [H/tp, T, T] (None: per-block tables)."""
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def run_blocks_tbd(self, x: Tensor, top_k: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Megatron layout: x [T, B, D] -> (x [T, B, D], taps), through the blocks this module
        holds (all, or one pipeline stage's), then the final LayerNorm if it holds it.

        taps: "end" outputs [B, T, D] of the held blocks among the model's last `top_k`."""
        bias = self.attention_bias()
        taps = []
        for i, blk in zip(self.blocks.indices(), self.blocks):
            x = blk(x, bias)
            if i >= self.total_blocks - top_k:
                taps.append(x.transpose(0, 1))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, taps

    def run_blocks(self, x: Tensor, top_k: int = 0) -> tuple[Tensor, list[Tensor]]:
        """x [B, T, D] -> (x [B, T, D], taps [B, T, D] each)."""
        x, taps = self.run_blocks_tbd(x.transpose(0, 1), top_k)
        return x.transpose(0, 1), taps

    def forward(self, images: Tensor, mask: Tensor | None = None, top_k: int = 0) -> tuple[Tensor, list[Tensor]]:
        return self.run_blocks(self.embed(images, mask), top_k)


__all__ = ["BeitBlock", "BeitEncoder", "DropPath", "QVBiasColumnParallelLinear", "SharedRelativePositionBias",
           "drop_path_rates", "num_relative_distances", "relative_position_index"]
