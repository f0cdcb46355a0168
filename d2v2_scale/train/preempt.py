"""Save-and-exit on a preemption signal: SIGUSR1 (what launchers/pretrain.sh sends each rank, and
what SLURM's `--signal=B:USR1@N` starts) or SIGTERM (SLURM's time limit, `scancel`, torchrun's
shutdown).  The handler only sets a flag; the trainer checks it after every update (all ranks
agree through one all-reduce), writes a checkpoint and returns.

Installed first thing in `d2v2-train`'s main() (before DeepSpeed and Megatron-core are imported
and seconds before the trainer exists; the package's own import of torch comes earlier): the launcher script signals a rank only once its handler is in place (SigCgt in
/proc/PID/status), and a signal that arrives during start-up is kept for the first update.
Imports nothing heavy: the flag lives here, not in trainer.py."""

from __future__ import annotations

import signal

_REQUESTED: str | None = None


def _handler(signum, frame):  # noqa: ARG001
    global _REQUESTED
    _REQUESTED = signal.Signals(signum).name


def install() -> None:
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, _handler)


def done() -> None:
    """After the save-and-exit checkpoint: further SIGUSR1s are ignored.  Python puts the default
    action (terminate) back while the interpreter shuts down, so a late USR1 (a second one from
    the scheduler, or one sent to the whole process group) would turn a clean exit into a death
    by signal, which the launchers report as a failure."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def requested() -> str | None:
    """The name of the signal that asked for save-and-exit (this process), or None."""
    return _REQUESTED
