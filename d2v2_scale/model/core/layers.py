"""Torch layers whose initialization lives in `reset_parameters`.

Why: under ZeRO-3 (`deepspeed.zero.Init`) a module's parameters are partitioned as soon as that
module's `__init__` returns, so an init written in the PARENT's `__init__` (`nn.init.normal_(
self.proj.weight)`) would see an empty shard.  `reset_parameters` runs inside the layer's own
`__init__`, before the partition.  State-dict layouts are those of the torch base classes.
"""

from __future__ import annotations

from torch import nn

INIT_STD = 0.02  # BERT-style init for linears and embeddings (docs/REFERENCE.md §1.2)


class BertLinear(nn.Linear):
    """Linear with normal(0, 0.02) weights and zero bias."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class BertEmbedding(nn.Embedding):
    """Embedding with normal(0, 0.02) weights and a zero padding row."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=INIT_STD)
        self._fill_padding_idx_with_zero()


def _xavier(m: nn.Module) -> None:
    nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))  # as a Linear on the flattened input
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class XavierConv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        _xavier(self)


class KaimingConv1d(nn.Conv1d):
    """wav2vec 2.0 feature-extractor conv init."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def trunc_normal_std_(t, std: float = INIT_STD):
    """BEiT's init: normal(0, std) truncated at +-1 std (BEiT's `trunc_normal_` wrapper passes
    a=-std, b=std; timm's default would truncate at +-2 absolute, i.e. not at all)."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


class TruncNormalLinear(nn.Linear):
    """Linear with BEiT's trunc-normal(0.02, +-1 std) weights and zero bias (data2vec 1.0 vision)."""

    def reset_parameters(self) -> None:
        trunc_normal_std_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class TruncNormalConv2d(nn.Conv2d):
    """Conv2d with BEiT's trunc-normal(0.02, +-1 std) weights and zero bias (the patch embedding)."""

    def reset_parameters(self) -> None:
        trunc_normal_std_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
