"""Torch layers whose initialization lives in `reset_parameters`.

Why: under ZeRO-3 (`deepspeed.zero.Init`) a module's parameters are partitioned as soon as that
module's `__init__` returns, so an init written in the PARENT's `__init__` (`nn.init.normal_(
self.proj.weight)`) would see an empty shard.  `reset_parameters` runs inside the layer's own
`__init__`, before the partition.  State-dict layouts are those of the torch base classes.
"""

from __future__ import annotations

from torch import nn

INIT_STD = 0.02  # BERT-style init for linears and embeddings (spec section 2)


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
