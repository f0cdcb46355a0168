"""Bodies for tests/test_training_parity.py and bench/bench_trainer_parity.py, run in N processes
by d2v2_scale.testing.run_distributed: the project's trainer on fairseq's batches and masks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result

# the reference trainer's settings (tests/fairseq_trainer_oracle.py), and the reference options on:
# fairseq's Adam eps, decay on every parameter (docs/TRAINING.md "Optimizer")
COMMON = ["parallel.precision=fp32", "optim.lr=1e-3", "optim.warmup_steps=10", "optim.total_steps=40",
          "optim.min_lr_ratio=0.0", "ema.decay=0.99", "ema.end_decay=0.999", "ema.anneal_end_step=40",
          "data.batch_size=2", "model.dropout=0.0", "model.encoder_input_dropout=0.0",
          "model.decoder_input_dropout=0.0", "model.layerdrop=0.0", "model.decoder_noise_std=0.0"]
REFERENCE_OPTIONS = ["optim.adam_eps_form=fairseq", "optim.weight_decay_all=true"]

LAYOUTS = {"zero0": ["parallel.zero_stage=0"], "zero3": ["parallel.zero_stage=3"],
           "flat": ["parallel.zero_stage=0", "parallel.engine=flat"]}
KEYS = ("lr", "loss", "grad_norm", "ema_decay")


def agreement(res: dict, oracle: Path) -> dict:
    """-> {system: {key: (max relative difference, first update over 1e-4 or None)}, "final": ...}."""
    out = {}
    for system, r in res.items():
        ref = torch.load(oracle / system / "traj.pt")
        row = {}
        for k in KEYS:
            rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r[k], ref[k])]
            row[k] = (max(rel), next((i + 1 for i, x in enumerate(rel) if x > 1e-4), None))
        row["final"] = r["final"]
        out[system] = row
    return out


def prepare(systems: list[str], updates: int, options: list[str], work: Path, oracle: Path) -> str:
    """Import fairseq's initial and final weights of each system (`d2v2-import --to-run`) -> the
    body's spec (JSON)."""
    from d2v2_scale.export.fairseq.importer import main as import_main
    from tests.fairseq_trainer_oracle import SNAPSHOT, SYSTEMS, UPDATES

    if updates not in (SNAPSHOT, UPDATES):
        raise SystemExit(f"--updates {updates}: fairseq's weights are saved after {SNAPSHOT} and {UPDATES} updates")
    spec = []
    for s in systems:
        for which, name in (("init", "init"), ("final", "final" if updates == UPDATES else f"after{SNAPSHOT}")):
            dest = work / s / which
            if not (dest / "import.yaml").is_file():
                assert import_main([str(oracle / s / f"{name}.pt"), "--to-run", str(dest), "--preset",
                                    SYSTEMS[s][1]]) == 0
        spec.append({"system": s, "run": str(work / s / "init"), "oracle": str(oracle / s),
                     "final_run": str(work / s / "final"), "updates": updates, "options": options})
    return json.dumps(spec)


def _student_state(tr) -> dict[str, torch.Tensor]:
    import deepspeed

    mod = tr.engine.module
    params = list(mod.named_parameters())
    if tr.cfg.parallel.zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.data.detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


def trajectory_body(spec_json: str, *layout: str):
    """cases: [{"system", "run" (an imported run dir), "oracle" (SYSTEM dir of the fairseq trainer
    oracle), "final_run" (fairseq's final weights imported), "updates", "options": overrides
    (REFERENCE_OPTIONS or none)}].  For each: the trainer from the imported run, `updates` updates on fairseq's batches and masks -> per update
    lr, loss, grad norm, EMA decay; the largest relative difference of the final student and teacher
    from fairseq's (max |ours - theirs| / max |theirs| over each tensor)."""
    from safetensors.torch import load_file

    from d2v2_scale.train.trainer import Trainer

    out = {}
    for s in json.loads(spec_json):
        over = COMMON + list(s["options"]) + list(layout)
        if s["system"] in ("image", "text", "audio"):
            over.append("model.clone_batch=2")
        cfg = build_config(None, f"{s['run']}/import.yaml", over)
        cfg.output_dir, cfg.checkpoint.resume = s["run"], "auto"
        tr = Trainer(cfg, build_data=False)
        ref = torch.load(f"{s['oracle']}/traj.pt")
        rec = {"lr": [], "loss": [], "grad_norm": [], "ema_decay": []}
        for b in ref["batches"][:s["updates"]]:
            rec["lr"].append(tr.optimizer.param_groups[0]["lr"])  # what this update runs at
            o = tr.train_step([b])
            rec["loss"].append(o["loss/total"])
            rec["grad_norm"].append(o["opt/grad_norm"])
            rec["ema_decay"].append(o["opt/ema_decay"])
        want = load_file(f"{s['final_run']}/checkpoints/imported/weights.safetensors")
        dev = {}
        for who, ours in (("student", _student_state(tr)), ("teacher", tr.teacher.gathered_state_dict())):
            common = [k for k in ours if f"{who}.{k}" in want]
            assert len(common) > 0.8 * len(ours), (who, sorted(set(ours) - {k for k in common})[:5])
            rel = {k: ((ours[k] - want[f"{who}.{k}"]).abs().max() /
                       want[f"{who}.{k}"].abs().max().clamp_min(1e-12)).item() for k in common}
            dev[who] = max(rel.values())
            dev[f"{who}_worst"] = max(rel, key=rel.get)
        rec["final"] = dev
        out[s["system"]] = rec
        del tr
    save_result(out)
