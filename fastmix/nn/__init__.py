"""nn.Module wrappers of the fastmix ops."""
from .hybrid_mask import KEEP_PRESETS, PARTIALFACE_DROP, HybridMask, MixPlan, keep_ids

__all__ = ["HybridMask", "MixPlan", "keep_ids", "KEEP_PRESETS", "PARTIALFACE_DROP"]
