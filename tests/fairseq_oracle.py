"""fairseq's own data2vec 2.0 (Data2VecMultiModel) as the oracle for `d2v2-import`.

Two halves:
  * `ensure_fairseq(cache)` (runs in the test process, touches only files): `pip download` the
    fairseq-fixed sdist from the package registry, unpack it, patch two Python 3.11 / NumPy 2
    incompatibilities in its examples folder (mutable dataclass defaults -> default_factory,
    np.float -> np.float64), and `pip install --no-deps --target` fairseq's pure-Python
    dependencies (hydra, omegaconf, timm, ...) next to it.  Nothing is compiled; nothing is
    installed into the test venv.
  * `python tests/fairseq_oracle.py OUT` (run in a SUBPROCESS with PYTHONPATH = that source +
    those deps, so fairseq never enters the test process): builds tiny Data2VecMultiModels
    (image with and without prenet blocks, audio, text), perturbs every weight away from its
    init, saves each the way fairseq's trainer does ({"args": None, "cfg": plain dict, "model":
    fp16 student state + "_ema": fp32 teacher, ...}), and records fairseq's own outputs on a
    fixed input: student features (unmasked encoder), the EMA teacher's targets (captured from
    `make_targets` inside the real pretraining forward) and the loss on a fixed batch/mask.
    Each case also has checkpoint_fp32.pt: the same model saved as an --amp / fp32 run saves it
    (fp32 student, unrounded).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "fairseq-fixed==0.12.3.1"
# fairseq's runtime imports (top-level `import fairseq` pulls in every task/model module), pinned
# to versions that import with the test venv's torch/numpy.  torchvision is only imported (by
# timm); its compiled ops are never used (the registry's wheel is CUDA-linked and cannot load them).
DEPS = ["hydra-core==1.3.8", "omegaconf==2.4.0", "antlr4-python3-runtime==4.9.3", "timm==1.0.31",
        "torchvision==0.15.2", "requests", "urllib3", "idna", "charset_normalizer", "certifi",
        "bitarray", "sacrebleu", "regex", "portalocker", "tabulate", "colorama", "lxml"]
CASES = ["image_p0", "image_p1", "audio", "text"]
# data2vec 1.0 (fairseq examples/data2vec/models/data2vec_audio.py, data2vec_text.py)
CASES1 = ["d2v1_audio", "d2v1_text"]

_MUTABLE = re.compile(r"^(\s+\w+: [^=\n]+)= ([A-Z]\w*)\(\)\s*$", re.M)


def _patch_examples(src: Path) -> None:
    """Python 3.11 refuses dataclass instances as defaults; NumPy 2 has no np.float."""
    for f in (src / "fairseq" / "examples" / "data2vec").rglob("*.py"):
        text = f.read_text()
        new = _MUTABLE.sub(r"\1= field(default_factory=\2)", text)
        new = re.sub(r"\bnp\.float\b", "np.float64", new)
        if new != text:
            if "field(default_factory" in new and not re.search(r"^from dataclasses import .*\bfield\b", new, re.M):
                new = "from dataclasses import field\n" + new
            f.write_text(new)


def ensure_fairseq(cache: Path) -> dict:
    """-> {"PYTHONPATH": ...} for the oracle subprocess; builds `cache` once (marker file)."""
    cache = Path(cache)
    done = cache / "READY"
    src, deps = cache / "src", cache / "deps"
    if not done.is_file():
        shutil.rmtree(cache, ignore_errors=True)
        (cache / "dl").mkdir(parents=True)
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + ["download", SDIST, "--no-deps", "--no-build-isolation", "-d", str(cache / "dl")],
                       check=True, timeout=600)
        (tgz,) = (cache / "dl").glob("fairseq_fixed-*.tar.gz")
        with tarfile.open(tgz) as t:
            try:
                t.extractall(cache / "unpacked", filter="data")  # no links/paths out of the folder
            except TypeError:  # Python < 3.11.4 has no extraction filters
                t.extractall(cache / "unpacked")
        (root,) = (cache / "unpacked").iterdir()
        _patch_examples(root)
        # data2vec imports `examples.data2vec...`: expose fairseq/examples as a top-level package
        # (the sdist's own top-level examples/ folder holds only unrelated operators)
        src.mkdir()
        (src / "fairseq").symlink_to(root / "fairseq", target_is_directory=True)
        (src / "examples").symlink_to(root / "fairseq" / "examples", target_is_directory=True)
        subprocess.run(pip + ["install", "--no-deps", "--target", str(deps)] + DEPS, check=True, timeout=900)
        done.write_text("ok\n")
    return {"PYTHONPATH": f"{src}{os.pathsep}{deps}"}


def run_oracle(cache: Path, out: Path, timeout: int = 600) -> None:
    env = dict(os.environ, **ensure_fairseq(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=str(out.parent))
    if r.returncode != 0:
        raise RuntimeError(f"fairseq oracle failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


# -------------------------------------------------------------------------------------------------
# subprocess side: everything below imports fairseq
# -------------------------------------------------------------------------------------------------

DICT_WORDS = [f"w{i}" for i in range(19)]


def _plain(obj):
    """dataclass config -> plain dict as fairseq stores it (OmegaConf.to_container(enum_to_str))."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    return obj


