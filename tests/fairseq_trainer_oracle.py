"""fairseq's own training-loop pieces as the oracle for the trainer (issue #29).

Like tests/fairseq_oracle.py (whose `ensure_fairseq` cache and subprocess convention this reuses:
fairseq never enters the test process), `python tests/fairseq_trainer_oracle.py OUT [part...]`
runs fairseq-fixed's own code and writes what it computed:

  * units.pt: fairseq's learning-rate schedulers (`cosine`, `tri_stage`, built from their own
    config dataclasses) -> the LR of every update k of a schedule, as fairseq's trainer applies
    it (`step_update(k - 1)`); and fairseq's `Adam` (fairseq/optim/adam.py, the CPU form) stepped
    on a fixed gradient sequence -> the parameters after each step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    from . import fairseq_oracle
except ImportError:  # run as a script
    fairseq_oracle = None

# (name, scheduler, peak lr, max_update, warmup_updates (cosine) or phase ratios (tri_stage), updates
# to record: "all" or a list); the sizes of the project's presets (config.py PRESETS)
SCHEDULES = [
    ("tiny-cosine", "cosine", 1e-3, 300, 10, "all"),
    ("tiny-tri_stage", "tri_stage", 1e-3, 300, (0.03, 0.9, 0.07), "all"),
    ("image-base", "cosine", 1e-3, 375_300, 50_040, [1, 2, 50_040, 50_041, 50_042, 200_000, 375_300]),
    ("audio-base", "cosine", 7.5e-4, 400_000, 8000, [1, 2, 8000, 8001, 8002, 123_457, 400_000]),
    ("text-base", "cosine", 2e-4, 1_000_000, 4000, [1, 2, 4000, 4001, 500_000, 1_000_000]),
    ("d2v1-text-base", "cosine", 2e-4, 1_000_000, 10_000, [1, 2, 10_000, 10_001, 10_002, 1_000_000]),
    ("d2v1-audio-base", "tri_stage", 5e-4, 400_000, (0.03, 0.9, 0.07),
     [1, 2, 11_999, 12_000, 12_001, 12_002, 372_000, 372_001, 372_002, 386_000, 400_000, 400_001]),
]
# Adam: betas, eps, weight decay, lr per step
ADAM = dict(betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05, lrs=[1e-3 * (k + 1) / 6 for k in range(6)])


def run(cache: Path, out: Path, parts: list[str], timeout: int = 900) -> None:
    env = dict(os.environ, **fairseq_oracle.ensure_fairseq(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, __file__, str(out), *parts], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=str(out.parent))
    if r.returncode != 0:
        raise RuntimeError(f"fairseq trainer oracle failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


# -------------------------------------------------------------------------------------------------
# subprocess side: everything below imports fairseq
# -------------------------------------------------------------------------------------------------

def _units(out: Path) -> None:
    import torch
    from fairseq.optim.adam import Adam, FairseqAdam, FairseqAdamConfig
    from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig
    from fairseq.optim.lr_scheduler.tri_stage_lr_scheduler import TriStageLRSchedule, TriStageLRScheduleConfig

    res = {"schedules": {}}
    for name, kind, lr, max_update, warm, which in SCHEDULES:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = FairseqAdam(FairseqAdamConfig(lr=[lr], tpu=False, adam_betas="(0.9, 0.98)"), [p])
        if kind == "cosine":
            sch = CosineLRSchedule(CosineLRScheduleConfig(warmup_updates=warm, lr=[lr], max_update=max_update), opt)
        else:
            sch = TriStageLRSchedule(TriStageLRScheduleConfig(phase_ratio=warm, lr=[lr], max_update=max_update), opt)
        ks = range(1, max_update + 1) if which == "all" else which
        # update k runs at the LR fairseq's trainer set after update k - 1: step_update(k - 1)
        res["schedules"][name] = {k: sch.step_update(k - 1) for k in ks}
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(40, generator=gen)
    # gradients near eps (1e-6), where the two eps forms part
    grads = [torch.randn(40, generator=gen) * 3e-6 * (0.3 ** (k % 3)) for k in range(len(ADAM["lrs"]))]
    p = torch.nn.Parameter(p0.clone())
    opt = Adam([p], lr=ADAM["lrs"][0], betas=ADAM["betas"], eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    params = []
    for g, lr in zip(grads, ADAM["lrs"]):
        for grp in opt.param_groups:
            grp["lr"] = lr
        p.grad = g.clone()
        opt.step()
        params.append(p.detach().clone())
    res["adam"] = {"p0": p0, "grads": grads, "params": params, **ADAM}
    torch.save(res, out / "units.pt")


def main(argv):
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for part in argv[2:] or ["units"]:
        {"units": _units}[part](out)
        print(f"built {part}", flush=True)


if __name__ == "__main__":
    sys.path.pop(0)  # as tests/fairseq_oracle.py: nothing of tests/ may shadow fairseq's modules
    main(sys.argv)
