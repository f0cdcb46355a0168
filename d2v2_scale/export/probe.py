"""`d2v2-probe`: linear-probe evaluation of an exported encoder (frozen features)
of any system: data2vec 2.0, data2vec 1.0 or data2vec-aqc.

    d2v2-probe EXPORT_DIR --data SHARDS/manifest.json [--pool mean|cls] [--layer final|K|targets]
               [--baseline init|torch|none]

1. features: every labelled row of the d2v2-prep shards goes through the exported plain twin,
   with the model input training uses, minus augmentation (one function per modality below):
   images: the whole image resized to model.image_size (bilinear), ImageNet mean/std, no crop
   or flip; audio: the whole waveform of the row, zero mean / unit variance; text: the row's
   token ids (cut to model.max_positions).  The final encoder output (`--layer final`, default),
   the output of block K (`--layer K`) or the data2vec targets (`--layer targets`) is pooled:
   `mean` over the tokens (patches / frames / tokens; default) or the `cls` token (image models
   only: audio and text encoders have none).  Batches hold inputs of one length only, so nothing
   is padded and a row's features never depend on its batch-mates;
2. a stratified train/test split (`--test-fraction`, `--seed`; classes with fewer than 2 labelled
   rows are left out);
3. standardize + multinomial logistic regression (scikit-learn) on the train split; accuracy on
   the held-out split;
4. the same for the same architecture randomly initialized (`--baseline init`: the training
   model's own initialization with the run's seed, i.e. the weights pretraining started from;
   `torch`: PlainEncoder's PyTorch-default init).

Labels come from d2v2-prep's label column: image folders / file lists, `d2v2-prep audio
--label-from parent|stem|filelist`, `d2v2-prep text --format tsv|jsonl --mode doc`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..data.augment import decode_image, normalize_wave
from ..data.manifest import DataError
from ..data.shards import ShardSet
from ..distributed import init_distributed
from ..model import build_student
from ..model.core.targets import make_targets
from ..train.trainer import seed_everything
from ..twins import mapping
from .consolidate import load_export, plain_encoder, ExportError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# how each modality's prep gets a label column (named in the error when it is missing)
LABEL_HINT = {"image": "d2v2-prep image stores labels for ImageFolder class folders and file-list labels",
              "audio": "re-run d2v2-prep audio with --label-from parent|stem|filelist",
              "text": "re-run d2v2-prep text with --format tsv|jsonl --mode doc"}


class ProbeError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# model inputs: one reader (shard row -> one sample) and one collate (samples -> batch) per
# modality; everything else in the probe is modality-free
# ---------------------------------------------------------------------------------------------


def read_image(shards, i: int, config: dict) -> np.ndarray:
    """-> float32 [C, S, S]: the whole image resized to image_size, normalized like training."""
    from PIL import Image

    s, c = config["image_size"], config["in_chans"]
    a = np.asarray(decode_image(shards.get(i, shards.image_columns()), c).resize((s, s), Image.Resampling.BILINEAR))
    a = a[..., None] if a.ndim == 2 else a
    # as training (data/augment.py): 1-channel models use the mean of the RGB statistics
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (IMAGENET_MEAN.mean(), IMAGENET_STD.mean())
    return np.ascontiguousarray(((a.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))


def read_audio(shards, i: int, config: dict) -> np.ndarray:
    """-> float32 [n_samples]: the whole row, zero mean / unit variance like training."""
    return normalize_wave(np.asarray(shards.get(i, ["audio"])["audio"], dtype=np.float32) * shards.audio_scale)


def read_text(shards, i: int, config: dict) -> np.ndarray:
    """-> int64 [T], T <= max_positions (the positional table's length): the row's first tokens."""
    return np.asarray(shards.get(i, ["tokens"])["tokens"][:config["max_positions"]], dtype=np.int64)


def collate_stack(samples: list[np.ndarray], config: dict) -> tuple[torch.Tensor, None]:
    """Equal-shape samples -> ([B, ...], no padding)."""
    return torch.from_numpy(np.stack(samples)), None


def collate_pad(samples: list[np.ndarray], config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D samples of different lengths -> (source [B, L] right-padded, padding_mask bool [B, L],
    True = padding).  The pad value is what training pads with: 0 for waveforms, pad_token_id
    for token ids."""
    n = np.array([len(x) for x in samples])
    value = config["pad_token_id"] if samples[0].dtype == np.int64 else 0
    src = np.full((len(samples), int(n.max())), value, dtype=samples[0].dtype)
    for b, x in enumerate(samples):
        src[b, :len(x)] = x
    return torch.from_numpy(src), torch.from_numpy(np.arange(src.shape[1])[None] >= n[:, None])


MODALITY_INPUTS = {"image": (read_image, collate_stack), "audio": (read_audio, collate_pad),
                   "text": (read_text, collate_pad)}


def check_data(shards, config: dict, manifest) -> None:
    """Raise ProbeError when the shards cannot feed this encoder (or have no labels)."""
    mod = config["modality"]
    if shards.modality != mod:
        raise ProbeError(f"{manifest} holds {shards.modality} data but the export is a {mod} encoder")
    if "label" not in shards.manifest["schema"]:
        raise ProbeError(f"{manifest}: the shards have no label column ({LABEL_HINT[mod]})")
    if mod == "text":
        if int(shards.manifest["vocab_size"]) > config["vocab_size"]:
            raise ProbeError(f"{manifest}: vocabulary of {shards.manifest['vocab_size']} tokens > the encoder's "
                             f"vocab_size {config['vocab_size']}: prepare with the model's sentencepiece model "
                             "(d2v2-prep text --spm-model)")
        if shards.manifest.get("pad_id", config["pad_token_id"]) != config["pad_token_id"]:
            raise ProbeError(f"{manifest}: pad id {shards.manifest['pad_id']} != the encoder's pad_token_id "
                             f"{config['pad_token_id']}")


def load_labelled(manifest: str | Path, config: dict, max_samples: int | None = None, seed: int = 0):
    """-> (samples: list of per-modality model inputs (see MODALITY_INPUTS), labels int64 [N],
    class names) for the labelled rows (label >= 0) of classes with at least 2 rows.

    max_samples: a seeded random subset of the labelled rows (in corpus order), for big corpora."""

    shards = ShardSet(manifest)
    check_data(shards, config, manifest)
    labels = shards.column("label").astype(np.int64)
    idx = np.flatnonzero(labels >= 0)
    if max_samples and len(idx) > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_samples, replace=False))
    cls, counts = np.unique(labels[idx], return_counts=True)
    idx = idx[np.isin(labels[idx], cls[counts >= 2])]  # a stratified split needs 2 rows per class
    if len(np.unique(labels[idx])) < 2:
        raise ProbeError(f"{manifest}: fewer than 2 classes with 2 or more labelled rows (label -1 = unlabelled)")
    read, _ = MODALITY_INPUTS[config["modality"]]
    return [read(shards, int(i), config) for i in idx], labels[idx], shards.manifest.get("classes", [])


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def parse_layer(layer) -> str | int:
    """--layer value -> "final" | "targets" | block index (int)."""
    if isinstance(layer, int) or layer in ("final", "targets"):
        return layer
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise ProbeError(f"--layer {layer!r}: expected final, targets or a block index") from None


