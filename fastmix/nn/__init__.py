"""nn.Module wrappers of the fastmix ops."""
from .hybrid_mask import KEEP_PRESETS, PARTIALFACE_DROP, HybridMask, keep_ids

__all__ = ["HybridMask", "keep_ids", "KEEP_PRESETS", "PARTIALFACE_DROP"]
