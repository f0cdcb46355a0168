"""fairseq's own training-loop pieces as the oracle for the trainer (issue #29).

Like tests/fairseq_oracle.py (whose `ensure_fairseq` cache and subprocess convention this reuses:
fairseq never enters the test process), `python tests/fairseq_trainer_oracle.py OUT [part...]`
runs fairseq-fixed's own code and writes what it computed:

  * units.pt: fairseq's learning-rate schedulers (`cosine`, `tri_stage`, built from their own
    config dataclasses) -> the LR of every update k of a schedule, as fairseq's trainer applies
    it (`step_update(k - 1)`); and fairseq's `Adam` (fairseq/optim/adam.py, the CPU form) stepped
    on a fixed gradient sequence -> the parameters after each step.
  * SYSTEM/traj.pt for SYSTEM in SYSTEMS: fairseq's real `fairseq.trainer.Trainer.train_step`,
    configured by its own recipe yaml (examples/data2vec/config/...) shrunk to tiny sizes (fp32
    on CPU, dropout 0, peak LR 1e-3 with 10 warm-up updates then cosine to max_update 40, EMA
    0.99 -> 0.999 over 40 updates), UPDATES updates on fixed random batches and masks:
    per update the LR it ran at, the loss (per sample_size, as the project's), the pre-clip
    gradient norm and the EMA decay of the step after it; plus SYSTEM/init.pt (the initial
    student and EMA teacher, saved as an fp32 fairseq run saves them: the input of `d2v2-import
    --to-run`), SYSTEM/final.pt (after UPDATES updates, the last EMA step applied) and
    SYSTEM/after12.pt (the same after SNAPSHOT updates).
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
# to record: "all" or a list); the sizes of the project's presets (config/presets/)
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
# system -> (recipe yaml under examples/data2vec/config, the project preset it maps to)
SYSTEMS = {"image": ("v2/base_images_only_task", "image-tiny"), "text": ("v2/base_text_only_task", "text-tiny"),
           "audio": ("v2/base_audio_only_task", "audio-tiny"),
           "d2v1_audio": ("audio/pretraining/base_librispeech", "d2v1-audio-tiny"),
           "d2v1_text": ("text/pretraining/base", "d2v1-text-tiny")}
UPDATES, MAX_UPDATE, WARMUP, PEAK = 40, 40, 10, 1e-3
SNAPSHOT = 12  # also saved after this many updates (SYSTEM/after12.pt): the test suite's shorter run
EMA = (0.99, 0.999, 40)  # start, end, anneal end step
BATCH = 2  # samples per update
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


def _recipe(system: str, tmp: Path):
    """The recipe yaml + the tiny-size, fp32, no-dropout overrides -> fairseq's full config
    (FairseqConfig defaults and each registry's dataclass defaults added, as hydra_train does)."""
    from omegaconf import OmegaConf
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.dataclass.initialize import add_defaults

    # register data2vec's models and tasks (the recipes' common.user_dir, which fairseq-hydra-train imports)
    import examples.data2vec.models.data2vec2  # noqa: F401
    import examples.data2vec.models.data2vec_audio  # noqa: F401
    import examples.data2vec.models.data2vec_text  # noqa: F401
    import examples.data2vec.tasks  # noqa: F401,F811

    root = Path(__import__("examples").__file__).parent / "data2vec" / "config"
    y = OmegaConf.load(root / f"{SYSTEMS[system][0]}.yaml")
    m = y.model
    common = {"fp16": False, "bf16": False, "amp": False, "cpu": True, "user_dir": None, "tensorboard_logdir": None,
              "seed": 1, "log_interval": 1000}
    y.common = OmegaConf.merge(y.get("common", {}), common)
    y.distributed_training = {"distributed_world_size": 1, "ddp_backend": "legacy_ddp"}
    y.optimization.max_update = MAX_UPDATE
    y.optimization.lr = [PEAK]
    y.optimization.update_freq = [1]
    if y.optimizer._name == "composite":
        y.optimizer.groups.default.lr_float = PEAK
        y.optimizer.groups.default.lr_scheduler.warmup_updates = WARMUP
    elif y.lr_scheduler._name == "cosine":
        y.lr_scheduler.warmup_updates = WARMUP
    if isinstance(y.optimizer.get("adam_betas"), str):  # the 1.0 yamls write "(0.9,0.98)"
        y.optimizer.adam_betas = [float(x) for x in y.optimizer.adam_betas.strip("()").split(",")]
    y.checkpoint = {"no_save": True}
    y.dataset = {"batch_size": BATCH}
    y.task.data = str(tmp)
    if "text" in system:
        (tmp / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(19)))
    m.ema_decay, m.ema_end_decay, m.ema_anneal_end_step = EMA
    if system in ("image", "text", "audio"):
        m.depth, m.embed_dim, m.num_heads, m.mlp_ratio, m.clone_batch, m.average_top_k_layers = 2, 32, 4, 2.0, 2, 2
        m.encoder_dropout = m.post_mlp_drop = m.attention_dropout = m.activation_dropout = m.dropout_input = 0.0
        m.layerdrop = 0.0
        mc = m.modalities[system]
        mc.num_alibi_heads, mc.model_depth = 4, 2
        mc.prenet_dropout, mc.prenet_layerdrop, mc.mask_noise_std = 0.0, 0.0, 0.0
        mc.decoder = OmegaConf.merge(mc.get("decoder", {}), {"decoder_dim": 16, "decoder_kernel": 3,
                                                             "decoder_layers": 2, "input_dropout": 0.0})
        if system == "image":
            mc.input_size, mc.patch_size, mc.in_chans, mc.embed_dim, mc.prenet_depth = 32, 8, 3, 32, 1
            mc.decoder.decoder_groups = 4
        elif system == "audio":
            mc.feature_encoder_spec = "[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16,2,2)]"
            mc.conv_pos_width, mc.conv_pos_depth, mc.conv_pos_groups, mc.prenet_depth = 10, 2, 4, 1
            mc.decoder.decoder_groups = 4
        else:
            mc.max_source_positions, mc.dropout, mc.prenet_depth = 24, 0.0, 0
            y.task.tokens_per_sample = 20
    elif system == "d2v1_audio":
        m.encoder_layers, m.encoder_embed_dim, m.encoder_ffn_embed_dim, m.encoder_attention_heads = 2, 32, 64, 4
        m.conv_feature_layers = "[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16,2,2)]"
        m.conv_pos, m.pos_conv_depth, m.conv_pos_groups = 10, 2, 4
        m.dropout = m.attention_dropout = m.activation_dropout = m.dropout_input = m.dropout_features = 0.0
        m.encoder_layerdrop, m.average_top_k_layers, m.mask_length = 0.0, 2, 2
    else:
        m.max_positions, m.average_top_k_layers = 24, 2
        m.transformer = OmegaConf.merge(m.transformer, {
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "max_source_positions": 24,
            "encoder": {"embed_dim": 32, "ffn_embed_dim": 64, "layers": 2, "attention_heads": 4, "layerdrop": 0.0},
            # the unused decoder's dims are interpolations of a `model.decoder` this model has not
            "decoder": {"embed_dim": 32, "input_dim": 32, "output_dim": 32}})
        y.task.tokens_per_sample = 20
    cfg = OmegaConf.merge(OmegaConf.structured(FairseqConfig), y)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    add_defaults(cfg)
    return cfg


