"""Runs people can follow and compare: the run record, W&B (offline), progress with ETA, mixed corpora,
and --help naming the three systems.

The end-to-end test trains on two real corpora (copies of the digits shards, mixed 1:3) in real
torchrun process groups with W&B in its offline mode (no network) and reads back what the run
wrote: run_record.json, the TensorBoard events and W&B's own .wandb files."""

from __future__ import annotations

import importlib
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from d2v2_scale.config import ConfigError, build_config
from d2v2_scale.data.manifest import DataError, sha256_file
from d2v2_scale.testing import console_script, run_distributed
from tests import data_fixtures


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Two image corpora (the prepared digits, copied: each its own folder and manifest)."""
    root = tmp_path_factory.mktemp("mix")
    src = data_fixtures.prepared("image")
    out = []
    for name in ("books", "wiki"):
        shutil.copytree(src, root / name)
        out.append(str(root / name / "manifest.json"))
    return out


def _mix_cfg(corpora, *extra):
    return build_config("image-tiny", overrides=[f"data.manifests=[{','.join(corpora)}]",
                                                 "data.manifest_weights=[1,3]", "data.num_workers=0",
                                                 "data.batch_size=8", *extra])


# ---- --help ------------------------------------------------------------------------------------
COMMANDS = {"d2v2-prep": "data_prep.cli", "d2v2-export": "d2v2_scale.export.cli",
            "d2v2-import": "d2v2_scale.export.fairseq.importer", "d2v2-probe": "d2v2_scale.export.probe",
            "d2v2-bench": "d2v2_scale.bench", "d2v2-plan": "d2v2_scale.plan", "d2v2-quickstart": "d2v2_scale.quickstart"}


def _help(command: str, capsys) -> str:
    if command == "d2v2-train":  # its main() ties the process to its launcher first: the parser alone
        from d2v2_scale.train import parse_args as run
    else:
        run = importlib.import_module(COMMANDS[command]).main
    with pytest.raises(SystemExit) as e:
        run(["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["d2v2-train", *COMMANDS])
def test_help_describes_the_three_systems(command, capsys):
    text = _help(command, capsys)
    for system in ("data2vec 2.0", "data2vec 1.0", "data2vec-aqc"):
        assert system in text, f"{command} --help does not mention {system}"
    if command == "d2v2-train":
        for preset in ("d2v1-", "aqc-", "data.manifests", "logging.wandb"):
            assert preset in text


# ---- progress ----------------------------------------------------------------------------------
def test_progress_eta_from_smoothed_step_time():
    from d2v2_scale.train.metrics import format_line
    from d2v2_scale.train.progress import Progress, hms

    assert hms(0) == "00:00:00" and hms(3725.4) == "01:02:05" and hms(2 * 86400 + 61) == "2d00:01:01"
    p = Progress(start_step=100, total=1100)
    p.update(101, 30.0)  # the start-up step: the estimate until the next window
    assert p.eta_s(101) == pytest.approx(999 * 30.0)
    p.update(111, 1.0)  # replaces the start-up window
    assert p.eta_s(111) == pytest.approx(989 * 1.0)
    p.update(121, 2.0)  # 10 steps at 0.9 each: weight 1 - 0.9**10 on the new window
    a = 1 - 0.9 ** 10
    assert p.step_time == pytest.approx((1 - a) * 1.0 + a * 2.0)
    line = format_line(121, 1100, {"perf/samples_per_s": 1.0, "perf/tokens_per_s": 1.0, "perf/memory_gib": 1.0},
                       p.text(121))
    assert line.startswith("step 121/1100 loss nan ") and " | 11.0% elapsed 00:00:0" in line and " eta 00:" in line


# ---- run record pieces ------------------------------------------------------------------------
def test_code_version_and_record_history(tmp_path):
    from d2v2_scale.train import run_record

    assert run_record.code_version(tmp_path)["git"] == "not a git checkout"  # never fails
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (repo / "untracked.txt").write_text("a run folder, say")
    assert run_record.code_version(repo) == {"commit": head, "dirty": False, "branch": run_record.code_version(
        repo)["branch"], "path": str(repo)}
    (repo / "a.py").write_text("x = 2\n")
    assert run_record.code_version(repo)["dirty"] is True
    # a sub-folder of a checkout is not the checkout (a venv inside some other repository)
    (repo / "sub").mkdir()
    assert run_record.code_version(repo / "sub")["git"] == "not a git checkout"

    # the history: appended per (re)start; a damaged file is kept aside, never overwritten
    out = tmp_path / "run"
    out.mkdir()
    run_record.append(out, {"event": "start", "step": 0})
    run_record.append(out, {"event": "resume", "step": 5})
    run_record.finish(out, {"step": 9, "stopped": None})
    hist = json.loads((out / run_record.RECORD_NAME).read_text())["history"]
    assert [h["event"] for h in hist] == ["start", "resume"] and hist[1]["end"]["step"] == 9
    (out / run_record.RECORD_NAME).write_text('{"history": [')
    run_record.append(out, {"event": "resume", "step": 9})
    assert [p.read_text() for p in out.glob(run_record.RECORD_NAME + ".damaged-*")] == ['{"history": [']
    assert json.loads((out / run_record.RECORD_NAME).read_text())["history"] == [{"event": "resume", "step": 9}]


# ---- mixed corpora: sampler and loader (no process group) ---------------------------------------
def test_mixture_follows_weights_is_deterministic_and_resumes_exactly(two_corpora):
    from d2v2_scale.data.loader import build_loader
    from d2v2_scale.data.mixture import MixedShardSet

    cfg = _mix_cfg(two_corpora)
    cfg.validate()
    ranks = [build_loader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    s0, s1 = ranks[0].sampler, ranks[1].sampler
    shards: MixedShardSet = ranks[0].shards
    assert shards.total == 400 and list(s0.draws) == [100, 300]  # a 400-sample epoch, 1:3
    seen_books = []
    for epoch in range(4):
        ids = s0.epoch_draws(epoch)
        corpus = shards.corpus_of(ids)
        assert np.bincount(corpus).tolist() == [100, 300]  # each epoch follows the weights exactly
        assert len(np.unique(ids)) == 400  # distinct draw ids: repeats of a row get their own crops/masks
        b0, b1 = s0.epoch_batches(epoch).ravel(), s1.epoch_batches(epoch).ravel()
        assert not set(b0) & set(b1)  # data-parallel ranks draw disjoint samples
        seen_books.append(ids[corpus == 0] % 400)
        wiki_rows = np.bincount(ids[corpus == 1] % 400 - 200, minlength=200)
        assert wiki_rows.min() >= 1 and wiki_rows.max() <= 2  # 1.5 passes over the 200 rows
    # the down-weighted corpus goes through all of its rows before any repeats
    assert sorted(np.concatenate(seen_books[:2]).tolist()) == list(range(200))
    # deterministic per seed
    again = build_loader(cfg, dp_rank=0, dp_size=2)
    assert np.array_equal(again.sampler.epoch_batches(1), s0.epoch_batches(1))
    again.close()
    other = build_loader(_mix_cfg(two_corpora, "data.seed=7"), dp_rank=0, dp_size=2).sampler
    assert not np.array_equal(other.epoch_batches(1), s0.epoch_batches(1))

    # exact resume mid-epoch through the loader, with the per-corpus counts: continue from epoch 1,
    # batch 3 of 25 (as a checkpoint stores it), take one batch, save, take four more; a new loader
    # from that state gives the same four
    loader = ranks[0]
    loader.load_state_dict({"epoch": 1, "position": 3, "num_samples": 400, "bad_rows": [],
                            "corpus_samples": [50, 170], "mixture": ["elsewhere/books", "elsewhere/wiki"],
                            "corpus_rows": [200, 200], "draws_per_epoch": [100, 300]})
    it = iter(loader)
    first = next(it)
    assert loader.corpus_samples.sum() == 50 + 170 + 8
    assert loader.corpus_samples.tolist() == (np.array([50, 170]) + np.bincount(
        shards.corpus_of(first["index"].numpy()), minlength=2)).tolist()
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 4)
    want = [next(it) for _ in range(4)]
    counts = loader.corpus_samples.copy()
    resumed = build_loader(cfg, dp_rank=0, dp_size=2)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for w in want:
        got = next(it2)
        for k in ("source", "mask", "index"):
            assert torch_equal(got[k], w[k]), k
    assert resumed.corpus_samples.tolist() == counts.tolist()
    # other weights cannot continue this position
    changed = build_loader(_mix_cfg(two_corpora, "data.manifest_weights=[1,1]"), dp_rank=0, dp_size=2)
    with pytest.raises(DataError, match="resume with the same data.manifests and data.manifest_weights"):
        changed.load_state_dict(state)
    for ld in (*ranks, resumed, changed):
        ld.close()


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_mixture_config_and_compatibility_errors(two_corpora, tmp_path):
    from d2v2_scale.train import preflight

    with pytest.raises(ConfigError, match="data.manifest_weights has 3 values for 2 data.manifests"):
        _mix_cfg(two_corpora, "data.manifest_weights=[1,2,3]").validate()
    with pytest.raises(ConfigError, match="every weight must be a positive number"):
        _mix_cfg(two_corpora, "data.manifest_weights=[1,0]").validate()
    with pytest.raises(ConfigError, match="data.manifest and data.manifests are both set"):
        _mix_cfg(two_corpora, f"data.manifest={two_corpora[0]}").validate()
    with pytest.raises(ConfigError, match="names a corpus twice"):
        build_config("image-tiny", overrides=[f"data.manifests=[{two_corpora[0]},{two_corpora[0]}]"]).validate()
    assert preflight(_mix_cfg(two_corpora)) is None
    # another image format: pre-decoded pixels of another side
    other = tmp_path / "other"
    shutil.copytree(data_fixtures.prepared("image"), other)
    m = json.loads((other / "manifest.json").read_text())
    m["pixels_side"] = 64
    (other / "manifest.json").write_text(json.dumps(m))
    err = preflight(_mix_cfg([two_corpora[0], str(other / "manifest.json")]))
    assert "cannot be mixed: the image format" in err and str(other) in err and "--pixels" in err
    # another modality (text shards in an image mix): named, before any process group (d2v2-train)
    text = str(data_fixtures.prepared("text") / "manifest.json")
    r = subprocess.run([console_script("d2v2-train"), "--preset", "image-tiny", f"output_dir={tmp_path / 'run'}",
                        f"data.manifests=[{two_corpora[0]},{text}]"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "holds text data but the config's model.modality is 'image'" in err, r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("kind,field,value,message", [
    ("text", "spm_model", {"path": "spm.model", "sha256": "0" * 64},
     r"cannot be mixed: the vocabulary .* --spm-model .*a/spm.model"),
    ("audio", "dtype", "float32", r"cannot be mixed: dtype 'float32' vs 'int16'.* --sample-rate/--dtype of .*a")])
def test_mixture_needs_one_preprocessing(kind, field, value, message, tmp_path):
    """Text tokenized with another sentencepiece model, audio stored as another sample type."""
    from d2v2_scale.data.loader import check_data

    paths = []
    for name in ("a", "b"):
        shutil.copytree(data_fixtures.prepared(kind), tmp_path / name)
        if name == "b":
            m = json.loads((tmp_path / name / "manifest.json").read_text())
            m[field] = value
            (tmp_path / name / "manifest.json").write_text(json.dumps(m))
        paths.append(str(tmp_path / name / "manifest.json"))
    cfg = build_config(f"{kind}-tiny", overrides=[f"data.manifests=[{','.join(paths)}]"])
    with pytest.raises(DataError, match=message):
        check_data(cfg)


# ---- W&B options -------------------------------------------------------------------------------
def test_wandb_bad_option_or_missing_package_is_one_line(two_corpora, monkeypatch):
    from d2v2_scale.train import preflight

    with pytest.raises(ConfigError, match="logging.wandb_project='a/b'"):
        _mix_cfg(two_corpora, "logging.wandb=true", "logging.wandb_project=a/b").validate()
    with pytest.raises(ConfigError, match="logging.wandb_tags"):
        _mix_cfg(two_corpora, "logging.wandb=true", "logging.wandb_tags=['']").validate()
    cfg = _mix_cfg(two_corpora, "logging.wandb=true")
    assert preflight(cfg) is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package gives
    err = preflight(cfg)
    assert err.startswith("logging.wandb=true but the wandb package is not installed") and "\n" not in err


# ---- end to end: two corpora, resume, run record, TensorBoard, W&B offline ----------------------
def _wandb_records(path):
    """The records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of [crc32 u32, length
    u16, type u8] chunks, type 1 = a whole record, 2/3/4 = first/middle/last piece), as protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def _wandb_run(folder):
    """(run id, tags, config keys, {step: {key: value}}) from one offline run folder."""
    run_id, tags, config, history = None, [], set(), {}
    for rec in _wandb_records(next(folder.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id, tags = rec.run.run_id, list(rec.run.tags)
            config |= {u.key for u in rec.run.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, tags, config, history


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_two_corpus_run_resumes_exactly_with_record_and_wandb(two_corpora, tmp_path):
    """2 processes, ZeRO-1, books:wiki = 1:3.  Uninterrupted 6 steps vs 3 + resume auto to 6:
    bitwise equal losses and per-corpus counts; each (re)start leaves a run-record entry, its
    first and last step logged, and the same W&B run continued."""
    common = ["image-tiny", f"data.manifests=[{','.join(two_corpora)}]", "data.manifest_weights=[1,3]",
              "data.batch_size=8", "parallel.zero_stage=1", "checkpoint.every_steps=3", "logging.every_steps=100"]
    env = {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true"}
    full = run_distributed("tests.dist_bodies_train:fit_body", nproc=2, timeout=240,
                           args=[*common, f"output_dir={tmp_path / 'full'}", "max_steps=6"])
    out = tmp_path / "split"
    wb = ["logging.wandb=true", "logging.wandb_tags=[mix,ci]", "logging.wandb_project=d2v2-ci"]
    run_distributed("tests.dist_bodies_train:fit_body", nproc=2, timeout=240, env=env,
                    args=[*common, f"output_dir={out}", "max_steps=3", *wb])
    second = run_distributed("tests.dist_bodies_train:fit_body", nproc=2, timeout=240, env=env,
                             args=[*common, f"output_dir={out}", "max_steps=6", "checkpoint.resume=auto", *wb])
    ref = dict(map(tuple, full[0]["losses"]))
    resumed = dict(map(tuple, second[0]["losses"]))
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert resumed[s] == ref[s], (s, resumed[s], ref[s])

    # the run record: one entry per (re)start, the mix's counts exact across the resume
    hist = json.loads((out / "run_record.json").read_text())["history"]
    assert [h["event"] for h in hist] == ["start", "resume"]
    assert hist[1]["step"] == 3 and hist[1]["resumed_from"].endswith("step_00000003")
    for h in hist:
        assert "commit" in h["code"] or h["code"]["git"] == "not a git checkout"
        assert {"python", "torch", "deepspeed", "megatron-core", "wandb"} <= set(h["versions"])
        w = h["world"]
        assert (w["processes"], w["dp"], w["tp"], w["pp"], w["zero_stage"], w["nodes"]) == (2, 2, 1, 1, 1, 1)
        assert [m["sha256"] for m in h["data"]["manifests"]] == [sha256_file(p) for p in two_corpora]
        assert [c["share"] for c in h["data"]["mixture"]["corpora"]] == [0.25, 0.75]
        assert h["config"]["data"]["manifest_weights"] == [1, 3]
    full_end = json.loads((tmp_path / "full" / "run_record.json").read_text())["history"][-1]["end"]
    assert hist[0]["end"]["step"] == 3 and hist[1]["end"]["step"] == 6
    assert hist[1]["data"]["mixture"]["samples_so_far"] == hist[0]["end"]["corpus_samples"]
    assert hist[1]["end"]["corpus_samples"] == full_end["corpus_samples"]
    counts = full_end["corpus_samples"]
    assert sum(counts.values()) == 6 * 16 and 0.15 < counts["books"] / 96 < 0.35, counts

    # TensorBoard: the first and last step of each (re)start, the record as text and hparams
    acc = _tensorboard(out / "tensorboard")
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 3, 4, 6]
    assert [e.step for e in _tensorboard(tmp_path / "full" / "tensorboard").Scalars("loss/total")] == [1, 6]
    tensors = acc.Tags()["tensors"]
    assert "run_record/text_summary" in tensors
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = acc.PluginTagToContent("hparams")
    hparams = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["world.dp"].number_value == 2 and hparams["data.manifest_weights"].string_value == "[1, 3]"
    tb_scalars = set(acc.Tags()["scalars"])
    # the mix's running totals as scalars: the end record's counts at the last step
    assert {k: acc.Scalars(f"data/samples/{k}")[-1].value for k in ("books", "wiki")} == hist[1]["end"]["corpus_samples"]

    # W&B, offline: one run id for both starts, the same scalars as TensorBoard, the record as config
    run_file = json.loads((out / "wandb_run.json").read_text())
    runs = [_wandb_run(f) for f in sorted((out / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2
    for run_id, tags, config, history in runs:
        assert run_id == run_file["id"] and tags == ["mix", "ci"]
        assert {"config", "code", "versions", "world", "data"} <= config
    assert sorted(runs[0][3]) == [1, 3] and sorted(runs[1][3]) == [4, 6]
    assert set(runs[1][3][6]) == tb_scalars
    # a logged value is its window's mean, as in TensorBoard: steps 5 and 6 here
    assert runs[1][3][6]["loss/total"] == pytest.approx((ref[5] + ref[6]) / 2, rel=1e-6)
    assert runs[1][3][6]["loss/total"] == pytest.approx(acc.Scalars("loss/total")[-1].value, rel=1e-6)