def check_layer(layer, config, pool: str = "mean") -> str | int:
    """Validate --layer for this encoder config; -> the parsed layer."""
    layer = parse_layer(layer)
    n = config["depth"] + config["prenet_depth"]
    if isinstance(layer, int) and not 0 <= layer < n:
        raise ProbeError(f"--layer {layer}: this encoder has blocks 0..{n - 1}")
    if layer == "targets":
        if config.get("image_block") == "beit":
            raise ProbeError("--layer targets: the probe computes data2vec 2.0 targets (FFN taps); this BEiT "
                             "encoder (data2vec 1.0) has none: probe final or a block index")
        if pool == "cls":
            raise ProbeError("--layer targets has no CLS token (the targets drop the extra tokens): "
                             "use --pool mean")
        if not 1 <= config["top_k_layers"] <= n:
            raise ProbeError(f"--layer targets: top_k_layers {config['top_k_layers']} for {n} blocks")
        # the last normalization over time zero-means every channel of every sample: a mean pool
        # of such targets is 0 (up to rounding), not a feature
        if config["instance_norm_targets"] or (config["instance_norm_target_layer"] and not (
                config["layer_norm_target_layer"] or config["layer_norm_targets"])):
            raise ProbeError("--layer targets: this model's targets end with an instance norm over time "
                             "(instance_norm_target_layer without a later layer norm, or instance_norm_targets), "
                             "so their mean over the tokens is 0 for every input; probe a block instead")
    return layer


