"""Probe heads over frozen tokens [B, L, d] (or pooled features [B, d]) and the k-NN classifier.

* ``AttentivePoolProbe`` (protocol ivnext): the encoder's own attention-pooling form (query =
  mean of the tokens, LayerNorm on q/k/v inputs, one cross-attention), then a linear classifier.
* ``QueryProbe`` (vjepa, blocks=1; vjepa2, blocks=4): V-JEPA's attentive pooler: ``blocks - 1``
  pre-norm self-attention blocks over the tokens, then one cross-attention block whose query is a
  learnable token (residual + MLP), then LayerNorm-free linear classifier.
* ``HeadGrid``: several heads of one kind trained side by side on the same features (vjepa2's
  5 lr x 4 wd grid); each head has its own optimiser parameter group.
* ``fit_linear``: the linear head's closed problem (logistic regression) solved by L-BFGS.
* ``knn_predict``: weighted k-NN vote on cosine similarity (DINO's: weight exp(sim / T)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.models.vit import AttentionPool


class AttentivePoolProbe(nn.Module):
    def __init__(self, dim: int, heads: int, num_classes: int):
        super().__init__()
        self.pool = AttentionPool(dim, heads, dim, backend="math")
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.pool(x)))


class _SelfBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _CrossBlock(_SelfBlock):
    """The same pre-norm block, its queries (not normalised) attending over the normalised tokens."""

    def forward(self, q, x):
        h = self.norm1(x)
        q = q + self.attn(q, h, h, need_weights=False)[0]
        return q + self.mlp(self.norm2(q))


class QueryProbe(nn.Module):
    def __init__(self, dim: int, heads: int, num_classes: int, blocks: int = 1):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a query probe needs >= 1 block (the cross-attention one), got {blocks}")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.self_blocks = nn.ModuleList(_SelfBlock(dim, heads) for _ in range(blocks - 1))
        self.cross = _CrossBlock(dim, heads)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        for blk in self.self_blocks:
            x = blk(x)
        q = self.cross(self.query.expand(x.shape[0], -1, -1), x)
        return self.fc(q.squeeze(1))


class LinearProbe(nn.Module):
    """BatchNorm-free linear classifier; features are standardised with train-set statistics."""

    def __init__(self, dim: int, num_classes: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float().clamp_min(1e-6))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc((x.float() - self.mean) / self.std)


def fit_linear(head: LinearProbe, x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int = 1000,
               tol: float = 1e-6) -> dict:
    """Fits ``head`` to convergence: multinomial logistic regression on its standardised inputs,
    mean cross-entropy + ``weight_decay`` / 2 * ||W||^2, full batch, L-BFGS from zero weights, in
    float64 (float32 stalls at max |grad| ~1e-4). With weight_decay > 0 the problem is strictly
    convex: the fit is the same whatever the seed. Returns iterations, final loss, largest
    gradient entry and whether it reached ``tol``."""
    z = ((x.double() - head.mean.double()) / head.std.double())
    y = y.long()
    w = torch.zeros_like(head.fc.weight, dtype=torch.float64, requires_grad=True)
    b = torch.zeros_like(head.fc.bias, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=50,
                            tolerance_grad=tol, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
        loss = objective().item()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    with torch.no_grad():
        head.fc.weight.copy_(w)
        head.fc.bias.copy_(b)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    return {"iterations": iters, "loss": loss, "grad_max": grad, "converged": grad <= tol}


def build_head(kind: str, dim: int, heads: int, num_classes: int, blocks: int = 1, **kw) -> nn.Module:
    if kind == "attentive_pool":
        return AttentivePoolProbe(dim, heads, num_classes)
    if kind in ("vjepa", "vjepa2"):
        return QueryProbe(dim, heads, num_classes, blocks)
    if kind == "linear":
        return LinearProbe(dim, num_classes, kw.get("mean"), kw.get("std"))
    raise ValueError(f"probe head {kind!r} unknown; choose attentive_pool, vjepa, vjepa2 or linear")


class HeadGrid(nn.Module):
    """One head per (lr, wd) pair, all fed the same features; forward returns [H, B, C] logits."""

    def __init__(self, make_head, lrs: list[float], wds: list[float]):
        super().__init__()
        self.grid = [(float(lr), float(wd)) for lr in lrs for wd in wds]
        self.heads = nn.ModuleList(make_head() for _ in self.grid)

    def forward(self, x):
        return torch.stack([h(x) for h in self.heads])

    def param_groups(self) -> list[dict]:
        groups = []
        for (lr, wd), head in zip(self.grid, self.heads):
            decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and "query" not in n]
            rest = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and "query" not in n)]
            groups += [{"params": decay, "lr": lr, "base_lr": lr, "weight_decay": wd},
                       {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]
        return groups


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C] of a weighted k-NN on cosine similarity: each of the k nearest train
    features votes for its class with weight exp(sim / T). ``k`` is capped at the train size."""
    train = F.normalize(train_feats.float(), dim=-1)
    k = min(k, train.shape[0])
    out = []
    for q in F.normalize(query.float(), dim=-1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=-1)
        w = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, dtype=torch.float32, device=q.device)
        scores.scatter_add_(1, train_labels[idx].long(), w)
        out.append(scores)
    return torch.cat(out)
