"""The encoder shared by student and teacher: local features -> positions -> (gather kept) ->
extra tokens -> context LayerNorm -> input dropout -> prenet + shared blocks.

Parts (the teacher builds a subset; names are the same in both, see model/__init__.py):
    local          modality front end (patch embed / CNN + projection / token embedding)
    positions      modality positions applied before the gather (sin-cos / conv positions)
    extra_tokens   [1, E, D] (image CLS)
    context_norm   LayerNorm before the prenet (post-LN models)
    final_norm     LayerNorm after the last block (pre-LN models only)
    blocks.{i}     `total_blocks` blocks; the first `prenet_depth` are the prenet (never targets).
                   Keyed by the global block index, so a pipeline stage that keeps only blocks
                   4..7 still names them blocks.4..7 (checkpoints join stages by name)
    alibi_scale    [H / tp] learned ALiBi scale per head of this TP rank, shared by all blocks
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...opcount import host_scalar
from .attention import alibi_slopes, attention_bias
from .blocks import Block, make_transformer_config
from .modality import Modality


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return 0, 1


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [N, T, D], idx [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class BlockStack(nn.ModuleDict):
    """The blocks, keyed by global index: iterates like a ModuleList (the blocks, in order), and
    `stack[i]` is global block i (`stack[-1]`: the last block held).  A pipeline stage deletes the blocks it does not own and keeps
    the names (`blocks.5.` stays `blocks.5.`), so stage checkpoints join by name."""

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i) -> nn.Module:
        if isinstance(i, int) and i < 0:  # from the end, as a list: stack[-1] is the last block held
            return list(self._modules.values())[i]
        return self._modules[str(i)]

    def __delitem__(self, i) -> None:
        del self._modules[str(i)]

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class Encoder(nn.Module):
    def __init__(self, mcfg, modality: Modality, parts: frozenset | set = frozenset({"local", "context"})):
        super().__init__()
        self.mcfg, self.modality = mcfg, modality
        self.num_extra_tokens = modality.num_extra_tokens if "context" in parts else 0
        self.local = modality.build_local() if "local" in parts else None
        self.positions = modality.build_positions() if "context" in parts else None
        self.extra_tokens = modality.build_extra_tokens() if "context" in parts else None
        if self.extra_tokens is None:
            self.num_extra_tokens = 0
        self.context_norm = (nn.LayerNorm(mcfg.embed_dim, eps=mcfg.layer_norm_eps)
                             if "context" in parts and modality.context_norm and not mcfg.pre_ln else None)
        self.input_dropout = nn.Dropout(modality.input_dropout)
        # pre-LN models normalize after the last block instead of before the first
        self.final_norm = nn.LayerNorm(mcfg.embed_dim, eps=mcfg.layer_norm_eps) if mcfg.pre_ln else None
        tcfg = make_transformer_config(mcfg)
        self.blocks = BlockStack({str(i): Block(mcfg, tcfg, i + 1) for i in range(mcfg.total_blocks)})
        self.total_blocks = mcfg.total_blocks
        self.prenet_depth = mcfg.prenet_depth
        self.layerdrop = mcfg.layerdrop
        self.tap_block_end = getattr(mcfg, "target_tap", "ffn") == "block_end"
        if mcfg.alibi:
            if self.num_extra_tokens:
                raise NotImplementedError("ALiBi with extra tokens is not supported")
            rank, size = _tp_rank_size()
            h = mcfg.num_heads // size
            self.register_buffer("alibi_slopes", alibi_slopes(mcfg.num_heads)[rank * h:(rank + 1) * h],
                                 persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(h))
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            set_tensor_model_parallel_attributes(self.alibi_scale, is_parallel=True, dim=0, stride=1)
        else:
            self.alibi_scale = None

    # ---------------------------------------------------------------------------------------
    def local_features(self, source: Tensor, padding_mask: Tensor | None = None, with_padding: bool = True):
        """-> (features [B, T, D], padding [B, T] | None; None as well with with_padding=False: for
        callers that have it from the batch, data/layout.py, as deriving it is a host sync)."""
        return self.local(source, padding_mask, with_padding=with_padding)

    def contextualize(self, x: Tensor, keep: Tensor | None = None, zero: Tensor | None = None) -> Tensor:
        """x [N, T, D] -> [N, E + T_keep, D] (E extra tokens, T_keep = T when keep is None).

        keep: [N, T_keep] kept positions (student) or None (teacher: full sequence).
        zero: [N, T] positions to zero before the positional conv (masked and padded)."""
        if self.positions is not None:
            x = self.positions(x, zero)
        if keep is not None:
            x = gather_tokens(x, keep)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.context_norm is not None:
            x = self.context_norm(x)
        # after the context LayerNorm, as the reference's BlockEncoder does (docs/REFERENCE.md §1.10 D3); the
        # tensor is replicated over TP ranks, so the default generator (same on every rank) draws it
        return self.input_dropout(x)

    def bias(self, n: int, t: int, positions: Tensor | None, padding: Tensor | None, dtype, device):
        """Additive attention bias shared by all blocks ([N, H_local|1, T, T]) or None."""
        if padding is not None and self.num_extra_tokens:
            padding = torch.cat([padding.new_zeros(n, self.num_extra_tokens), padding], dim=1)
        return attention_bias(n, t, positions=positions, key_padding=padding,
                              slopes=getattr(self, "alibi_slopes", None), scale=self.alibi_scale,
                              dtype=dtype, device=device)

    def run_blocks(self, x: Tensor, bias: Tensor | None, top_k: int = 0) -> tuple[Tensor, list[Tensor]]:
        """x [N, T, D] -> (x [N, T, D], FFN outputs of the last `top_k` blocks, each [N, T, D])."""
        x, outs = self.run_blocks_tbd(x.transpose(0, 1), bias, top_k)
        return x.transpose(0, 1), outs

    def run_blocks_tbd(self, x: Tensor, bias: Tensor | None, top_k: int = 0) -> tuple[Tensor, list[Tensor]]:
        """Megatron layout: x [T, N, D] -> (x [T, N, D], taps), through the blocks this module
        holds (all of them, or one pipeline stage's slice), then the final LayerNorm if it holds it.

        taps: FFN outputs [N, T, D] (model.target_tap="block_end": block outputs) of the blocks among
        the model's last `top_k` (global index)."""
        outs = []
        for i, blk in zip(self.blocks.indices(), self.blocks):
            # layerdrop (student only; the default RNG is identical on all TP ranks).  The draw is a
            # host tensor on every machine (no device argument): reading it waits for no device
            if self.training and self.layerdrop > 0 and i >= self.prenet_depth and not top_k:
                if host_scalar(torch.rand(())) < self.layerdrop:
                    continue
            x, t = blk(x, bias)
            if i >= self.total_blocks - top_k:
                # the target tap (model.target_tap): FFN output, or the block's output
                outs.append((x if self.tap_block_end else t).transpose(0, 1))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, outs

    def forward_full(self, x: Tensor, padding: Tensor | None, top_k: int) -> tuple[Tensor, list[Tensor]]:
        """Unmasked pass (teacher, parity tests): x [B, T, D] features -> (out, top-K FFN outputs),
        both with extra tokens removed."""
        x = self.contextualize(x, keep=None, zero=padding)
        b, t = x.shape[:2]
        bias = self.bias(b, t, None, padding, x.dtype, x.device)
        out, layers = self.run_blocks(x, bias, top_k)
        e = self.num_extra_tokens
        return out[:, e:], [l[:, e:] for l in layers]
