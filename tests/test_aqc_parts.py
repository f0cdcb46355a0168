"""data2vec-aqc's building blocks (docs/REFERENCE.md §3.4-§3.8):
the Gumbel quantizer, same-utterance negatives, cosine k-means, the cross-contrastive loss and
the §3.8 total.  Plain PyTorch on one process: these modules run replicated on every rank."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2v2_scale.model.objectives.aqc.contrastive import aqc_total_loss, cross_contrastive_loss, sample_negatives
from d2v2_scale.model.objectives.aqc.kmeans import cosine_kmeans, num_clusters
from d2v2_scale.model.objectives.aqc.quantizer import GumbelVectorQuantizer, diversity_loss, gumbel_temperature

from tests import fairseq_oracle

# test_import's cache: its oracle leaves the fairseq sdist in fairseq/dl, reused here when present
CACHE = Path(os.environ.get("D2V2_FAIRSEQ_CACHE", Path.home() / ".cache" / "d2v2-scale" / "fairseq-oracle"))
KMEANS_WHEEL = "fast-pytorch-kmeans==0.2.2"
FAIRSEQ_FILES = {"quantizer": "fairseq/modules/gumbel_vector_quantizer.py",
                 "wav2vec2": "fairseq/models/wav2vec/wav2vec2.py", "utils": "fairseq/utils.py"}


# ---- the references: fairseq's own source files, fast-pytorch-kmeans' own wheel ----------------
def _pip_download(spec: str, pattern: str, dest: Path) -> Path:
    """The registry's file for `spec` in `dest` (downloaded once, via a temp folder + rename)."""
    found = sorted(dest.glob(pattern))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "download", spec,
                            "--no-deps", "--no-build-isolation", "-d", tmp], check=True, timeout=600)
            (got,) = Path(tmp).glob(pattern)
            got.rename(dest / got.name)
        found = sorted(dest.glob(pattern))
    return found[0]


@pytest.fixture(scope="module")
def fairseq_src() -> dict:
    """{key: source text} of fairseq's quantizer, wav2vec 2.0 model and utils, read from the sdist."""
    pattern = "fairseq_fixed-*.tar.gz"
    have = sorted((CACHE / "fairseq" / "dl").glob(pattern))
    sdist = have[0] if have else _pip_download(fairseq_oracle.SDIST, pattern, CACHE / "aqc-refs")
    want = {f"{sdist.name[:-len('.tar.gz')]}/{rel}": key for key, rel in FAIRSEQ_FILES.items()}
    out = {}
    with tarfile.open(sdist) as t:
        for member in t:
            if member.name in want:
                out[want[member.name]] = t.extractfile(member).read().decode()
    assert set(out) == set(FAIRSEQ_FILES), f"{sdist} lacks {set(FAIRSEQ_FILES) - set(out)}"
    return out


