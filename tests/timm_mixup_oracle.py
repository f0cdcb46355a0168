"""timm's own Mixup (timm/data/mixup.py of timm 1.0.31) as the oracle for d2v2_scale/finetune/mixup.py.

timm cannot be imported on a CPU-only torch (its __init__ imports torchvision, which has no CPU
build in the package registry), but timm/data/mixup.py itself imports only numpy and torch:
  * `ensure_timm(cache)` (runs in the test process, touches only files): `pip download` the timm
    wheel (--no-deps) from the package registry and unpack that one file, nothing installed.
  * `python tests/timm_mixup_oracle.py MIXUP_PY OUT.npz` (a SUBPROCESS, so timm's code never
    enters the test process): loads that file on its own (importlib, not timm/__init__), runs
    each case of CASES (a config, a fixed input, a numpy seed, a run of calls on that seed)
    and saves every call's mixed images, targets, lam and cutmix box.
The test (tests/test_finetune_mixup.py) caches the .npz by this script's content and replays the
cases with our Mixup: the same outputs bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "timm==1.0.31"
MEMBER = "timm/data/mixup.py"

# name -> (Mixup kwargs, input shape [B, C, H, W], num_classes, numpy seed, calls).  Odd and unequal
# H / W catch a swapped axis or a rounding of the box sides; 60 calls of the recipe's values
# (finetune/recipes.py IMAGE_REFERENCE) reach every branch: no mix (prob), mixup, cutmix, a box
# clipped by the border.
RECIPE = dict(mixup_alpha=0.7, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5, label_smoothing=0.1)
CASES = {
    "recipe": (RECIPE, (4, 3, 9, 14), 10, 0, 60),
    "recipe_uncorrected": (RECIPE | dict(correct_lam=False), (4, 3, 11, 7), 10, 1, 30),
    "cutmix_only": (dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0), (6, 1, 8, 8), 5, 2, 20),
    "mixup_only": (dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.5, label_smoothing=0.2), (2, 3, 5, 6), 3, 3, 20),
    "minmax": (RECIPE | dict(cutmix_minmax=(0.2, 0.8)), (4, 2, 10, 12), 7, 4, 30),
}


def inputs(shape, n_classes: int, seed: int):
    """The fixed input of a case: images [B, C, H, W] float32, targets [B] int64."""
    import numpy as np

    rs = np.random.RandomState(1000 + seed)
    return rs.standard_normal(shape).astype(np.float32), rs.randint(0, n_classes, size=shape[0]).astype(np.int64)


def ensure_timm(cache: Path) -> Path:
    """-> timm's mixup.py, unpacked once from the registry's wheel into `cache`."""
    cache = Path(cache)
    dest = cache / "mixup.py"
    if not dest.is_file():
        (cache / "dl").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "download", WHEEL,
                        "--no-deps", "-d", str(cache / "dl")], check=True, timeout=600)
        (whl,) = (cache / "dl").glob("timm-*.whl")
        with zipfile.ZipFile(whl) as z:
            data = z.read(MEMBER)
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return dest


def key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def run_oracle(cache: Path, out: Path, timeout: int = 300) -> None:
    """Write out (.npz) with timm's results on CASES, via a subprocess."""
    src = ensure_timm(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, str(src), str(tmp)], check=True, timeout=timeout, env=env)
    os.replace(tmp, out)


def _main(src: str, out: str) -> None:
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("timm_mixup_standalone", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    boxes = []
    real_box = mod.cutmix_bbox_and_lam

    def spy_box(*a, **k):  # record the box and the corrected lam of each cutmix call
        (yl, yh, xl, xh), lam = real_box(*a, **k)
        boxes.append((int(yl), int(yh), int(xl), int(xh)))
        return (yl, yh, xl, xh), lam

    mod.cutmix_bbox_and_lam = spy_box
    res = {}
    for name, (kw, shape, n_cls, seed, calls) in CASES.items():
        x0, y0 = inputs(shape, n_cls, seed)
        m = mod.Mixup(num_classes=n_cls, **kw)
        np.random.seed(seed)
        xs, ys, box = [], [], []
        for _ in range(calls):
            boxes.clear()
            x, y = m(torch.from_numpy(x0.copy()), torch.from_numpy(y0))
            xs.append(x.numpy())
            ys.append(y.numpy())
            box.append(boxes[0] if boxes else (-1, -1, -1, -1))
        res[f"{name}/x"] = np.stack(xs)
        res[f"{name}/y"] = np.stack(ys)
        res[f"{name}/box"] = np.array(box, dtype=np.int64)
        res[f"{name}/rng_after"] = np.random.rand(4)  # the same numpy RNG consumption
    np.savez(out, **res)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
