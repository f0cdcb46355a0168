"""The encoder block, composed from Megatron-core parts.

    post-LN (default):       x = LN1(x + Attn(x));  t = MLP(x);  x = LN2(x + t)
    pre-LN  (option):        x = x + Attn(LN1(x));  t = MLP(LN2(x));  x = x + t

Every block returns ``(x, t)``: `t` is the MLP output BEFORE the residual add and LN2, which is
the teacher's target tap (docs/REFERENCE.md §1.2, §1.3: post-LN is the reference's default).

Megatron's `TransformerLayer` is pre-LN with fused bias-dropout-add and no way to hand out the
MLP output, so the block is composed here from Megatron's `SelfAttention` (ColumnParallel qkv
with bias, our SDPA core attention, RowParallel output projection) and `MLP` (ColumnParallel
fc1, exact GELU, RowParallel fc2), plus torch LayerNorms.  Tensors are Megatron's [T, B, D].

Parameter names of one block (this is the name contract with the teacher, the EMA and
`twins/mapping.py`):
    self_attention.linear_qkv.{weight,bias}   [3D/tp, D]  per-head interleaved (q_h, k_h, v_h)
    self_attention.linear_proj.{weight,bias}  [D, D/tp]
    mlp.linear_fc1.{weight,bias}              [4D/tp, D]
    mlp.linear_fc2.{weight,bias}              [D, 4D/tp]
    norm1.{weight,bias}, norm2.{weight,bias}  [D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import SDPACoreAttention

from .layers import INIT_STD
from .tp_random import TP_RANDOM


class GroupedRowParallelLinear(RowParallelLinear):
    """Megatron-core's RowParallelLinear, handing its own TP group to the matmul.

    Megatron-core 0.16's `RowParallelLinear.forward` passes `tp_group=None` on, and for frozen
    weights (the teacher's) the matmul then looks the group up through a function that issues a
    DeprecationWarning on every call: in a torch.compile'd teacher block that call is a graph
    break.  The group is the same one; only the lookup goes."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def init_normal(std: float = INIT_STD):
    def init_(t: Tensor) -> Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)

    return init_


def make_transformer_config(mcfg, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Megatron `TransformerConfig` for our blocks, from `ModelConfig`."""
    # Build on the host, always: Megatron's CPU init draws the whole [out, in] weight from the
    # default generator and keeps this rank's slice, so every TP size (and a CPU run) starts from
    # the same weights.  Its GPU init draws per slice from the model-parallel CUDA RNG tracker
    # instead (TP=2 would differ from TP=1, and the tracker must be seeded first).  The trainer
    # builds whole, then partitions and moves (see Trainer.__init__).
    kw = {"use_cpu_initialization": True}
    return TransformerConfig(
        num_layers=mcfg.total_blocks,
        hidden_size=mcfg.embed_dim,
        num_attention_heads=mcfg.num_heads,
        ffn_hidden_size=int(mcfg.embed_dim * mcfg.mlp_ratio),
        add_bias_linear=True,
        add_qkv_bias=True,
        activation_func=F.gelu,  # exact (erf) GELU, as nn.GELU()
        gated_linear_unit=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=mcfg.dropout,
        attention_dropout=mcfg.dropout,
        layernorm_epsilon=mcfg.layer_norm_eps,
        init_method=init_normal(),
        output_layer_init_method=init_normal(),  # BERT: not depth-scaled
        params_dtype=params_dtype,
        perform_initialization=True,
        **kw,
    )


def megatron_attention(tcfg: TransformerConfig, layer_number: int, linear_qkv=ColumnParallelLinear) -> SelfAttention:
    """Megatron's SelfAttention: `linear_qkv` (ColumnParallel), our SDPA core attention (additive
    bias, per-TP-rank dropout stream), the RowParallel output projection.  forward(x [T, B, D],
    attention_mask=bias) -> (out [T, B, D], proj bias, not yet added)."""
    return SelfAttention(
        tcfg,
        SelfAttentionSubmodules(linear_qkv=linear_qkv, core_attention=SDPACoreAttention,
                                linear_proj=GroupedRowParallelLinear),
        layer_number=layer_number,
        attn_mask_type=AttnMaskType.no_mask,
    )


def megatron_mlp(tcfg: TransformerConfig) -> MLP:
    """Megatron's MLP: ColumnParallel fc1, the config's activation, RowParallel fc2.
    forward(x [T, B, D]) -> (out [T, B, D], fc2 bias, not yet added)."""
    from megatron.core import parallel_state as ps

    return MLP(tcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=GroupedRowParallelLinear),
               ffn_hidden_size=tcfg.ffn_hidden_size, tp_group=ps.get_tensor_model_parallel_group())


class Block(nn.Module):
    """One transformer block: forward(x [T, B, D], bias) -> (x [T, B, D], ffn_out [T, B, D])."""

    def __init__(self, mcfg, tcfg: TransformerConfig, layer_number: int):
        super().__init__()
        d = mcfg.embed_dim
        self.pre_ln = bool(mcfg.pre_ln)
        self.self_attention = megatron_attention(tcfg, layer_number)
        self.norm1 = nn.LayerNorm(d, eps=mcfg.layer_norm_eps)
        self.mlp = megatron_mlp(tcfg)
        self.norm2 = nn.LayerNorm(d, eps=mcfg.layer_norm_eps)
        self.drop = nn.Dropout(mcfg.dropout)  # residual-branch dropout (attention and MLP)
        self.checkpointing = "none"
        self.set_checkpointing(mcfg.activation_checkpointing)

    def set_checkpointing(self, mode: str) -> None:
        """"none" | "full" (recompute the whole block in backward) | "selective" (recompute only
        the attention core, whose probabilities are the largest activation)."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation_checkpointing={mode!r}: use none|full|selective")
        self.checkpointing = mode
        self.self_attention.core_attention.recompute = mode == "selective"

    def _attn(self, x: Tensor, bias: Tensor | None) -> Tensor:
        out, b = self.self_attention(x, attention_mask=bias)  # linear_proj skips its bias add
        return out + b if b is not None else out

    def _mlp(self, x: Tensor) -> Tensor:
        out, b = self.mlp(x)
        return out + b if b is not None else out

    def _forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.pre_ln:
            x = x + self.drop(self._attn(self.norm1(x), bias))
            t = self._mlp(self.norm2(x))
            return x + self.drop(t), t
        x = self.norm1(x + self.drop(self._attn(x, bias)))
        t = self._mlp(x)
        return self.norm2(x + self.drop(t)), t

    def forward(self, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.checkpointing == "full" and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, bias, use_reentrant=False, context_fn=TP_RANDOM.checkpoint_contexts)
        return self._forward(x, bias)
