"""A second random stream for work on tensor-parallel slices (Megatron's "model-parallel RNG").

Under tensor parallelism each rank computes attention for its H/tp heads.  Dropout on those
attention probabilities must draw independent masks on each TP rank, as a TP=1 run draws
independent masks for all H heads.  Everything computed on replicated tensors (residual dropout,
the decoder noise, layerdrop) must draw the SAME numbers on every TP rank: that is the default
generator, seeded alike everywhere.  So attention dropout runs inside `TP_RANDOM.fork()`, which
swaps this stream (seeded with seed + 2718 + tp_rank, Megatron's offset) into the default
generator and back out.  With tp == 1 the stream is off and nothing changes.

Activation checkpointing replays the forward in backward; `TP_RANDOM.checkpoint_contexts` (a
`torch.utils.checkpoint` context_fn) puts the stream back where it was at the original forward for
the replay, so the recomputed dropout masks are the ones the forward used (torch.utils.checkpoint
does the same for the default generator only).
"""

from __future__ import annotations

import contextlib

import torch

SEED_OFFSET = 2718


def _default_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set_default_state(state: torch.Tensor) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class TensorParallelRandom:
    def __init__(self):
        self.state: torch.Tensor | None = None  # None: off (tp == 1)

    @property
    def enabled(self) -> bool:
        return self.state is not None

    def seed(self, seed: int, tp_rank: int, tp_size: int) -> None:
        """Start the stream (tp_size > 1) or switch it off.  Leaves the default generator as it was."""
        if tp_size <= 1:
            self.state = None
            return
        saved = _default_state()
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed + SEED_OFFSET + tp_rank)
        else:
            torch.manual_seed(seed + SEED_OFFSET + tp_rank)
        self.state = _default_state()
        _set_default_state(saved)

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this stream (no-op when off)."""
        if self.state is None:
            yield
            return
        saved = _default_state()
        _set_default_state(self.state)
        try:
            yield
        finally:
            self.state = _default_state()
            _set_default_state(saved)

    def checkpoint_contexts(self):
        """context_fn for torch.utils.checkpoint: the recompute starts from this stream's state at
        the original forward; afterwards the stream continues where it was."""
        snapshot = None if self.state is None else self.state.clone()

        @contextlib.contextmanager
        def recompute():
            if snapshot is None:
                yield
                return
            current = self.state
            self.state = snapshot.clone()
            try:
                yield
            finally:
                self.state = current

        return contextlib.nullcontext(), recompute()

    def state_dict(self) -> dict:
        return {"state": None if self.state is None else self.state.clone()}

    def load_state_dict(self, d: dict) -> None:
        s = d.get("state")
        self.state = None if s is None else s.clone()


TP_RANDOM = TensorParallelRandom()
