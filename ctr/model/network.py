"""DeepFM (Guo et al., 2017): a factorization machine and an MLP over shared field embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class DeepFM(nn.Module):
    """Input: int64 [batch, fields] of per-field indices; output: click logits [batch]."""

    def __init__(self, cardinalities: Sequence[int], dim: int = 16, hidden: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"cardinalities must be non-empty positive ints, got {list(cardinalities)}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        sizes = torch.tensor([0, *cardinalities[:-1]], dtype=torch.int64)
        self.register_buffer("offsets", torch.cumsum(sizes, 0), persistent=False)
        self.register_buffer("limits", torch.tensor(list(cardinalities), dtype=torch.int64) - 1, persistent=False)
        total = int(sum(cardinalities))
        self.embedding = nn.Embedding(total, dim)
        self.linear = nn.Embedding(total, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.linear.weight)
        layers: list[nn.Module] = []
        width = len(cardinalities) * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.minimum(x.clamp(min=0), self.limits) + self.offsets
        e = self.embedding(idx)  # [B, F, D]
        first = self.linear(idx).sum(dim=(1, 2))
        s = e.sum(dim=1)
        fm = 0.5 * (s * s - (e * e).sum(dim=1)).sum(dim=1)
        deep = self.mlp(e.flatten(1)).squeeze(1)
        return self.bias + first + fm + deep
