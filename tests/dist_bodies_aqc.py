"""Bodies for the data2vec-aqc scale-out tests (tests/test_aqc_dist.py), run in N processes by
d2v2_scale.testing.run_distributed: several Trainers in one process group, to save process starts."""

from __future__ import annotations

from d2v2_scale.testing import save_result
from tests.dist_bodies_scaleout import _close, copied_gap
from tests.dist_bodies_train import _trainer


def zero_resume_body(preset: str, *overrides: str):
    """In one process group: ZeRO-0 to max_steps; ZeRO-3 to max_steps with a checkpoint at step 2;
    ZeRO-3 resumed from that checkpoint to max_steps.  -> the three loss lists, the ZeRO-3 run's
    last logged scalars and the copied positional conv's teacher-student gap."""
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    ov = [o for o in overrides if not o.startswith("output_dir=")]
    res = {}
    tr = _trainer(preset, [*ov, "parallel.zero_stage=0", f"output_dir={out_dir}/z0"])
    res["z0"] = tr.fit()["losses"]
    _close(tr)
    del tr
    ckpt = ["parallel.zero_stage=3", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    tr = _trainer(preset, [*ov, *ckpt, f"output_dir={out_dir}/z3"])
    out = tr.fit()
    res["z3"], res["last"], res["copied_gap"] = out["losses"], out["last"], copied_gap(tr)
    _close(tr)
    del tr
    tr = _trainer(preset, [*ov, *ckpt, f"output_dir={out_dir}/resumed",
                           f"checkpoint.resume={out_dir}/z3/checkpoints/step_00000002"])
    res["resumed"] = tr.fit()["losses"]
    save_result(res)
