"""Margin heads (ArcFace, CosFace) and the mixed-label loss of k-way mixed faces.

    L(m) = sum_t weight[m, t] * CE(s * margin(cos(f(x_mix[m]), W), y[index[m, t]]), y[index[m, t]])

where the margin is applied at the target class of each term t. Partners with weight exactly 0 (the padding
of a per-sample k) contribute nothing, not even a NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("arcface", "cosface")


class MarginHead(nn.Module):
    """Normalised classifier with an additive margin.

    arcface: s * cos(theta_y + m)   (Deng et al. 2019; cos(theta + m) only where theta + m < pi, else the
             monotone extension cos(theta) - m sin(m), as InsightFace)
    cosface: s * (cos(theta_y) - m) (Wang et al. 2018)
    """

    def __init__(self, embedding: int, num_classes: int, kind: str = "arcface", s: float = 64.0, m: float = 0.5):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head.type must be one of {HEADS}, got {kind!r}")
        self.kind, self.s, self.m = kind, float(s), float(m)
        self.weight = nn.Parameter(torch.randn(num_classes, embedding) * 0.01)
        self.th, self.mm = math.cos(math.pi - self.m), math.sin(math.pi - self.m) * self.m

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(M, E) embeddings -> (M, num_classes) cosines, in float32 (margins are precision-sensitive)."""
        return F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))

    def logits(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(M, num_classes) cosines and (M,) targets -> scaled logits with the margin at each target."""
        ct = cos.gather(1, target.view(-1, 1)).clamp(-1.0, 1.0)
        if self.kind == "cosface":
            mt = ct - self.m
        else:
            sin = (1.0 - ct * ct).clamp_min(1e-7).sqrt()
            phi = ct * math.cos(self.m) - sin * math.sin(self.m)
            mt = torch.where(ct > self.th, phi, ct - self.mm)
        return self.s * cos.scatter(1, target.view(-1, 1), mt)

    def extra_repr(self):
        return f"{self.kind}, classes={self.weight.shape[0]}, s={self.s}, m={self.m}"


def mixed_label_loss(head: MarginHead, emb: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-output loss (M,) of mixed faces: sum_t weights[m, t] * CE(head(emb[m]) with margin at labels[m, t]).

    emb (M, E); labels (M, k) int64 (the partner labels from the defence); weights (M, k) summing to 1
    per row. With k = 1 and weight 1 this is the plain margin loss.
    """
    cos = head.cosine(emb)
    total = cos.new_zeros(cos.shape[0])
    w = weights.to(cos.dtype)
    for t in range(labels.shape[1]):
        lt = F.cross_entropy(head.logits(cos, labels[:, t]), labels[:, t], reduction="none")
        total = total + torch.where(w[:, t] != 0, w[:, t] * lt, torch.zeros_like(lt))
    return total