def _config(case: str):
    from examples.data2vec.data.modality import Modality
    from examples.data2vec.models.data2vec2 import Data2VecMultiConfig

    c = Data2VecMultiConfig()
    mod = case.split("_")[0]
    c.depth, c.embed_dim, c.num_heads, c.mlp_ratio = 3, 32, 4, 2.0
    # dropout off everywhere: the oracle's outputs must be deterministic
    c.encoder_dropout = c.post_mlp_drop = c.attention_dropout = c.activation_dropout = c.dropout_input = 0.0
    c.layerdrop = 0.0
    c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step, c.max_update, c.seed = 0.999, 0.9999, 1000, 1000, 1
    c.clone_batch = 2
    c.loss_beta, c.loss_scale = 0.0, None
    c.average_top_k_layers = 2
    c.supported_modality = Modality[mod.upper()]
    for m in ("audio", "image", "text"):
        mc = getattr(c.modalities, m)
        mc.num_alibi_heads, mc.model_depth = c.num_heads, c.depth
        mc.decoder.input_dropout = 0.0
        mc.prenet_dropout = 0.0
        # masked slots enter the decoder as N(0, std^2) noise: 0 makes the loss reproducible outside
        # fairseq (the two implementations draw their noise from different generators)
        mc.mask_noise_std = 0.0
    if mod == "image":
        c.norm_eps = 1e-6
        c.ema_encoder_only = False
        c.instance_norm_target_layer, c.layer_norm_targets = True, True
        c.cls_loss = 0.01
        m = c.modalities.image
        m.input_size, m.patch_size, m.in_chans, m.embed_dim = 32, 8, 3, 32
        m.prenet_depth = 1 if case == "image_p1" else 0
        m.num_extra_tokens, m.ema_local_encoder, m.inverse_mask = 1, True, True
        m.decoder.decoder_dim, m.decoder.decoder_kernel, m.decoder.decoder_layers = 16, 3, 2
        m.decoder.decoder_groups = 4
    elif mod == "audio":
        c.norm_eps = 1e-5
        c.ema_encoder_only = False
        c.instance_norm_target_layer = True
        m = c.modalities.audio
        m.feature_encoder_spec = "[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16,2,2)]"
        m.conv_pos_width, m.conv_pos_depth, m.conv_pos_groups = 10, 2, 4  # kernel max(3, 10 // 2) = 5
        m.prenet_depth = 1
        m.use_alibi_encoder, m.learned_alibi_scale, m.learned_alibi_scale_per_head = True, True, True
        m.ema_local_encoder = False
        m.decoder.decoder_dim, m.decoder.decoder_kernel, m.decoder.decoder_layers = 16, 3, 2
        m.decoder.decoder_groups = 4
    else:
        c.norm_eps = 1e-5
        c.ema_encoder_only = True
        c.layer_norm_target_layer, c.instance_norm_targets = True, True
        c.loss_scale = 1.0
        m = c.modalities.text
        m.max_source_positions, m.prenet_depth, m.dropout = 24, 0, 0.0
        m.mask_length = 1
        m.decoder.decoder_dim, m.decoder.decoder_kernel, m.decoder.decoder_layers = 16, 3, 2
        m.decoder.decoder_groups, m.decoder.decoder_residual = 1, False
        m.decoder.projection_layers, m.decoder.projection_ratio = 2, 2.0
    return c