def _functions(source: str, names: set[str], namespace: dict) -> dict:
    """Compile the named top-level functions / class methods of `source` into `namespace`."""
    tree = ast.parse(source)
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {d.name for d in defs} >= names, names - {d.name for d in defs}
    for d in defs:
        exec(compile(ast.Module(body=[d], type_ignores=[]), "<fairseq>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def fairseq_ref(fairseq_src) -> types.SimpleNamespace:
    """fairseq's GumbelVectorQuantizer class (its module imports only torch) and wav2vec 2.0's
    sample_negatives / compute_preds methods with the fairseq.utils helpers they call."""
    mod = types.ModuleType("fairseq_gumbel_vector_quantizer")
    exec(compile(fairseq_src["quantizer"], "gumbel_vector_quantizer.py", "exec"), mod.__dict__)
    ns = _functions(fairseq_src["utils"], {"buffered_arange", "index_put", "is_xla_tensor"}, {"torch": torch})
    ns = _functions(fairseq_src["wav2vec2"], {"sample_negatives", "compute_preds"}, ns)
    return types.SimpleNamespace(GumbelVectorQuantizer=mod.GumbelVectorQuantizer,
                                 sample_negatives=ns["sample_negatives"], compute_preds=ns["compute_preds"])


@pytest.fixture(scope="module")
def fpk_kmeans():
    """fast_pytorch_kmeans.KMeans (0.2.2, the registry's version; pure Python) imported from its wheel."""
    wheel = _pip_download(KMEANS_WHEEL, "fast_pytorch_kmeans-*.whl", CACHE / "aqc-refs")
    with zipfile.ZipFile(wheel) as z:
        assert "fast_pytorch_kmeans/kmeans.py" in z.namelist()
    sys.path.insert(0, str(wheel))
    try:
        from fast_pytorch_kmeans import KMeans
    finally:
        sys.path.remove(str(wheel))
    return KMeans


# ---- quantizer (test list 4) -------------------------------------------------------------------
def test_gumbel_temperature():
    """tau(u) = max(2 * 0.999995^u, 0.5): 2.0 at 0, 1.21306 at 100k, 0.5 at 300k; set_num_updates."""
    assert gumbel_temperature(0) == 2.0
    assert gumbel_temperature(100_000) == pytest.approx(1.21306, abs=5e-6)
    assert gumbel_temperature(300_000) == 0.5
    assert gumbel_temperature(277_000) > 0.5 and gumbel_temperature(277_300) == 0.5  # crosses at ~277,258
    q = GumbelVectorQuantizer(dim=8, num_vars=4, groups=2, vq_dim=6)
    assert q.curr_temp == 2.0
    q.set_num_updates(100_000)
    assert q.curr_temp == gumbel_temperature(100_000)


def test_quantizer_shapes_names_and_init():
    """fairseq's parameter names and shapes (B.4: weight_proj 512 -> 640, vars [1, 640, 128],
    410,240 parameters at base), N(0, 1) projection with zero bias, U[0, 1) codebook."""
    torch.manual_seed(0)
    q = GumbelVectorQuantizer()
    shapes = {n: tuple(p.shape) for n, p in q.named_parameters()}
    assert shapes == {"vars": (1, 640, 128), "weight_proj.weight": (640, 512), "weight_proj.bias": (640,)}
    assert sum(p.numel() for p in q.parameters()) == 410_240
    assert q.vars.min() >= 0 and q.vars.max() < 1 and abs(q.vars.mean().item() - 0.5) < 0.01
    assert abs(q.weight_proj.weight.std().item() - 1.0) < 0.01 and not q.weight_proj.bias.any()


def _peaked_or_uniform(q: GumbelVectorQuantizer, x: torch.Tensor, logits: torch.Tensor) -> dict:
    """Forward with weight_proj made to output `logits` exactly for inputs x (identity weight, logits as bias)."""
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.copy_(logits)
    return q(x)


def test_perplexities_and_diversity():
    """Uniform softmax -> prob_ppl = G*V = 640 and diversity 0; logits sharply peaked on one code per
    group -> prob_ppl -> 2 (= G) and diversity -> 638/640."""
    q = GumbelVectorQuantizer().eval()
    x = torch.randn(10, 512)
    out = _peaked_or_uniform(q, x, torch.zeros(640))
    assert out["prob_perplexity"].item() == pytest.approx(640, rel=1e-4)
    assert diversity_loss(out["prob_perplexity"]).item() == pytest.approx(0, abs=1e-4)
    peak = torch.zeros(640)
    peak[[5, 320 + 17]] = 100.0
    out = _peaked_or_uniform(q, x, peak)
    assert out["prob_perplexity"].item() == pytest.approx(2, rel=1e-4)
    assert diversity_loss(out["prob_perplexity"]).item() == pytest.approx(638 / 640, rel=1e-6)
    assert out["code_perplexity"].item() == pytest.approx(2, rel=1e-4)
    assert (out["codes"] == torch.tensor([5, 17])).all()
    assert out["prob_perplexity"].requires_grad and not out["code_perplexity"].requires_grad


def test_code_perplexity_hand_built():
    """Group 0 uses codes {0, 0, 1, 2} (hbar = 1/2, 1/4, 1/4), group 1 always code 3 (hbar = 1):
    code_ppl = exp(H(1/2, 1/4, 1/4)) + exp(0) = 2^1.5 + 1."""
    q = GumbelVectorQuantizer(dim=2 * 4, num_vars=4, groups=2, vq_dim=4).eval()
    with torch.no_grad():
        q.weight_proj.weight.copy_(torch.eye(8))
        q.weight_proj.bias.zero_()
    x = torch.zeros(4, 8)
    for n, c in enumerate([0, 0, 1, 2]):
        x[n, c] = 1.0
    x[:, 4 + 3] = 1.0
    out = q(x)
    hbar = torch.tensor([0.5, 0.25, 0.25])
    want = math.exp(-(hbar * torch.log(hbar + 1e-7)).sum().item()) + math.exp(-math.log(1 + 1e-7))
    assert out["code_perplexity"].item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(2 ** 1.5 + 1, rel=1e-5)


def test_eval_output_is_codebook_concatenation():
    """Eval: output [N, 256] = concat over groups of vars[g*V + argmax_g]; codes [N, G] those argmaxes."""
    torch.manual_seed(1)
    q = GumbelVectorQuantizer().eval()
    x = torch.randn(12, 512)
    out = q(x)
    assert out["x"].shape == (12, 256) and out["codes"].shape == (12, 2) and out["codes"].dtype == torch.long
    logits = q.weight_proj(x).view(12, 2, 320)
    codes = logits.argmax(-1)
    assert torch.equal(out["codes"], codes)
    cb = q.vars[0]
    want = torch.cat([cb[codes[:, 0]], cb[320 + codes[:, 1]]], dim=-1)
    assert torch.equal(out["x"], want)
    assert out["temp"] == 2.0


def test_train_mode_gumbel_from_generator():
    """Train: straight-through hard Gumbel whose noise comes from the passed generator (same seed ->
    same output; the chosen codes index the output vectors; gradient reaches weight_proj and vars)."""
    torch.manual_seed(2)
    q = GumbelVectorQuantizer(dim=16, num_vars=8, groups=2, vq_dim=8).train()
    x = torch.randn(30, 16)
    a = q(x, generator=torch.Generator().manual_seed(5))
    b = q(x, generator=torch.Generator().manual_seed(5))
    c = q(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["codes"], b["codes"])
    assert not torch.equal(a["codes"], c["codes"])
    cb = q.vars[0].detach()
    want = torch.cat([cb[a["codes"][:, 0]], cb[8 + a["codes"][:, 1]]], dim=-1)
    torch.testing.assert_close(a["x"].detach(), want, rtol=1e-6, atol=1e-6)
    (a["x"].sum() + a["prob_perplexity"]).backward()
    assert q.weight_proj.weight.grad.abs().sum() > 0 and q.vars.grad.abs().sum() > 0


def test_bf16_training_outputs_exact_codebook_vectors():
    """B.4: in half precision the straight-through one-hot is exactly {0, 1} ((1 - p) + p rounds to
    1), so a bf16 quantizer in training outputs exact codebook vectors; logits/perplexities in fp32."""
    torch.manual_seed(3)
    q = GumbelVectorQuantizer(dim=16, num_vars=8, groups=2, vq_dim=8).to(torch.bfloat16).train()
    out = q(torch.randn(40, 16, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(1))
    assert out["x"].dtype == torch.bfloat16 and out["prob_perplexity"].dtype == torch.float32
    cb = q.vars[0].detach()
    assert torch.equal(out["x"].detach(), torch.cat([cb[out["codes"][:, 0]], cb[8 + out["codes"][:, 1]]], dim=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_parts_on_cuda():
    """The parts run on CUDA tensors with CUDA generators (no numpy, no host-side data): k-means
    labels equal the CPU ones on separable data, negatives stay in range, the loss matches the CPU's."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(8)
    truth = torch.arange(3).repeat_interleave(40)
    x = torch.eye(8)[truth] + 0.05 * torch.randn(120, 8, generator=g)
    from sklearn.metrics import adjusted_rand_score

    lab = cosine_kmeans(x.to(dev), 3, generator=torch.Generator(dev).manual_seed(0))
    assert lab.device.type == "cuda" and adjusted_rand_score(truth.numpy(), lab.cpu().numpy()) == 1.0
    idx = sample_negatives(4, 10, 100, generator=torch.Generator(dev).manual_seed(0), device=dev)
    assert idx.device.type == "cuda" and not (idx == torch.arange(40, device=dev).view(4, 10, 1)).any()
    q = GumbelVectorQuantizer(dim=8, num_vars=5, groups=2, vq_dim=4).to(dev).train()
    out = q(x[:40].to(dev), generator=torch.Generator(dev).manual_seed(0))
    assert out["x"].shape == (40, 4) and out["codes"].device.type == "cuda"
    query, pos = torch.randn(2, 2, 10, 4, generator=g)
    codes, labels = torch.randint(0, 3, (2, 10, 2), generator=g), torch.randint(0, 3, (2, 10), generator=g)
    neg = idx[:2].cpu()  # rows 0-1 of B = 4: their indices already lie in [0, 20)
    cpu, _ = cross_contrastive_loss(query, pos, codes, neg, labels)
    gpu, _ = cross_contrastive_loss(query.to(dev), pos.to(dev), codes.to(dev), neg.to(dev), labels.to(dev))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)


# ---- negatives (test list 5) -------------------------------------------------------------------
def test_negatives_shape_range_and_never_self():
    """idx [B, M, 100]; never the position's own flat index; always in [b*M, (b+1)*M)."""
    b, m = 3, 7
    idx = sample_negatives(b, m, 100, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (b, m, 100) and idx.dtype == torch.long
    own = torch.arange(b * m).view(b, m, 1)
    assert not (idx == own).any()
    row = torch.arange(b).view(b, 1, 1)
    assert ((idx >= row * m) & (idx < (row + 1) * m)).all()
    pos = torch.randn(b, m, 4)
    negs = pos.flatten(0, 1)[idx]  # the (100, B, M, C) negatives of B.5, as [B, M, 100, C]
    assert negs.shape == (b, m, 100, 4)
    with pytest.raises(ValueError, match="at least 2 masked"):
        sample_negatives(2, 1)


def test_negatives_uniform_chi_square():
    """For each position, the other M - 1 positions are equally likely (chi-square, p > 0.001)."""
    from scipy.stats import chisquare

    b, m = 2, 6
    idx = sample_negatives(b, m, 5_000, generator=torch.Generator().manual_seed(1))
    for bi in range(b):
        for i in range(m):
            counts = torch.bincount(idx[bi, i] - bi * m, minlength=m)
            assert counts[i] == 0
            others = torch.cat([counts[:i], counts[i + 1:]]).numpy()
            assert chisquare(others).pvalue > 1e-3


# ---- clustering (test list 6) ------------------------------------------------------------------
def test_num_clusters():
    assert num_clusters(780) == 48 and num_clusters(20) == 2 and num_clusters(16) == 2 and num_clusters(64) == 4


def test_cosine_kmeans_recovers_separated_clusters():
    """Well-separated directions (plus small noise, arbitrary norms: cosine ignores them) are
    recovered exactly up to a permutation of the labels; no gradient; deterministic per generator."""
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(3)
    k, c, per = 4, 16, 50
    dirs = torch.linalg.qr(torch.randn(c, c, generator=g))[0][:k]  # orthonormal centres
    truth = torch.arange(k).repeat_interleave(per)
    x = dirs[truth] + 0.05 * torch.randn(k * per, c, generator=g)
    x = x * torch.rand(k * per, 1, generator=g).add(0.5)
    x.requires_grad_(True)
    labels = cosine_kmeans(x, k, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (k * per,) and labels.dtype == torch.long and not labels.requires_grad
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    again = cosine_kmeans(x, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)
    with pytest.raises(ValueError, match="clusters need at least"):
        cosine_kmeans(x[:3], 4)


# ---- cross-contrastive logits by hand (test list 7) --------------------------------------------
def _tiny_case():
    """B = 1, M = 3, 2 negatives each, dim 2.  Row 0's negatives: row 1 (same cluster as row 0) and
    row 2 (identical codes to row 0 -> -inf).  Row 1's: rows 0, 2 (neither).  Row 2's: rows 0
    (identical codes), 1."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    pos = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.6, 0.8]]])
    codes = torch.tensor([[[1, 2], [3, 4], [1, 2]]])
    labels = torch.tensor([[0, 0, 1]])
    neg_idx = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    return q, pos, codes, neg_idx, labels


def _hand_loss(rows):
    return sum(-r[0] + math.log(sum(math.exp(v) for v in r if v != -math.inf)) for r in rows)


def test_cross_contrastive_logits_by_hand():
    """logits = cos/0.1; a same-cluster negative's logit x0.3; a negative identical to the positive
    (all codes equal) -> -inf; CE with target 0 summed over the 3 rows."""
    q, pos, codes, neg_idx, labels = _tiny_case()
    r2 = 1 / math.sqrt(2)
    # cos(q0, .) = 0.6, 1.0, 0.6; cos(q1, .) = 0.8, 0.0, 0.8; cos(q2, .) = 1.4 r2, r2, 1.4 r2
    rows = [
        [6.0, 0.3 * 10.0, -math.inf],  # neg row 1: same cluster (labels 0, 0); neg row 2: identical codes
        [0.0, 0.3 * 8.0, 8.0],  # neg row 0: same cluster; neg row 2: other cluster
        [14 * r2, -math.inf, 10 * r2],  # neg row 0: identical codes; neg row 1: other cluster
    ]
    loss, stats = cross_contrastive_loss(q, pos, codes, neg_idx, labels)
    assert loss.item() == pytest.approx(_hand_loss(rows), rel=1e-5)
    assert stats["identical"].item() == 2 and stats["same_cluster"].item() == 2
    # without clusters (every label distinct) the 0.3 disappears
    loss_nc, _ = cross_contrastive_loss(q, pos, codes, neg_idx, torch.tensor([[0, 1, 2]]))
    rows_nc = [[6.0, 10.0, -math.inf], [0.0, 8.0, 8.0], [14 * r2, -math.inf, 10 * r2]]
    assert loss_nc.item() == pytest.approx(_hand_loss(rows_nc), rel=1e-5)
    two = torch.cat([pos, pos]), torch.cat([codes, codes]), torch.cat([labels, labels])
    with pytest.raises(ValueError, match="same utterance"):  # row 1 pointing into row 0
        cross_contrastive_loss(torch.cat([q, q]), two[0], two[1], torch.cat([neg_idx, neg_idx]), two[2])


def test_same_cluster_gating_flag():
    """gate_on_identical=True (the reference's literal code) scales only when some negative in the
    batch is identical; the default always scales."""
    q, pos, _, neg_idx, labels = _tiny_case()
    distinct = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # no identical negatives anywhere
    always, _ = cross_contrastive_loss(q, pos, distinct, neg_idx, labels)
    gated, _ = cross_contrastive_loss(q, pos, distinct, neg_idx, labels, gate_on_identical=True)
    unscaled, _ = cross_contrastive_loss(q, pos, distinct, neg_idx, labels, same_cluster_scale=1.0)
    assert gated.item() == pytest.approx(unscaled.item(), rel=1e-6)
    assert always.item() != pytest.approx(unscaled.item(), rel=1e-3)
    _, _, codes, _, _ = _tiny_case()  # with an identical negative the gate opens
    a, _ = cross_contrastive_loss(q, pos, codes, neg_idx, labels)
    g, _ = cross_contrastive_loss(q, pos, codes, neg_idx, labels, gate_on_identical=True)
    assert a.item() == g.item()


# ---- total loss (test list 8) ------------------------------------------------------------------
def test_total_loss_composition():
    """total = mse_sum/sqrt(768) + 0.5 L_s + 0.5 L_t + 0.1 N_m (640 - ppl)/640 + 10 N_m pen."""
    mse, ls, lt, ppl, pen, nm = (torch.tensor(v) for v in (50.0, 30.0, 20.0, 400.0, 0.02, 40))
    total, parts = aqc_total_loss(mse, ls, lt, ppl, pen, int(nm))
    want = 50 / math.sqrt(768) + 0.5 * 30 + 0.5 * 20 + 0.1 * 40 * (640 - 400) / 640 + 10 * 40 * 0.02
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert sum(parts.values()).item() == pytest.approx(want, rel=1e-6)
    assert parts["diversity"].item() == pytest.approx(0.1 * 40 * 240 / 640, rel=1e-6)


# ---- cross-checks against the references -------------------------------------------------------
def test_quantizer_matches_fairseq(fairseq_ref):
    """Same weights (fairseq's parameter names load strictly) + same Gumbel noise (fairseq draws it
    from the global generator, ours from a generator with the same seed) -> same outputs, codes
    (fairseq's produce_targets), perplexities, temperature and gradients; eval mode too."""
    kw = dict(dim=24, num_vars=10, groups=2, vq_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = fairseq_ref.GumbelVectorQuantizer(temp=(2.0, 0.5, 0.999995), combine_groups=False,
                                                time_first=True, **kw)
        ours = GumbelVectorQuantizer(temp=(2.0, 0.5, 0.999995), **kw)
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(3, 7, 24)
        for u in (0, 150_000):
            ref.set_num_updates(u)
            ours.set_num_updates(u)
            for train in (True, False):
                ref.train(train)
                ours.train(train)
                torch.manual_seed(11 + u)
                r = ref(x, produce_targets=True)
                o = ours(x.view(21, 24), generator=torch.Generator().manual_seed(11 + u))
                assert torch.equal(o["codes"], r["targets"].view(21, 2))
                torch.testing.assert_close(o["x"], r["x"].view(21, 16), rtol=1e-6, atol=1e-6)
                for k in ("code_perplexity", "prob_perplexity"):
                    torch.testing.assert_close(o[k], r[k], rtol=1e-6, atol=1e-6)
                assert o["temp"] == r["temp"]
                w = torch.randn(21, 16)
                gr = torch.autograd.grad((r["x"].view(21, 16) * w).sum() + r["prob_perplexity"], list(ref.parameters()))
                go = torch.autograd.grad((o["x"] * w).sum() + o["prob_perplexity"], list(ours.parameters()))
                for a, b in zip(go, gr):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_negatives_match_fairseq(fairseq_ref):
    """wav2vec 2.0's sample_negatives (n_negatives 100, no cross-sample, no padding) with the global
    generator seeded s draws exactly our indices with a generator seeded s; its negatives tensor
    (100, B, M, C) is positive.flatten(0, 1)[idx] permuted."""
    me = types.SimpleNamespace(n_negatives=100, cross_sample_negatives=0)
    y = torch.randn(3, 9, 5)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        negs, neg_idxs = fairseq_ref.sample_negatives(me, y, 9)
    idx = sample_negatives(3, 9, 100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(neg_idxs.view(3, 9, 100), idx)
    assert torch.equal(negs, y.flatten(0, 1)[idx].permute(2, 0, 1, 3))


def test_contrastive_loss_matches_fairseq_compute_preds(fairseq_ref):
    """Without the clustering (every label distinct), our loss is wav2vec 2.0's compute_preds logits
    (temperature 0.1, identical negatives -> -inf by float equality) with CE(target 0) summed, and the
    gradients to the query and to the positive tensor (positive and negative slots: fairseq does not
    detach the negatives) are the same."""
    g = torch.Generator().manual_seed(5)
    b, m, k, c = 2, 6, 4, 8
    table = torch.randn(3, c, generator=g)  # 3 codes: identical negatives are frequent
    codes = torch.randint(0, 3, (b, m, 1), generator=g)
    pos = table[codes[..., 0]].requires_grad_(True)
    query = torch.randn(b, m, c, generator=g, requires_grad=True)
    idx = sample_negatives(b, m, k, generator=g)
    labels = torch.arange(b * m).view(b, m)
    ours, stats = cross_contrastive_loss(query, pos, codes, idx, labels)
    assert stats["identical"] > 0
    me = types.SimpleNamespace(logit_temp=0.1)
    negs = pos.flatten(0, 1)[idx].permute(2, 0, 1, 3)
    logits = fairseq_ref.compute_preds(me, query, pos, negs)  # (1 + K, B, M)
    ref = F.cross_entropy(logits.permute(1, 2, 0).reshape(-1, k + 1).float(),
                          torch.zeros(b * m, dtype=torch.long), reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    go = torch.autograd.grad(ours, [query, pos])
    gr = torch.autograd.grad(ref, [query, pos])
    for a, r in zip(go, gr):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert go[1].abs().sum() > 0


def test_kmeans_matches_fast_pytorch_kmeans(fpk_kmeans):
    """Same initial centroids (our generator's draw: randperm(N)[:k]) -> fast_pytorch_kmeans'
    cosine KMeans (max_iter 100, tol 1e-4) gives the same labels on L2-normalized random points."""
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    # duplicated points: two initial centroids coincide, the second loses every tie and is left
    # empty (0/0 -> NaN -> zero centroid, which scores cosine 0 from then on)
    dup = F.normalize(torch.tensor([[1.0, 0.0]] * 5 + [[-1.0, 0.2]] * 2), dim=-1)
    for pts, k in ((x, 2), (x, 9), (dup, 3)):
        ours = cosine_kmeans(pts, k, generator=torch.Generator().manual_seed(k))
        init = pts[torch.randperm(len(pts), generator=torch.Generator().manual_seed(k))[:k]]
        ref = fpk_kmeans(n_clusters=k, mode="cosine", max_iter=100, tol=1e-4).fit_predict(pts, centroids=init.clone())
        assert torch.equal(ours, ref)
    assert len(ours.unique()) < 3  # the dup case did leave a cluster empty
