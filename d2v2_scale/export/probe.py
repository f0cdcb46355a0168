"""`d2v2-probe`: linear-probe evaluation of an exported encoder (frozen features).

    d2v2-probe EXPORT_DIR --data SHARDS/manifest.json [--pool mean|cls] [--baseline init|torch|none]

1. features: every labelled row of the d2v2-prep shards goes through the exported plain twin
   (images: the whole image resized to model.image_size, bilinear, ImageNet mean/std as in
   training, no crop or flip); the final encoder output is pooled: `mean` over the patch
   tokens (default) or the `cls` token;
2. a stratified train/test split (`--test-fraction`, `--seed`);
3. standardize + multinomial logistic regression (scikit-learn) on the train split; accuracy on
   the held-out split;
4. the same for the same architecture randomly initialized (`--baseline init`: the training
   model's own initialization with the run's seed, i.e. the weights pretraining started from;
   `torch`: PlainEncoder's PyTorch-default init).

Labels: d2v2-prep stores labels for images only (ImageFolder class folders / file-list labels);
its audio and text shards carry none, so the probe supports images only.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ProbeError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load_images(manifest: str | Path, image_size: int, in_chans: int, max_samples: int | None = None):
    """-> (x float32 [N, C, S, S] normalized like training, labels int64 [N]) of the labelled rows."""
    from PIL import Image

    from ..data.augment import decode_image
    from ..data.shards import ShardSet

    shards = ShardSet(manifest)
    if shards.modality != "image":
        raise ProbeError(f"{manifest}: modality {shards.modality!r}: the probe needs labels, and d2v2-prep stores "
                         f"labels for images only (audio/text shards have none)")
    if "label" not in shards.manifest["schema"]:
        raise ProbeError(f"{manifest}: the shards have no label column")
    labels = shards.column("label").astype(np.int64)
    idx = np.flatnonzero(labels >= 0)
    if max_samples:
        idx = idx[:max_samples]
    if len(np.unique(labels[idx])) < 2:
        raise ProbeError(f"{manifest}: fewer than 2 labelled classes (loose files get label -1)")
    cols = ["image", "label"] + (["pixels", "pix_height", "pix_width", "pix_channels"]
                                 if "pixels" in shards.manifest["schema"] else [])
    out = np.empty((len(idx), image_size, image_size, in_chans), dtype=np.uint8)
    for j, i in enumerate(idx):
        im = decode_image(shards.get(int(i), cols), in_chans).resize((image_size, image_size),
                                                                     Image.Resampling.BILINEAR)
        a = np.asarray(im)
        out[j] = a[..., None] if a.ndim == 2 else a
    # as training (data/augment.py): 1-channel models use the mean of the RGB statistics
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (IMAGENET_MEAN.mean(), IMAGENET_STD.mean())
    x = (out.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), labels[idx]


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def features(encoder, x: torch.Tensor, pool: str = "mean", batch_size: int = 128) -> np.ndarray:
    encoder.eval()
    e = encoder.extra_tokens.shape[1] if encoder.extra_tokens is not None else 0
    if pool == "cls" and not e:
        raise ProbeError("--pool cls: this encoder has no CLS token")
    outs = []
    for i in range(0, len(x), batch_size):
        h = encoder(x[i:i + batch_size])["x"]
        outs.append(h[:, 0] if pool == "cls" else h[:, e:].mean(1))
    return torch.cat(outs).float().numpy()


def training_init(config: dict, seed: int):
    """PlainEncoder holding the training model's initialization (d2v2 Megatron student, seed)."""
    from ..config import RunConfig
    from ..distributed import init_distributed
    from ..model import build_student, mapping
    from ..model.plain import PlainEncoder
    from ..train.trainer import seed_everything

    fields = {k: v for k, v in config.items() if k != "d2v2_export"}
    cfg = RunConfig.from_dict({"model": fields, "seed": seed})
    init_distributed()
    seed_everything(seed)
    student = build_student(cfg)
    sd = mapping.megatron_to_plain(mapping.gather_tp_state_dict(student), cfg.model.num_heads)
    enc = PlainEncoder(types.SimpleNamespace(**fields))
    enc.load_state_dict(sd, strict=True)
    return enc.eval()


def torch_init(config: dict, seed: int):
    from ..model.plain import PlainEncoder

    torch.manual_seed(seed)
    return PlainEncoder(types.SimpleNamespace(**config)).eval()


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
              threads: int | None = None) -> dict:
    from sklearn.model_selection import train_test_split

    from .consolidate import load_export

    if threads:
        torch.set_num_threads(threads)
    enc, config, _ = load_export(export_dir)
    prov = config.get("d2v2_export", {})
    if config["modality"] != "image":
        raise ProbeError(f"{export_dir} is a {config['modality']} encoder: the probe supports images only "
                         f"(d2v2-prep stores no labels for audio/text)")
    x, y = load_images(manifest, config["image_size"], config["in_chans"], max_samples)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    res = {"export": str(export_dir), "data": str(manifest), "pool": pool, "n_train": len(tr), "n_test": len(te),
           "classes": int(len(np.unique(y))), "step": prov.get("step"), "which": prov.get("which"),
           "seed": seed, "C": c}
    res["accuracy"] = fit_probe(features(enc, x, pool), y, tr, te, c)
    if baseline != "none":
        init_seed = prov.get("seed", 1) if prov.get("seed") is not None else 1
        rnd = training_init(config, init_seed) if baseline == "init" else torch_init(config, init_seed)
        res["baseline"] = baseline
        res["baseline_accuracy"] = fit_probe(features(rnd, x, pool), y, tr, te, c)
        res["margin"] = res["accuracy"] - res["baseline_accuracy"]
    res["chance"] = float(np.bincount(y[te]).max() / len(te))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2v2-probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="folder written by d2v2-export (model.safetensors + config.json)")
    p.add_argument("--data", required=True, help="labelled d2v2-prep image shards: DIR/manifest.json")
    p.add_argument("--pool", choices=["mean", "cls"], default="mean",
                   help="mean over patch tokens (default) or the CLS token of the final layer")
    p.add_argument("--baseline", choices=["init", "torch", "none"], default="init",
                   help="random-init twin: the training init with the run's seed (default), PyTorch's "
                        "default init, or none")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="train/test split seed")
    p.add_argument("--C", type=float, default=1.0, dest="c", help="inverse L2 strength of the logistic regression")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .consolidate import ExportError

    try:
        res = run_probe(args.export, args.data, args.pool, args.baseline, args.test_fraction, args.seed, args.c,
                        args.max_samples)
    except (ProbeError, ExportError, FileNotFoundError) as e:
        print(f"d2v2-probe: error: {e}", file=sys.stderr)
        return 2
    line = (f"linear probe ({res['pool']} pool, {res['n_train']} train / {res['n_test']} test, "
            f"{res['classes']} classes): {res['which']} step {res['step']}: accuracy {res['accuracy']:.4f}")
    if "baseline_accuracy" in res:
        line += f"; random init ({res['baseline']}): {res['baseline_accuracy']:.4f}; margin {res['margin']:+.4f}"
    print(line + f"; chance {res['chance']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