def _inputs(case: str, model, gen):
    import torch

    mod = case.split("_")[0]
    if mod == "image":
        src = torch.randn(2, 3, 32, 32, generator=gen)
        return src, None
    if mod == "audio":
        src = torch.randn(2, 1200, generator=gen)
        return src, None
    d = model.modality_encoders["TEXT"].local_encoder.embed_tokens.weight.shape[0]
    src = torch.randint(4, d - 1, (2, 20), generator=gen)
    src[:, 0] = 0  # <s>
    return src, None


def _masks(n_rows: int, t: int, n_masked: int, gen):
    import torch

    keys = torch.rand(n_rows, t, generator=gen)
    idx = keys.argsort(1)[:, :n_masked]
    m = torch.zeros(n_rows, t)
    m.scatter_(1, idx, 1.0)
    return m


def _save_fairseq(model, cfg, out: Path, updates: int, fp16: bool = True, name: str = "checkpoint.pt") -> None:
    """out/checkpoint.pt as fairseq's trainer writes it: the trainer halves the model for fp16
    training (the EMA's fp32 copy, in the state dict under "_ema", stays fp32); numpy scalars in
    extra_state as fairseq's meters leave them.  fp16=False: an --amp / fp32 run's file (the
    student stays fp32).  The model is back in fp32 afterwards."""
    import numpy as np
    import torch

    if fp16:
        model.half()
    ckpt = {
        "args": None,
        "cfg": {"_name": None, "model": _plain(cfg), "task": {"_name": "oracle"},
                "common": {"fp16": fp16, "amp": not fp16, "seed": 1}},
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": updates}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": np.float64(12.5),
                        "train_iterator": {"epoch": 1, "iterations_in_epoch": updates, "shuffle": True}},
    }
    torch.save(ckpt, out / name)
    model.float()


def build_case(case: str, out: Path) -> None:
    import numpy as np
    import torch
    from examples.data2vec.models.data2vec2 import Data2VecMultiModel
    from fairseq.data import Dictionary

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = _config(case)
    task = None
    if case == "text":
        (out / "dict.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(DICT_WORDS)))
        d = Dictionary.load(str(out / "dict.txt"))
        d.add_symbol("<mask>")
        import types

        task = types.SimpleNamespace(source_dictionary=d)
    model = Data2VecMultiModel.build_model(cfg, task)
    with torch.no_grad():
        # move every weight away from its init (norms at 1/0, biases at 0 would hide mistakes)
        for name, p in model.named_parameters():
            if not p.requires_grad:  # fixed tables (image sin-cos positions) stay as fairseq builds them
                continue
            p.add_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() == 1 else 0.05))
        # the teacher is a *different* set of weights than the student (as after many EMA steps)
        for name, p in model.ema.model.named_parameters():
            if "fixed_positional_encoder" in name:
                continue
            p.copy_(p + torch.randn(p.shape, generator=gen) * (0.2 if p.dim() == 1 else 0.05))
        model.ema.build_fp32_params()
    # fairseq's trainer halves the model for fp16 training; the EMA copy stays fp32
    # the same weights unrounded first (an --amp run's file), then the fp16 one the oracle uses
    _save_fairseq(model, cfg, out, updates=7, fp16=False, name="checkpoint_fp32.pt")
    _save_fairseq(model, cfg, out, updates=7)

    mod = case.split("_")[0].upper()
    src, pad = _inputs(case, model, gen)
    model.eval()
    with torch.no_grad():
        feats = model.extract_features(src, mode=mod, padding_mask=pad, mask=False, remove_extra_tokens=True)
    # the real pretraining forward with a fixed mask (dropout is 0); capture fairseq's targets
    captured = {}
    orig = model.make_targets

    def grab(y, k):
        captured["layers"] = [t.detach().clone() for t in y]
        t = orig(y, k)
        captured["targets"] = t.detach().clone()
        return t

    model.make_targets = grab
    enc = model.modality_encoders[mod]
    with torch.no_grad():
        local = enc.local_features(src)
    t = local.shape[1]
    n_masked = int(t * 0.5)
    mask = _masks(src.shape[0] * cfg.clone_batch, t, n_masked, gen)
    model.train()
    with torch.no_grad():
        res = model(src, mode=mod, padding_mask=pad, precomputed_mask=mask)
    n = res["sample_size"].float()
    losses = {k: (v.float().sum() / n).item() for k, v in res["losses"].items()}
    torch.save({"source": src, "features": feats["x"].float(), "targets": captured["targets"].float(),
                "mask": mask, "losses": losses, "sample_size": int(n)}, out / "oracle.pt")


# ---- data2vec 1.0 ---------------------------------------------------------------------------------