def representation(encoder, out: dict, layer) -> torch.Tensor:
    """The [B, E+T, D] (final / block k) or [B, T, D] (targets) tensor --layer names."""
    if layer == "final":
        return out["x"]
    if layer == "targets":

        e = encoder.extra_tokens.shape[1] if encoder.extra_tokens is not None else 0
        k = encoder.c.top_k_layers
        return make_targets([f[:, e:] for f in out["ffn"][-k:]], encoder.c, out["padding"])
    return out["hidden"][layer]


@torch.no_grad()
def features(encoder, samples, pool: str = "mean", batch_size: int = 64,
             layer: str | int = "final") -> np.ndarray:
    """Pooled features float32 [N, D] of `samples` (a list from load_labelled).

    layer: which representation is pooled: "final" (the encoder output, out["x"]), an int k (the
    output of block k, 0-based, before final_norm for pre-LN models) or "targets" (the data2vec
    teacher targets: the average of the top-K instance-normed FFN outputs, model/core/targets.py; no
    CLS token).

    A batch only holds samples of one length, so no sample is ever padded: the audio encoder is
    not padding-invariant (the 2nd+ layers of its conv positional encoder see the outputs at the
    padded frames, which reach the last real frames and, through attention, every frame), and a
    probe's features must not depend on which rows share a batch.  Images all have one size
    (full batches); text documents share lengths often; audio clips mostly run one by one."""
    encoder.eval()
    _, collate = MODALITY_INPUTS[encoder.c.modality]
    e = encoder.extra_tokens.shape[1] if encoder.extra_tokens is not None else 0
    if pool == "cls" and not e:
        raise ProbeError(f"--pool cls: this {encoder.c.modality} encoder has no CLS token (use --pool mean)")
    config = vars(encoder.c)
    layer = check_layer(layer, config, pool)
    e = 0 if layer == "targets" else e  # the targets hold the T tokens only
    lengths = np.array([len(x) for x in samples])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(samples), encoder.c.embed_dim), dtype=np.float32)
    i = 0
    while i < len(order):
        j = min(i + batch_size, len(order))
        j = i + int(np.searchsorted(lengths[order[i:j]], lengths[order[i]], side="right"))  # same length only
        b = order[i:j]
        src, pad = collate([samples[k] for k in b], config)
        h = representation(encoder, encoder(src, pad), layer)
        out[b] = (h[:, 0] if pool == "cls" else h[:, e:].mean(1)).float().numpy()
        i = j
    return out


def training_init(config: dict, seed: int):
    """PlainEncoder holding the training model's initialization (d2v2 Megatron student, seed)."""

    fields = {k: v for k, v in config.items() if k != "d2v2_export"}
    cfg = RunConfig.from_dict({"model": fields, "seed": seed})
    init_distributed()
    seed_everything(seed)
    student = build_student(cfg)
    sd = mapping.megatron_to_plain(mapping.gather_tp_state_dict(student), cfg.model.num_heads)
    enc = plain_encoder(types.SimpleNamespace(**fields))
    enc.load_state_dict(sd, strict=True)
    return enc.eval()


