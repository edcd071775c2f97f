"""fastmix: fused frequency-domain privacy masking for face recognition.

Public API (see README.md): block_dct / block_idct, to_channels / from_channels, freq_mix, frontend,
frontend_inverse, sample_partners, sample_weights, set_index_checks, available_backends, cpu_capability, and
fastmix.nn.HybridMask. Importing fastmix never touches a GPU and never fails because an extension is missing
(or was built against another torch).
"""
from . import nn
from ._backend import available_backends, cpu_capability
from .ops._common import set_index_checks
from .ops.dct import block_dct, block_dct_ref, block_idct, block_idct_ref, dct_matrix, from_channels, to_channels
from .ops.freq_mix import freq_mix, freq_mix_ref
from .ops.frontend import frontend, frontend_inverse, frontend_ref
from .samplers import sample_partners, sample_weights

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "cpu_capability",
    "block_dct",
    "block_dct_ref",
    "block_idct",
    "block_idct_ref",
    "dct_matrix",
    "from_channels",
    "freq_mix",
    "freq_mix_ref",
    "frontend",
    "frontend_inverse",
    "frontend_ref",
    "nn",
    "sample_partners",
    "sample_weights",
    "set_index_checks",
    "to_channels",
]
