"""The DiT backbone and the LoMDM phi/psi scheduler heads: plain PyTorch, no distributed code."""

from .dit import DiT
from .heads import SchedulerHead
from .init import ParamInit, fill_shard_, init_parameters_, init_plan
from .layers import DiTBlock, FinalLayer, FP32LayerNorm, MLP, NoiseLevelEmbedding, SelfAttention
from .lomdm import LoMDM, build_model, resolve_seed
from .rotary import apply_rotary, rotary_cos_sin

__all__ = ["DiT", "DiTBlock", "FinalLayer", "FP32LayerNorm", "LoMDM", "MLP", "NoiseLevelEmbedding", "ParamInit",
           "SchedulerHead", "SelfAttention", "apply_rotary", "build_model", "fill_shard_", "init_parameters_",
           "init_plan", "resolve_seed", "rotary_cos_sin"]