def torch_init(config: dict, seed: int):

    torch.manual_seed(seed)
    return plain_encoder(types.SimpleNamespace(**config)).eval()


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------


def fit_probe(feats: np.ndarray, labels: np.ndarray, train_idx, test_idx, c: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(feats[train_idx], labels[train_idx])
    return float(clf.score(feats[test_idx], labels[test_idx]))


def run_probe(export_dir: str | Path, manifest: str | Path, pool: str = "mean", baseline: str = "init",
              test_fraction: float = 0.5, seed: int = 0, c: float = 1.0, max_samples: int | None = None,
              threads: int | None = None, layer: str | int = "final") -> dict:
    from sklearn.model_selection import train_test_split

    if threads:
        torch.set_num_threads(threads)
    enc, config, _ = load_export(export_dir)
    prov = config.get("d2v2_export", {})
    layer = check_layer(layer, config, pool)  # before the (slow) reading of the data
    samples, y, _ = load_labelled(manifest, config, max_samples, seed)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    res = {"export": str(export_dir), "data": str(manifest), "modality": config["modality"], "pool": pool,
           "layer": layer, "n_train": len(tr), "n_test": len(te), "classes": int(len(np.unique(y))),
           "step": prov.get("step"), "which": prov.get("which"), "seed": seed, "C": c}
    res["accuracy"] = fit_probe(features(enc, samples, pool, layer=layer), y, tr, te, c)
    if baseline != "none":
        init_seed = prov.get("seed", 1) if prov.get("seed") is not None else 1
        rnd = training_init(config, init_seed) if baseline == "init" else torch_init(config, init_seed)
        res["baseline"] = baseline
        res["baseline_accuracy"] = fit_probe(features(rnd, samples, pool, layer=layer), y, tr, te, c)
        res["margin"] = res["accuracy"] - res["baseline_accuracy"]
    res["chance"] = float(np.bincount(y[te]).max() / len(te))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2v2-probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="folder written by d2v2-export (model.safetensors + config.json)")
    p.add_argument("--data", required=True, help="labelled d2v2-prep shards of the export's modality: "
                                                  "DIR/manifest.json")
    p.add_argument("--pool", choices=["mean", "cls"], default="mean",
                   help="mean over the tokens (default) or the CLS token of the final layer (images only)")
    p.add_argument("--layer", default="final",
                   help="representation to pool: final (the encoder output, default), K (the output of block "
                        "K, 0-based) or targets (the data2vec targets: average of the top-K instance-normed "
                        "FFN outputs; mean pool only, and only for models whose targets do not end with an "
                        "instance norm over time, i.e. not the audio/text presets)")
    p.add_argument("--baseline", choices=["init", "torch", "none"], default="init",
                   help="random-init twin: the training init with the run's seed (default), PyTorch's "
                        "default init, or none")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="train/test split seed")
    p.add_argument("--C", type=float, default=1.0, dest="c", help="inverse L2 strength of the logistic regression")
    p.add_argument("--max-samples", type=int, default=None,
                   help="probe a random subset (--seed) of this many labelled rows")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    try:
        res = run_probe(args.export, args.data, args.pool, args.baseline, args.test_fraction, args.seed, args.c,
                        args.max_samples, layer=args.layer)
    except (ProbeError, ExportError, DataError, FileNotFoundError) as e:  # a missing or damaged manifest
        print(f"d2v2-probe: error: {e}", file=sys.stderr)
        return 2
    line = (f"linear probe ({res['modality']}, layer {res['layer']}, {res['pool']} pool, {res['n_train']} train / "
            f"{res['n_test']} test, {res['classes']} classes): {res['which']} step {res['step']}: "
            f"accuracy {res['accuracy']:.4f}")
    if "baseline_accuracy" in res:
        line += f"; random init ({res['baseline']}): {res['baseline_accuracy']:.4f}; margin {res['margin']:+.4f}"
    print(line + f"; chance {res['chance']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