def _batches(system: str, model, gen):
    """UPDATES fixed batches: the net_input fairseq's criterion passes to the model, and the
    project's batch (source, mask, text 1.0: student_source)."""
    import torch

    out = []
    for _ in range(UPDATES):
        if system == "image":
            src = torch.randn(BATCH, 3, 32, 32, generator=gen)
            t, n_mask, rows = 16, 12, BATCH * 2
        elif system in ("audio", "d2v1_audio"):
            src = torch.randn(BATCH, 1200, generator=gen)
            t = model.feature_extractor(src[:1]).shape[-1] if system == "d2v1_audio" else \
                model.modality_encoders["AUDIO"].local_encoder(src[:1]).shape[-1]
            n_mask, rows = t // 2, BATCH * (2 if system == "audio" else 1)
        else:
            src = torch.randint(4, 19 + 4, (BATCH, 20), generator=gen)
            src[:, 0], src[:, -1] = 0, 2  # <s> ... </s>
            t, n_mask, rows = 20, 8, BATCH * (2 if system == "text" else 1)
        keys = torch.rand(rows, t, generator=gen)
        if "text" in system:  # never mask <s> / </s>
            keys[:, 0] = keys[:, -1] = 2.0
        mask = torch.zeros(rows, t, dtype=torch.bool)
        mask.scatter_(1, keys.argsort(1)[:, :n_mask], True)
        ours = {"source": src, "mask": mask}
        if system in ("image", "text", "audio"):
            net = {"source": src, "precomputed_mask": mask.float()}
        elif system == "d2v1_audio":
            net = {"source": src, "padding_mask": None, "mask": True, "mask_indices": mask}
        else:
            mask_idx = model.encoder.mask_idx
            student = src.masked_fill(mask, mask_idx)
            net = {"src_tokens": student, "target_tokens": src}
            ours["student_source"] = student
        out.append({"net": net, "ours": ours})
    return out


