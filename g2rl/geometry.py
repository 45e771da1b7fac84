"""Geometry of a group's responses (spec section 6): mean pairwise cosine and the share of
negative pairs, over the pairs i < j of each group.

Used for the policy's own gradient features (from ``group_novelty``'s cosine matrices) and for
an external sentence embedding of the responses' texts (the "semantic" geometry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairStats:
    """Running sums over response pairs i < j within groups."""

    cos_sum: float = 0.0
    negative: int = 0
    pairs: int = 0

    def add_cosine(self, cosine: torch.Tensor) -> PairStats:
        """Add the pairs of (B, G, G) cosine matrices (the diagonal and j < i are ignored)."""
        G = cosine.shape[-1]
        if G < 2 or cosine.numel() == 0:
            return self
        iu = torch.triu_indices(G, G, offset=1, device=cosine.device)
        vals = cosine[..., iu[0], iu[1]].double()
        self.cos_sum += float(vals.sum())
        self.negative += int((vals < 0).sum())
        self.pairs += vals.numel()
        return self

    def add_features(self, features: torch.Tensor) -> PairStats:
        """Add the pairs of (B, G, d) feature vectors (cosines of the raw vectors)."""
        return self.add_cosine(group_cosine(features))

    @property
    def cos_mean(self) -> float:
        return self.cos_sum / self.pairs if self.pairs else float("nan")

    @property
    def neg_share(self) -> float:
        return self.negative / self.pairs if self.pairs else float("nan")

    def as_dict(self, prefix: str) -> dict[str, float]:
        """``{prefix}_cos_mean`` and ``{prefix}_neg_share``."""
        return {f"{prefix}_cos_mean": self.cos_mean, f"{prefix}_neg_share": self.neg_share}


def group_cosine(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, G, d) -> (B, G, G) cosines of the rows of each group (float32; a zero row has cosine
    0 with everything)."""
    f = features.float()
    p = f / (torch.linalg.vector_norm(f, dim=-1, keepdim=True) + eps)
    return p @ p.transpose(1, 2)


def pair_geometry(cosine: torch.Tensor) -> tuple[float, float]:
    """(mean cosine, share of negative cosines) over the pairs i < j of (B, G, G) matrices."""
    st = PairStats().add_cosine(cosine)
    return st.cos_mean, st.neg_share


def distinct_per_group(responses: list[list[int]] | list[tuple[int, ...]], group_size: int
                       ) -> float:
    """Mean number of distinct responses (token sequences) per group of ``group_size``
    consecutive responses."""
    groups = [responses[i:i + group_size] for i in range(0, len(responses), group_size)]
    if not groups:
        return float("nan")
    return sum(len({tuple(r) for r in g}) for g in groups) / len(groups)
