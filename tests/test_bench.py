"""d2v2-bench: real training steps of the tiny presets on synthetic batches (one process, CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2v2_scale.config import build_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("image-tiny", "audio-tiny", "text-tiny")


def _run_script(script: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run `script` in a fresh single-process Python (no launcher variables), asserting success."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("preset", PRESETS)
def test_synthetic_batch_shapes_and_exact_masks(preset):
    from d2v2_scale.bench import synthetic_batch

    cfg = build_config(preset)
    b, m = cfg.data.batch_size, cfg.model.clone_batch
    batch = synthetic_batch(cfg)
    mask = batch["mask"].numpy()
    assert mask.shape[0] == b * m and mask.dtype == np.bool_
    kept = (~mask).sum(1)
    assert (kept == kept[0]).all() and kept[0] > 0
    if preset.startswith("image"):
        assert batch["source"].shape == (b, 3, cfg.model.image_size, cfg.model.image_size)
        assert kept[0] == int(cfg.model.num_patches * (1 - cfg.masking.ratio))
    elif preset.startswith("audio"):
        s = int(cfg.data.max_seconds * cfg.data.sample_rate)
        assert batch["source"].shape == (b, s) and mask.shape[1] == cfg.model.audio_frames(s)
    else:
        t = cfg.data.max_tokens
        assert batch["source"].shape == (b, t) and mask.shape[1] == t
        assert int(batch["source"].min()) > cfg.model.pad_token_id


def test_bench_cli_three_presets(tmp_path):
    """The CLI (main) on image/audio/text-tiny in one process: 2 timed steps after 1 warmup;
    image-tiny also writes a --profile table of the operators (and a Chrome trace).  On a CPU no
    MFU is shown (no known peak) unless --peak-tflops gives one (text-tiny here)."""
    prof = tmp_path / "image.prof.txt"
    script = (
        "import sys, warnings\nwarnings.filterwarnings('ignore')\nfrom d2v2_scale.bench import main\n"
        + "".join(f"main(['--preset', '{p}', '--steps', '2', '--warmup', '1', '--json', "
                  f"r'{tmp_path / p}.json', '--output-dir', r'{tmp_path / p}'"
                  + (f", '--profile', r'{prof}'" if p == "image-tiny" else "")
                  + (", '--peak-tflops', '0.5'" if p == "text-tiny" else "") + "])\n" for p in PRESETS))
    r = _run_script(script, tmp_path, timeout=120)
    assert r.stdout.count("| step s (median) |") == 3
    if "device=cpu" in r.stdout:  # the MFU column: "-" for the two runs without a peak
        assert len(re.findall(r"\| [\d.e+-]+ \| - \| [\d.]+ \(peak RSS\) \|", r.stdout)) == 2, r.stdout
    table = prof.read_text()
    assert table.startswith("# d2v2-bench --profile: 3 steps") and "aten::mm" in table
    assert json.loads((tmp_path / "image.prof.trace.json").read_text())["traceEvents"]
    for p in PRESETS:
        row = json.loads((tmp_path / f"{p}.json").read_text())
        assert row["preset"] == p and row["steps"] == 2 and row["dtype"] == "float32"
        assert 0 < row["step_s_p10"] <= row["step_s_median"] <= row["step_s_p90"]
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > row["samples_per_s"]
        assert row["flops_per_step"] > 0 and row["peak_memory_gib"] > 0
        if p == "text-tiny":
            assert row["peak_tflops"] == 0.5 and row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.5)
        elif row["device"].startswith("cpu"):
            assert row["peak_tflops"] is None and row["mfu"] is None
        parts = row["parts_s"]
        assert parts["teacher_fwd"] > 0 and parts["student_fwd_bwd"] > 0 and parts["optimizer_step"] > 0
        assert parts["ema_update"] > 0
        named = sum(v for k, v in parts.items() if k != "other")
        assert named <= row["step_s_median"] * 1.5  # parts are medians of their own
        for key in ("torch", "deepspeed", "date", "device"):
            assert row[key]


def test_compile_matches_eager_and_refuses_zero3(tmp_path):
    """--compile (torch.compile of every student and teacher block) runs real steps and gives the
    eager losses (inductor may reorder float sums: 1e-4 relative); with ZeRO-3 it is refused up
    front with the stage to use instead."""
    script = (
        "import sys, warnings\nwarnings.filterwarnings('ignore')\nfrom d2v2_scale.bench import main\n"
        + "".join(f"assert main(['--preset', 'image-tiny', '--steps', '2', '--warmup', '1', '--no-breakdown', "
                  f"'--json', r'{tmp_path / n}.json', '--output-dir', r'{tmp_path / n}', "
                  f"'parallel.zero_stage=1'{extra}]) == 0\n"
                  for n, extra in (("eager", ""), ("compiled", ", '--compile'")))
        + "import torch._dynamo.utils as u\nassert u.counters['stats']['unique_graphs'] > 0, 'nothing was compiled'\n"
        + "assert main(['--preset', 'image-tiny', '--compile', 'parallel.zero_stage=3']) == 2\n")
    r = _run_script(script, tmp_path, timeout=300)
    assert "--compile with parallel.zero_stage=3" in r.stderr and "zero_stage=0, 1 or 2" in r.stderr
    eager, compiled = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "compiled"))
    assert eager["compile"] == "off" and compiled["compile"] == "ok"
    assert len(eager["losses"]) == 3 and all(np.isfinite(eager["losses"]))
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-4)
    assert eager["losses"][0] != eager["losses"][-1]  # the steps trained


def test_bf16_zero3_computes_in_bf16_like_zero1(tmp_path):
    """parallel.precision=bf16 means bf16 compute under every ZeRO stage.  zero.Init(module=) does
    not cast, so ZeRO-3 once ran the whole model in fp32 (found on an H100: 4x slower steps, 2x
    activation memory).  Same bf16 weights and math: the losses before the first optimizer
    difference (fp32 masters partitioned differently) are bitwise those of ZeRO-1; the fp32 bug
    gave a different first loss (16.39743 vs 16.39772)."""
    script = (
        "import warnings\nwarnings.filterwarnings('ignore')\nimport torch\n"
        "from d2v2_scale.bench import main\nfrom d2v2_scale.config import build_config\n"
        "from d2v2_scale.train.trainer import Trainer\n"
        + "".join(f"assert main(['--preset', 'image-tiny', '--steps', '2', '--warmup', '1', '--no-breakdown', "
                  f"'--json', r'{tmp_path}/z{z}.json', '--output-dir', r'{tmp_path}/z{z}', "
                  f"'parallel.zero_stage={z}', 'parallel.precision=bf16']) == 0\n" for z in (1, 3))
        + f"tr = Trainer(build_config('image-tiny', overrides=['parallel.zero_stage=3', 'parallel.precision=bf16', "
          f"'output_dir={tmp_path}/t', 'logging.tensorboard=false']), build_data=False)\n"
          "for mod in (tr.engine.module, tr.teacher.module):\n"
          "    bad = {n: p.ds_tensor.dtype for n, p in mod.named_parameters() if p.ds_tensor.dtype != torch.bfloat16}\n"
          "    assert not bad, bad\n")
    _run_script(script, tmp_path, timeout=300)
    z1, z3 = (json.loads((tmp_path / f"z{z}.json").read_text()) for z in (1, 3))
    assert z1["dtype"] == z3["dtype"] == "bfloat16" and len(z1["losses"]) == 3
    assert z3["losses"][:2] == z1["losses"][:2], (z3["losses"], z1["losses"])
    np.testing.assert_allclose(z3["losses"], z1["losses"], rtol=1e-3)


def test_op_counter_counts_syncs_and_phases():
    """The counter sees each operator once, files `.item()`, boolean-mask indexing and `nonzero`
    as host syncs (they are on a GPU), and leaves plain arithmetic alone."""
    import torch

    from d2v2_scale.opcount import OpCounter

    x = torch.arange(6.0)
    with OpCounter() as c:
        y = x * 2 + 1  # 2 operators, no sync
    assert sum(c.ops.values()) == 2 and not c.syncs
    with OpCounter() as c:
        with c.in_phase("student_fwd"):
            float(x.sum())  # sum + _local_scalar_dense
            x[x > 2]  # gt + a boolean index
            torch.nonzero(x)
        x.repeat_interleave(2)  # an int repeat count: the output size is known, no sync
    names = {n for (_, n) in c.syncs}
    assert {"aten::_local_scalar_dense", "aten::nonzero"} <= names
    assert sum(c.syncs.values()) == 3 and all(p == "student_fwd" for (p, _) in c.syncs)
    assert any(p == "other" for (p, _) in c.ops)


def test_bench_count_ops_cli(tmp_path):
    """d2v2-bench --count-ops on image-tiny under ZeRO-1: operators in every phase of the update,
    the logging all-reduce among the collectives, and the JSON row."""
    out = tmp_path / "ops.json"
    script = ("import sys, warnings\nwarnings.filterwarnings('ignore')\nfrom d2v2_scale.bench import main\n"
              f"sys.exit(main(['--preset', 'image-tiny', '--count-ops', '--warmup', '1', '--json', '{out}', "
              f"'--output-dir', '{tmp_path / 'run'}', 'parallel.zero_stage=1']))\n")
    r = _run_script(script, tmp_path, timeout=300)
    assert "| operators |" in r.stdout and "host syncs" in r.stdout
    c = json.loads(out.read_text())["counts"]
    for phase in ("teacher", "student_fwd", "backward", "optimizer", "ema"):
        assert c["ops_per_phase"][phase] > 0, phase
    assert c["ops_total"] == sum(c["ops_per_phase"].values())
    assert c["collectives_total"] >= 1 and 0 < c["op_s"] <= c["wall_s"]
