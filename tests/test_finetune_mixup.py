"""finetune/mixup.py against timm's own Mixup (tests/timm_mixup_oracle.py runs timm 1.0.31's
mixup.py, standalone, in a subprocess; its results are cached by the oracle script's content):
the same mixed images and targets bit for bit, call after call from the same numpy seed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v2_scale.finetune import mixup
from tests import timm_mixup_oracle as oracle

CACHE = Path(os.environ.get("D2V2_TIMM_CACHE", Path.home() / ".cache" / "d2v2-scale" / "timm-mixup"))


@pytest.fixture(scope="module")
def timm_results():
    out = CACHE / f"results-{oracle.key()}.npz"
    if not out.is_file():
        oracle.run_oracle(CACHE, out)
    with np.load(out) as z:
        return dict(z)


def _replay(name):
    kw, shape, n_cls, seed, calls = oracle.CASES[name]
    x0, y0 = oracle.inputs(shape, n_cls, seed)
    m = mixup.Mixup(num_classes=n_cls, **kw)
    np.random.seed(seed)
    xs, ys = [], []
    for _ in range(calls):
        x, y = m(torch.from_numpy(x0.copy()), torch.from_numpy(y0))
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.stack(xs), np.stack(ys), np.random.rand(4), x0


@pytest.mark.parametrize("name", list(oracle.CASES))
def test_mixup_equals_timm(timm_results, name):
    xs, ys, rng_after, x0 = _replay(name)
    t = {k.split("/")[1]: v for k, v in timm_results.items() if k.startswith(name + "/")}
    assert xs.dtype == t["x"].dtype == np.float32 and ys.dtype == t["y"].dtype == np.float32
    for i in range(len(xs)):  # the first call that differs, by name
        assert np.array_equal(xs[i], t["x"][i]), f"{name}: images differ at call {i} (box {t['box'][i]})"
        assert np.array_equal(ys[i], t["y"][i]), f"{name}: targets differ at call {i}"
    assert np.array_equal(rng_after, t["rng_after"])  # the same numpy draws consumed
    np.testing.assert_allclose(ys.sum(-1), 1.0, rtol=1e-6)
    if name == "recipe":
        # the recipe's 60 calls reach every branch: unmixed (prob 0.9), mixup, cutmix, a clipped box
        h, w = x0.shape[-2:]
        box = t["box"]
        cut = box[:, 0] >= 0
        same = np.array([np.array_equal(x, x0) for x in xs])
        assert same.sum() >= 2 and cut.sum() >= 10 and (~same & ~cut).sum() >= 10
        clipped = cut & ((box[:, 0] == 0) | (box[:, 1] == h) | (box[:, 2] == 0) | (box[:, 3] == w))
        assert clipped.sum() >= 2


def test_mixup_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="only 'batch'"):
        mixup.Mixup(mode="elem")
    with pytest.raises(ValueError, match="one of mixup_alpha"):
        mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="even batch"):
        mixup.Mixup(num_classes=3)(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
