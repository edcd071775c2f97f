"""training: face recognition co-trained with fastmix's frequency-domain privacy masks.

One module per concern (see training/README.md):
    data      ORL / LFW / ImageFolder / InsightFace RecordIO and .bin loaders, preprocessing, splits
    model     IResNet-18/34/50 and a small CPU backbone, adapted to frequency channels or pixels
    loss      ArcFace / CosFace margin heads and the mixed-label loss
    defences  none, freq, PPFR-FD, PartialFace, DCTDP, InstaHide, fixed-k and adaptive hybrid masks
    policy    the strategy network pi(k | state) and its REINFORCE update
    loop      the training loop (DDP, AMP, atomic checkpoints, exact resume, metrics)
    eval      verification (10-fold accuracy, TAR@FAR) and closed-set identification
    train     the CLI: ``python -m training.train --config training/configs/orl_cpu.yaml``
    results   the results table: ``python -m training.results``

All masking goes through fastmix's public API (frontend, freq_mix, samplers, nn.HybridMask); nothing here
re-implements a transform, a mix or a sign flip.
"""
from .config import load_config

__all__ = ["load_config"]
