"""Activation checkpointing on CPU: memory kept for backward and peak RSS, none|selective|full.

    OMP_NUM_THREADS=1 python bench/bench_activation_ckpt.py [--depth 8 --dim 384 --heads 6 --batch 8]

One fresh process per mode (so peak RSS is that mode's), a single-rank Megatron group, the
student of an image model (ViT-S-like by default: 8 blocks x 384, 64x64 images in 8x8 patches,
clone batch 8 -> 64 sequences), one warm-up step then one measured forward+backward:
  * saved MiB: bytes of the tensors autograd keeps for backward (unique storages, counted with
    torch.autograd.graph.saved_tensors_hooks) -- what activation checkpointing trades away;
  * peak RSS MiB: the process's high-water mark (ru_maxrss; includes weights, grads, allocator);
  * step s: forward + backward wall time (recompute cost).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(args) -> dict:
    import torch

    from d2v2_scale.config import build_config
    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.model import build_student

    init_distributed(1, 1)
    cfg = build_config("image-tiny", overrides=[
        f"model.depth={args.depth}", f"model.embed_dim={args.dim}", f"model.num_heads={args.heads}",
        f"model.top_k_layers={args.depth}", f"model.decoder_dim={args.dim}", "model.image_size=64",
        "model.patch_size=8", f"model.clone_batch={args.clone}", f"model.activation_checkpointing={args.mode}",
        "model.dropout=0.1"])
    torch.manual_seed(0)
    model = build_student(cfg).train()
    m = cfg.model
    t = m.num_patches
    b = args.batch
    src = torch.randn(b, 3, m.image_size, m.image_size)
    n_mask = int(0.8 * t)
    mask = torch.zeros(b * m.clone_batch, t, dtype=torch.bool)
    for i in range(mask.shape[0]):
        mask[i, torch.randperm(t)[:n_mask]] = True
    batch = {"source": src, "mask": mask}

    def teacher(x, padding=None):  # a stand-in target: the student's own shape, no teacher memory
        return torch.zeros(b, t, m.embed_dim)

    loss, _ = model(batch, teacher=teacher)  # warm-up
    loss.backward()
    model.zero_grad(set_to_none=False)

    seen: dict[int, int] = {}

    def pack(x):
        try:
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001
            pass
        return x

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = model(batch, teacher=teacher)
    loss.backward()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"mode": args.mode, "saved_mib": sum(seen.values()) / 2**20, "step_s": dt,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params_m": params / 1e6,
            "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clone", type=int, default=8)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    rows = []
    for mode in ("none", "selective", "full"):
        cmd = [sys.executable, __file__, "--mode", mode, "--depth", str(args.depth), "--dim", str(args.dim),
               "--heads", str(args.heads), "--batch", str(args.batch), "--clone", str(args.clone)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
    base = rows[0]
    print(f"image student, {args.depth} blocks x {args.dim} (heads {args.heads}), 64x64 px / 8x8 patches, "
          f"batch {args.batch} x clone {args.clone}, {base['params_m']:.1f} M params, fp32, 1 process, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}\n")
    print("| activation_checkpointing | saved for backward (MiB) | vs none | peak RSS (MiB) | fwd+bwd (s) | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['saved_mib']:.1f} | {r['saved_mib'] / base['saved_mib']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} | {r['step_s']:.2f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
