"""d2v2-finetune under several processes (docs/FINETUNE.md "Multi-GPU and multi-node"): the tiny
data2vec 2.0 image export fine-tuned for 4 steps (global batch 8) in one process equals the same
recipe in 2 processes x 4 rows, with plain DDP (torchrun), Trainer's DeepSpeed ZeRO-2 (launched
the way srun does) and ZeRO-3 (torchrun): per-step training losses (Trainer's log, every step),
the learning rate of every update (the recipe's warm-up + cosine, not Trainer's default), and the
final weights.  Real torch.distributed / DeepSpeed on gloo, CPU (d2v2_scale.testing)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip("transformers / accelerate are not installed (pip install -e '.[hf]')", allow_module_level=True)

from d2v2_scale.testing import run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR, WARMUP = 4, 8, 2e-3, 2  # the small image recipe's lr; 2 warm-up updates, then cosine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the tiny 2.0 image export, the prepared digits manifest, the one-process run's result)."""
    from d2v2_scale.export.cli import main
    from tests import data_fixtures
    from tests.dist_bodies_finetune import image_body
    from tests.test_export_hf_remote import _plain_export

    tmp = tmp_path_factory.mktemp("ftdist")
    _plain_export("image-tiny", tmp / "plain")
    assert main([str(tmp / "plain"), "--out", str(tmp / "hf"), "--format", "hf"]) == 0
    man = data_fixtures.prepared("image") / "manifest.json"
    # the reference: this process, world size 1 (the body's code path, without the launcher)
    from d2v2_scale import testing

    res = {}
    saved = testing.save_result
    import tests.dist_bodies_finetune as bodies

    bodies.save_result = res.update
    try:
        image_body(str(tmp / "hf"), str(man), str(tmp / "one"), str(STEPS), str(BATCH))
    finally:
        bodies.save_result = saved
    return tmp, man, res


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def _steps(log) -> list[dict]:
    return [e for e in log if "loss" in e]


def test_one_process_follows_the_recipe(tiny):
    """The reference run itself: a loss logged every update, each update at the recipe's learning
    rate (fairseq's warm-up + cosine: update k at the schedule's value after k - 1 updates)."""
    from d2v2_scale.train.schedules import WarmupCosine

    tmp, _, res = tiny
    steps = _steps(res["train_log"])
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1)) and res["world_size"] == 1
    sched = WarmupCosine(STEPS, WARMUP, 1e-6 / LR)
    assert [e["learning_rate"] for e in steps] == pytest.approx([LR * sched(k - 1) for k in range(1, STEPS + 1)])
    assert steps[2]["learning_rate"] == pytest.approx(LR)  # the peak: not Trainer's default 5e-5
    assert all(math.isfinite(e["loss"]) for e in steps)


@pytest.mark.parametrize("mode,launcher", [("ddp", "torchrun"), ("zero2", "slurm"), ("zero3", "torchrun")])
def test_two_processes_equal_one(tiny, tmp_path, mode, launcher):
    """2 processes x 4 rows = 1 process x 8 rows.  Trainer's data order does not depend on the
    world size: accelerate's SeedableRandomSampler draws one permutation from the seed, then hands
    its batches of B/N rows round-robin to the ranks, so update k sees the same 8 rows; the head's
    init is seeded (finetune/common.load_model) and DDP / DeepSpeed broadcast rank 0's weights.

    Tolerances: losses to 1e-5 (relative): the all-reduce averages two half-batch means where one
    process takes one mean (float32 rounding, ~1e-7 measured).  Weights to 2e-5 (absolute; an
    update moves them by up to ~4e-3 here), except the key part of each attention's qkv bias: its
    exact gradient is 0 (a bias added to every key shifts all of a query's scores alike: softmax
    cancels it), so what it gets is rounding noise, which Adam scales up to ~lr-sized steps that
    differ between any two summation orders (measured up to 2.3e-4; bounded here by twice the sum of
    the updates' learning rates, what two runs' Adam steps can span)."""
    tmp, man, ref = tiny
    ds = {"ddp": "none", "zero2": str(REPO / "ds_configs/finetune_zero2.json"),
          "zero3": str(REPO / "ds_configs/finetune_zero3.json")}[mode]
    out = tmp_path / mode
    res = run_distributed("tests.dist_bodies_finetune:image_body", nproc=2, launcher=launcher, timeout=240,
                          args=[str(tmp / "hf"), str(man), str(out), str(STEPS), str(BATCH), ds])
    for r in (0, 1):  # every rank returns the published result (the others waited for rank 0)
        assert res[r]["world_size"] == 2 and res[r]["accuracy"] == ref["accuracy"]
        mine, one = _steps(res[r]["train_log"]), _steps(ref["train_log"])
        assert [e["step"] for e in mine] == [e["step"] for e in one]
        assert [e["loss"] for e in mine] == pytest.approx([e["loss"] for e in one], rel=1e-5)
        assert [e["learning_rate"] for e in mine] == pytest.approx([e["learning_rate"] for e in one], rel=1e-12)
    # rank 0 published one folder, renamed into place: no temp or old folder left beside it
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "trainer"]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    a, b = _weights(out), _weights(tmp / "one")
    assert a.keys() == b.keys()
    for k in a:
        d = (a[k] - b[k]).abs()
        if k.endswith("attn.qkv.bias"):
            dim = d.numel() // 3
            # noise-driven, yet within what two runs' Adam steps (each at most ~lr) can span
            assert d[dim:2 * dim].max() <= 2 * sum(e["learning_rate"] for e in _steps(ref["train_log"])), k
            d = torch.cat([d[:dim], d[2 * dim:]])
        assert d.max() <= 2e-5, (k, float(d.max()))


def test_bad_deepspeed_config_and_batch_split(tiny, tmp_path, capsys):
    """A DeepSpeed config with an optimizer / scheduler section (Trainer would drop the recipe's),
    a missing one, ZeRO-3 that would not gather its shards for the saved folder, or a global batch that does not split over the processes: one line, exit 2,
    before any data is read; nothing written."""
    from d2v2_scale.finetune.cli import main

    tmp, man, _ = tiny
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    base = ["image", str(tmp / "hf"), "--data", str(tmp_path / "no-such-manifest.json"), "--out", str(tmp_path / "o")]
    cases = [(["--deepspeed", str(bad)], "remove its 'optimizer' section(s): the recipe passes its own"),
             (["--deepspeed", str(tmp_path / "nope.json")], "no such file (e.g. ds_configs/finetune_zero2.json)"),
             (["--deepspeed", str(REPO / "ds_configs/zero3.json")],  # the pretraining one: no gather on save
              'ZeRO-3 needs "stage3_gather_16bit_weights_on_model_save": true to save the fine-tuned weights')]
    for extra, msg in cases:
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    # srun's variables: 2 tasks, so a global batch of 9 cannot split (the command maps them to
    # RANK, WORLD_SIZE, ... in os.environ: the whole environment is put back afterwards)
    saved = dict(os.environ)
    try:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ |= {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
        assert main(base + ["--batch-size", "9"]) == 2
        assert os.environ["WORLD_SIZE"] == "2"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    err = capsys.readouterr().err
    assert "--batch-size 9 (the global batch) does not split over 2 processes: pass a multiple of 2" in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()

