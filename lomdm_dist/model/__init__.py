"""The DiT backbone and the LoMDM phi/psi scheduler heads: plain PyTorch, no distributed code."""

from .dit import DiT
from .heads import SchedulerHead
from .layers import DiTBlock, FinalLayer, FP32LayerNorm, MLP, NoiseLevelEmbedding, SelfAttention
from .lomdm import LoMDM, build_model
from .rotary import apply_rotary, rotary_cos_sin

__all__ = ["DiT", "DiTBlock", "FinalLayer", "FP32LayerNorm", "LoMDM", "MLP", "NoiseLevelEmbedding",
           "SchedulerHead", "SelfAttention", "apply_rotary", "build_model", "rotary_cos_sin"]
