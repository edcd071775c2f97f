"""The independent evaluation FR model: trained on clean victim faces, never on protected ones, with its own
architecture (a plain 4-stage CNN, not the target's IResNet) and seed. It judges whether a reconstruction or
an inverted image shows the right person (the "evaluation classifier" of the model-inversion literature)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import to_float


class EvalNet(nn.Module):
    """(N, C, S, S) [-1, 1] -> L2-normalised (N, E) embeddings; a cosine classifier on top."""

    def __init__(self, channels: int, classes: int, width: int = 16, embedding: int = 64, scale: float = 16.0):
        super().__init__()
        w = width
        layers, c = [], channels
        for o in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = o
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, embedding))
        self.weight = nn.Parameter(torch.randn(classes, embedding) * 0.01)
        self.scale = scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(x) @ F.normalize(self.weight).t()

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


def train_evaluator(images_u8: torch.Tensor, labels: torch.Tensor, steps: int = 300, batch: int = 40, seed: int = 0,
                    lr: float = 3e-3) -> EvalNet:
    """Train on clean faces (N, C, S, S) uint8 with flips and +-3 pixel shifts; returns the model in eval mode."""
    torch.manual_seed(50_000 + seed)
    g = torch.Generator().manual_seed(50_000 + seed)
    net = EvalNet(images_u8.shape[1], int(labels.max()) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n, s = images_u8.shape[0], images_u8.shape[-1]
    net.train()
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        x = to_float(images_u8[idx])
        x = torch.where((torch.rand(batch, generator=g) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        dx, dy = torch.randint(-3, 4, (2,), generator=g).tolist()
        x = F.pad(x, (3, 3, 3, 3), mode="replicate")[..., 3 + dy : 3 + dy + s, 3 + dx : 3 + dx + s]
        loss = F.cross_entropy(net.logits(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: EvalNet, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net.classify(to_float(images_u8)) == labels).float().mean())
