"""data2vec-aqc's per-step extras on CPU: quantizer, k-means, cross-contrastive loss (B.4-B.7).

    OMP_NUM_THREADS=1 python bench/bench_aqc_parts.py [--batch 4 --frames 780 --masked 380 --repeat 5]

Base sizes (C = 512 CNN features, 256-d codes, 2 x 320 entries, 100 negatives, T // 16 clusters)
on a local batch of B utterances of T frames with M masked each; both views, as the objective
runs them: the quantizer forward+backward on 2*B*M frames, k-means on the 2*B*M quantized vectors,
one cross-contrastive loss forward+backward (the objective runs two).  Best of --repeat runs,
after one warm-up.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from d2v2_scale.model.objectives.aqc.contrastive import cross_contrastive_loss, sample_negatives
from d2v2_scale.model.objectives.aqc.kmeans import cosine_kmeans, num_clusters
from d2v2_scale.model.objectives.aqc.quantizer import GumbelVectorQuantizer


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=780)  # 15.6 s of 16 kHz audio
    ap.add_argument("--masked", type=int, default=380)  # ~49 % masked (mask 0.65 x span 10)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    b, t, m = a.batch, a.frames, a.masked
    g = torch.Generator().manual_seed(0)
    q = GumbelVectorQuantizer().train()
    feats = torch.randn(2 * b * m, 512, generator=g)

    def quantize():
        out = q(feats, generator=torch.Generator().manual_seed(1))
        (out["x"].sum() + out["prob_perplexity"]).backward()
        return out

    out = quantize()
    points = F.normalize(out["x"].detach(), dim=-1)
    k = num_clusters(t)
    labels = cosine_kmeans(points, k, generator=torch.Generator().manual_seed(2))
    idx = sample_negatives(b, m, 100, generator=g)
    query = torch.randn(b, m, 256, generator=g, requires_grad=True)
    pos = out["x"][: b * m].detach().view(b, m, 256).requires_grad_(True)
    codes, lab = out["codes"][: b * m].view(b, m, 2), labels[: b * m].view(b, m)

    def contrast():
        loss, _ = cross_contrastive_loss(query, pos, codes, idx, lab)
        loss.backward()

    rows = [
        (f"quantizer fwd+bwd, {2 * b * m} frames x 512", best_ms(quantize, a.repeat)),
        (f"k-means, {2 * b * m} points x 256, {k} clusters", best_ms(
            lambda: cosine_kmeans(points, k, generator=torch.Generator().manual_seed(2)), a.repeat)),
        (f"negatives, {b} x {m} x 100", best_ms(lambda: sample_negatives(b, m, 100, generator=g), a.repeat)),
        (f"one cross-contrastive loss fwd+bwd, {b * m} rows x 101", best_ms(contrast, a.repeat)),
    ]
    print(f"B={b} T={t} M={m}, {torch.get_num_threads()} thread(s)\n\n| step | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} |")


if __name__ == "__main__":
    main()
