"""d2v2-scale: data2vec 2.0 pretraining at scale on DeepSpeed + Megatron-core."""

from .compat import quiet_known_warnings

# Megatron-core warns at import time that Transformer Engine / Apex are absent (we use neither);
# filter those few known, non-actionable notices before any submodule imports it.
quiet_known_warnings()

__version__ = "0.1.0"
