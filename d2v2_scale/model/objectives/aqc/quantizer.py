"""wav2vec 2.0's Gumbel vector quantizer, as data2vec-aqc uses it (docs/REFERENCE.md §3.4).

Plain PyTorch, no tensor parallelism: it is small (410,240 parameters at base) and runs
replicated on every rank where the CNN features live.  Parameter names follow fairseq's
`GumbelVectorQuantizer` (`weight_proj`, `vars`) so a checkpoint importer can map them 1:1.

    logits l = weight_proj(x)                  [N, G*V] -> viewed [N, G, V]
    train:  onehot = hard Gumbel-softmax(l, tau) (straight-through)
    eval:   onehot = one-hot(argmax l)
    out     = concat_g sum_v onehot[n, g, v] * vars[g, v]            [N, vq_dim]
    code_perplexity = sum_g exp(-sum_v hbar_gv log(hbar_gv + 1e-7))  hbar: batch mean of one-hot(argmax l)
    prob_perplexity = sum_g exp(-sum_v pbar_gv log(pbar_gv + 1e-7))  pbar: batch mean of softmax(l)
    tau(u) = max(2 * 0.999995^u, 0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gumbel_temperature(num_updates: int, max_temp: float = 2.0, min_temp: float = 0.5,
                       decay: float = 0.999995) -> float:
    """tau(u) = max(max_temp * decay^u, min_temp): 2.0 at u = 0, 1.21306 at 100k, 0.5 from ~277k."""
    return max(max_temp * decay ** num_updates, min_temp)


def diversity_loss(prob_perplexity: Tensor, num_codes: int = 640) -> Tensor:
    """(G*V - prob_perplexity) / (G*V): 0 when every code is used equally, (G*V - G)/(G*V) at collapse."""
    return (num_codes - prob_perplexity) / num_codes


def _perplexity(probs: Tensor) -> Tensor:
    """[N, G, V] per-row distributions -> 0-dim sum over groups of exp(entropy of the batch mean)."""
    avg = probs.mean(dim=0)
    return torch.exp(-torch.sum(avg * torch.log(avg + 1e-7), dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """G groups of V codebook entries of vq_dim/G channels each; one entry chosen per group.

    forward(x [N, dim], generator=None) -> {
        "x": [N, vq_dim] quantized vectors (dtype of x; the projection and codebook sum run in
             the parameters' dtype, softmax/Gumbel/perplexities in fp32),
        "codes": [N, G] long, the entry chosen per group (its codebook vector is what "x" holds;
                 in training the Gumbel-perturbed argmax, in eval the argmax of the logits),
        "code_perplexity": 0-dim fp32 (no grad), "prob_perplexity": 0-dim fp32 (with grad),
        "temp": float, the current Gumbel temperature}
    """

    def __init__(self, dim: int = 512, num_vars: int = 320, groups: int = 2, vq_dim: int = 256,
                 temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)):
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"quantizer vq_dim {vq_dim} must be divisible by groups {groups}")
        self.dim, self.num_vars, self.groups, self.vq_dim = dim, num_vars, groups, vq_dim
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp
        # fairseq's init (B.4): codebook U[0, 1), projection N(0, 1) with zero bias
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups))
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    @property
    def num_codes(self) -> int:
        return self.groups * self.num_vars

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = gumbel_temperature(num_updates, self.max_temp, self.min_temp, self.temp_decay)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict:
        n = x.shape[0]
        g, v = self.groups, self.num_vars
        # the projection runs in the model's dtype through the submodule's own call (ZeRO-3
        # gathers weight_proj's parameters in its forward hook); softmax, perplexities and the
        # Gumbel draw in fp32, as fairseq does under fp16
        logits = self.weight_proj(x.to(self.weight_proj.weight.dtype)).float().view(n, g, v)
        hard_codes = logits.argmax(-1)  # [N, G]
        with torch.no_grad():
            hard = F.one_hot(hard_codes, v).float()
            code_ppl = _perplexity(hard)
        prob_ppl = _perplexity(torch.softmax(logits, dim=-1))
        if self.training:
            onehot, codes = self._gumbel_hard(logits, generator)
        else:
            onehot, codes = hard, hard_codes
        # [N, G, V] x [G, V, d] -> [N, G, d]: the per-group sum of fairseq's (onehot * vars), without
        # materializing its [N, G*V, d] product; in the codebook's dtype, as fairseq's type_as (in
        # bf16/fp16 the straight-through (1 - p) + p rounds to 1: exact codebook vectors)
        out = torch.einsum("ngv,gvd->ngd", onehot.to(self.vars.dtype), self.vars.view(g, v, -1))
        return {"x": out.reshape(n, self.vq_dim).to(x.dtype), "codes": codes, "code_perplexity": code_ppl,
                "prob_perplexity": prob_ppl, "temp": self.curr_temp}

    def _gumbel_hard(self, logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """torch's F.gumbel_softmax(hard=True), with the noise drawn from `generator` (so every TP
        rank, and a resumed run, draws the same): g = -log(Exp(1)), y = softmax((l + g) / tau),
        straight-through one-hot(argmax y) - y.detach() + y.  -> ([N, G, V] fp32, codes [N, G])."""
        if generator is None:
            e = torch.empty_like(logits).exponential_()
        else:
            e = torch.empty(logits.shape, dtype=logits.dtype, device=generator.device)
            e = e.exponential_(generator=generator).to(logits.device)
        gumbels = -e.log()
        y_soft = torch.softmax((logits + gumbels) / self.curr_temp, dim=-1)
        codes = y_soft.argmax(-1)
        y_hard = torch.zeros_like(y_soft).scatter_(-1, codes.unsqueeze(-1), 1.0)
        return y_hard - y_soft.detach() + y_soft, codes


__all__ = ["GumbelVectorQuantizer", "diversity_loss", "gumbel_temperature"]