def _config1(case: str):
    """Tiny Data2VecAudioConfig / Data2VecTextConfig, dropout off, the released recipes' switches."""
    if case == "d2v1_audio":
        from examples.data2vec.models.data2vec_audio import Data2VecAudioConfig

        c = Data2VecAudioConfig()
        c._name = "data2vec_audio"
        c.encoder_layers, c.encoder_embed_dim, c.encoder_ffn_embed_dim, c.encoder_attention_heads = 3, 32, 64, 4
        c.extractor_mode, c.conv_bias = "layer_norm", False
        c.conv_feature_layers = "[(16, 10, 5)] + [(16, 3, 2)] * 2 + [(16,2,2)]"
        c.conv_pos, c.pos_conv_depth, c.conv_pos_groups = 10, 2, 4  # kernel max(3, 10 // 2) = 5
        c.dropout = c.attention_dropout = c.activation_dropout = c.dropout_input = c.dropout_features = 0.0
        c.encoder_layerdrop = 0.0
        c.average_top_k_layers, c.instance_norm_target_layer = 2, True
        c.loss_beta, c.loss_scale = 0.0, None
        c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step, c.max_update = 0.999, 0.9999, 1000, 1000
        c.ema_transformer_only = c.ema_layers_only = True
        c.mask_prob, c.mask_length = 0.65, 2
        return c
    from examples.data2vec.models.data2vec_text import Data2VecTextConfig

    c = Data2VecTextConfig()
    c._name = "data2vec_text"
    c.max_positions, c.head_layers = 24, 2
    c.average_top_k_layers, c.layer_norm_target_layer = 2, True
    c.loss_beta, c.loss_scale = 4.0, 1.0
    c.ema_decay, c.ema_end_decay, c.ema_anneal_end_step = 0.999, 0.9999, 1000
    c.ema_transformer_layers_only = True
    t = c.transformer
    t.dropout = t.attention_dropout = t.activation_dropout = 0.0
    t.activation_fn, t.layernorm_embedding, t.no_scale_embedding, t.max_source_positions = "gelu", True, True, 24
    e = t.encoder
    e.embed_dim, e.ffn_embed_dim, e.layers, e.attention_heads = 32, 64, 3, 4
    e.normalize_before, e.learned_pos, e.layerdrop = False, True, 0.0
    return c


