"""Bodies for tests/test_import.py, run in N processes by d2v2_scale.testing.run_distributed."""

from __future__ import annotations

import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result


def resume_import_body(run_dir: str, oracle_case: str, *overrides: str):
    """`d2v2-train --config RUN/import.yaml --output-dir RUN --resume auto`'s Trainer, then one
    update on fairseq's batch and masks (this DP rank's share of it)."""
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(None, f"{run_dir}/import.yaml", list(overrides))
    cfg.output_dir, cfg.checkpoint.resume = run_dir, "auto"
    import contextlib
    import io

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        tr = Trainer(cfg, build_data=False)
    fresh = tr.step == 0 and tr.updates == 0 and not any(len(v) for v in tr.optimizer.state.values())
    ref = torch.load(f"{oracle_case}/oracle.pt")
    ref = ref.get("loss", ref)  # data2vec 1.0 oracle cases keep the pretraining batch and mask under "loss"
    m, dp, r = cfg.model.clone_batch, tr.info.dp_size, tr.info.dp_rank
    per = ref["source"].shape[0] // dp
    batch = {"source": ref["source"][r * per:(r + 1) * per], "mask": ref["mask"].bool()[r * per * m:(r + 1) * per * m]}
    teacher0 = {k: v.sum().item() for k, v in tr.teacher.gathered_state_dict().items()}
    out = tr.train_step([batch])
    save_result({"loss": out["loss/total"], "reg": out["loss/regression"], "cls": out.get("loss/cls"),
                 "step": tr.step, "updates": tr.updates, "teacher_sums": teacher0, "dp": dp,
                 "log": log.getvalue(), "fresh": fresh})