def _trajectory(system: str, out: Path) -> None:
    import copy

    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from fairseq import tasks
    from fairseq.trainer import Trainer

    from tests_fairseq_oracle import _save_fairseq  # noqa: the sibling script, on sys.path below

    d = out / system
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = _recipe(system, d)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    if system.startswith("d2v1"):
        model.set_num_updates(0)  # fairseq builds the 1.0 EMA teacher (a copy of the student) here
    ema = model.ema if system != "d2v1_text" else model.encoder.ema
    ema.build_fp32_params()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    _save_fairseq(model, model_cfg, d, updates=0, fp16=False, name="init.pt")
    gen = torch.Generator().manual_seed(5)
    batches = _batches(system, model, gen)
    trainer = Trainer(cfg, task, model, criterion)
    rec = {"lr": [], "loss": [], "grad_norm": [], "ema_decay": [], "sample_size": []}
    orig_clip, orig_fwd = trainer.clip_grad_norm, criterion.forward

    def clip(max_norm):
        n = orig_clip(max_norm)
        rec["grad_norm"].append(float(n))
        return n

    def fwd(model_, sample, reduce=True):
        loss, ss, log = orig_fwd(model_, sample, reduce)
        rec["loss"].append(loss.item() / float(ss))
        rec["sample_size"].append(float(ss))
        return loss, ss, log

    trainer.clip_grad_norm, criterion.forward = clip, fwd
    for i, b in enumerate(batches):
        lr = trainer.get_lr()
        rec["lr"].append(float(next(iter(lr.values())) if isinstance(lr, dict) else lr))
        trainer.train_step([{"id": torch.arange(BATCH), "net_input": b["net"], "nsentences": BATCH}])
        if i:  # update i + 1's forward began with the EMA step of update i, at decay(i)
            rec["ema_decay"].append(float(ema.get_decay()))
        if i + 1 == SNAPSHOT:  # with the EMA step the next update begins with
            # (the model cannot be deep-copied: it holds the task).  2.0: set_num_updates skips a
            # repeated count, so the next update does not step again; 1.0 steps on every call, so
            # its EMA is put back as it was
            keep = (copy.deepcopy(ema.model.state_dict()), copy.deepcopy(ema.fp32_params), ema.get_decay())
            model.set_num_updates(SNAPSHOT)
            _save_fairseq(model, model_cfg, d, updates=SNAPSHOT, fp16=False, name=f"after{SNAPSHOT}.pt")
            if system.startswith("d2v1"):
                ema.model.load_state_dict(keep[0])
                ema.fp32_params = keep[1]
                ema.set_decay(keep[2])
    model.train()
    model.set_num_updates(UPDATES)  # the EMA step the next update would begin with
    rec["ema_decay"].append(float(ema.get_decay()))
    _save_fairseq(model, model_cfg, d, updates=UPDATES, fp16=False, name="final.pt")
    torch.save({"batches": [b["ours"] for b in batches], **rec, "updates": UPDATES}, d / "traj.pt")


def main(argv):
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for part in argv[2:] or ["units"]:
        if part == "units":
            _units(out)
        else:
            _trajectory(part, out)
        print(f"built {part}", flush=True)


if __name__ == "__main__":
    here = sys.path.pop(0)  # as tests/fairseq_oracle.py: nothing of tests/ may shadow fairseq's modules
    import importlib.util

    # the checkpoint writer of tests/fairseq_oracle.py, loaded by path (tests/ is not a package here)
    spec = importlib.util.spec_from_file_location("tests_fairseq_oracle", Path(here) / "fairseq_oracle.py")
    sys.modules["tests_fairseq_oracle"] = mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main(sys.argv)