def build_case1(case: str, out: Path) -> None:
    """A data2vec 1.0 model built by fairseq's own class, random weights (student and EMA teacher
    apart), saved as fairseq's trainer saves it: {"cfg": {"model": Data2VecAudio/TextConfig},
    "model": fp16 student state + the EMA's fp32 params under "_ema" (audio: the transformer only,
    `ema_transformer_only`; text: "encoder._ema", the sentence encoder)}.  oracle.pt: every layer's
    output and FFN tap (fc2 output before the residual) of the student and of the EMA teacher on a
    right-padded batch, eval mode; audio also fairseq's pretraining loss on a fixed mask."""
    import types

    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = _config1(case)
    if case == "d2v1_audio":
        from examples.data2vec.models.data2vec_audio import Data2VecAudioModel

        model = Data2VecAudioModel.build_model(cfg)
        skip = ("pos_conv.",)  # ema_layers_only: the positional conv is copied, not averaged
    else:
        from examples.data2vec.models.data2vec_text import Data2VecTextModel
        from fairseq.data import Dictionary

        (out / "dict.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(DICT_WORDS)))
        d = Dictionary.load(str(out / "dict.txt"))
        d.add_symbol("<mask>")
        task = types.SimpleNamespace(source_dictionary=d, cfg=types.SimpleNamespace(data=str(out)))
        model = Data2VecTextModel.build_model(cfg, task)
        skip = ("embed_tokens.", "embed_positions.", "layernorm_embedding.")  # ema_transformer_layers_only
    with torch.no_grad():
        for _, p in model.named_parameters():
            # rounded to fp16 as an fp16-trained student is: the EMA's skip keys (below) are copies
            # of those fp16 values in a real file
            p.copy_((p + torch.randn(p.shape, generator=gen) * (0.2 if p.dim() == 1 else 0.05)).half().float())
    # fairseq builds the EMA teacher at the first set_num_updates: a copy of the student's encoder
    model.set_num_updates(1)
    ema = model.ema if case == "d2v1_audio" else model.encoder.ema
    with torch.no_grad():
        # the teacher is a different set of weights (as after many EMA steps), except the skip
        # keys, which every EMA step copies from the student
        for name, p in ema.model.named_parameters():
            if not name.startswith(skip):
                p.copy_(p + torch.randn(p.shape, generator=gen) * (0.2 if p.dim() == 1 else 0.05))
        ema.build_fp32_params()
    # the same weights unrounded first (an --amp run's file), then the fp16 one the oracle uses
    _save_fairseq(model, cfg, out, updates=9, fp16=False, name="checkpoint_fp32.pt")
    _save_fairseq(model, cfg, out, updates=9)
    model.eval()
    res = {}
    with torch.no_grad():
        if case == "d2v1_audio":
            src = torch.randn(2, 1200, generator=gen)
            pad = torch.zeros(2, 1200, dtype=torch.bool)
            pad[1, 900:] = True
            src = src.masked_fill(pad, 0.0)
            r = model.extract_features(src, pad, mask=False)
            t = r["x"].shape[1]
            # layer_results: (block output, attention, FFN tap), T x B x C, padded to a multiple of 2
            res["student"] = {"hidden": [l[0].transpose(0, 1)[:, :t].float() for l in r["layer_results"]],
                              "ffn": [l[2].transpose(0, 1)[:, :t].float() for l in r["layer_results"]],
                              "x": r["x"].float()}
            fpad = r["padding_mask"]
            feats = model.post_extract_proj(model.layer_norm(model.feature_extractor(src).transpose(1, 2)))
            y, lrs = ema.model.extract_features(feats, padding_mask=fpad)
            res["teacher"] = {"hidden": [l[0].transpose(0, 1)[:, :t].float() for l in lrs],
                              "ffn": [l[2].transpose(0, 1)[:, :t].float() for l in lrs]}
            res.update(source=src, padding_mask=pad, frame_padding=fpad)
            # the pretraining loss on the unpadded batch with a fixed mask (dropout 0, layerdrop 0)
            tf = model.feature_extractor(src[:, :1200]).shape[-1]
            mask = _masks(2, tf, tf // 2, gen).bool()
            model.train()
            out_ = model(src, padding_mask=None, mask=True, mask_indices=mask)
            n = int(out_["sample_size"])
            res["loss"] = {"source": src, "mask": mask, "loss": out_["losses"]["regression"].float().item() / n,
                           "sample_size": n}
        else:
            V = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
            src = torch.randint(4, V - 1, (2, 20), generator=gen)
            src[:, 0] = 0  # <s>
            src[:, -1] = 2  # </s>
            src[1, 14:] = 1  # right padding with <pad>
            src[1, 13] = 2
            enc = model.encoder.sentence_encoder
            o = enc(src, return_all_hiddens=True)
            res["student"] = {"hidden": [h.transpose(0, 1).float() for h in o["encoder_states"][1:]],
                              "ffn": [h.transpose(0, 1).float() for h in o["fc_results"]],
                              "x": o["encoder_out"][0].transpose(0, 1).float()}
            o = ema.model(src, return_all_hiddens=True)
            res["teacher"] = {"hidden": [h.transpose(0, 1).float() for h in o["encoder_states"][1:]],
                              "ffn": [h.transpose(0, 1).float() for h in o["fc_results"]]}
            res.update(source=src, padding_mask=src.eq(1))
            # the pretraining loss with a fixed mask: <mask> in the student's input; the teacher is
            # given the whole original sequence (the paper's input, as the project trains; fairseq's
            # task passes only the masked tokens, issue #4881)
            mask = _masks(2, src.shape[1], 6, gen).bool() & src.ne(1)
            student_src = src.masked_fill(mask, model.encoder.mask_idx)
            model.train()
            out_ = model(student_src, target_tokens=src)
            n = int(out_["sample_size"])
            res["loss"] = {"source": src, "student_source": student_src, "mask": mask,
                           "loss": out_["losses"]["main"].float().item() / n, "sample_size": n}
    torch.save(res, out / "oracle.pt")


def main(argv):
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = argv[2:] or CASES + CASES1
    for case in cases:
        d = out / case
        d.mkdir(exist_ok=True)
        (build_case1 if case in CASES1 else build_case)(case, d)
        print(f"built {case}", flush=True)


if __name__ == "__main__":
    # the unpacked fairseq is on PYTHONPATH; drop this tests/ folder from sys.path[0] so that
    # a `tests` package here cannot shadow anything of fairseq's
    sys.path.pop(0)
    main(sys.argv)
