"""Parameter counts of the LoMDM model, by part, in closed form from ``lomdm_dist/model/``.

Written out rather than read off a built model so that the planner answers for an 8B or 70B
configuration in microseconds and without memory; ``tests/test_plan.py`` checks every count
against ``build_model`` on the meta device. Each part is also split into what tensor parallelism
shards (the Megatron column/row Linears, the vocab-parallel embedding and output layer, the heads'
read-out MLP; ``lomdm_dist/parallel/tensor_parallel.py``) and what every tensor-parallel rank holds
whole (norms, adaLN modulations, the row-parallel biases, the conditioning MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import DiffusionConfig, ModelConfig
from ..parallel.flops import SINUSOID_DIM


@dataclass(frozen=True)
class Part:
    """Parameters of one part: ``sharded`` is split over the tensor-parallel ranks, ``replicated`` is not."""

    sharded: int
    replicated: int

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_tp_rank(self, tp: int) -> float:
        """Parameters one tensor-parallel rank holds (the sharded part divided evenly)."""
        return self.sharded / tp + self.replicated

    def __add__(self, other: "Part") -> "Part":
        return Part(self.sharded + other.sharded, self.replicated + other.replicated)

    def __mul__(self, n: int) -> "Part":
        return Part(self.sharded * n, self.replicated * n)


def block_part(d: int, mlp_ratio: int, cond_dim: int) -> Part:
    """One ``DiTBlock``: q, k, v, o (no bias), fc1 (+bias), fc2 (+bias), two LayerNorm weights
    (no bias), the adaLN modulation Linear(cond_dim, 6 d) with bias."""
    hidden = mlp_ratio * d
    sharded = 4 * d * d + (d * hidden + hidden) + hidden * d       # fc2's bias is replicated
    replicated = d + 2 * d + (cond_dim * 6 * d + 6 * d)           # fc2 bias, norm1, norm2, modulation
    return Part(sharded, replicated)


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part; ``heads`` is zero without the lomdm scheduler."""

    embedding: Part
    """Token embedding (vocab_size x d), vocab-parallel under TP."""
    conditioning: Part
    """The noise-level MLP ``sigma_map`` (Linear(256, c), Linear(c, c))."""
    block: Part
    """One backbone block (all blocks are the same)."""
    n_layers: int
    output: Part
    """Final layer: adaLN LayerNorm weight, modulation Linear(c, 2 d), untied Linear(d, V)."""
    head: Part
    """One scheduler head (phi or psi): a DiT block, a LayerNorm, Linear(d, h), Linear(h, 1, no bias)."""
    n_heads: int
    """Scheduler heads present: 2 (phi, psi) for lomdm, else 0."""

    @property
    def blocks(self) -> Part:
        return self.block * self.n_layers

    @property
    def backbone(self) -> Part:
        return self.embedding + self.conditioning + self.blocks + self.output

    @property
    def heads(self) -> Part:
        return self.head * self.n_heads

    @property
    def total(self) -> int:
        return self.backbone.total + self.heads.total

    def as_dict(self) -> dict[str, int]:
        return {"embedding": self.embedding.total, "conditioning": self.conditioning.total,
                "blocks": self.blocks.total, "output": self.output.total, "backbone": self.backbone.total,
                "heads": self.heads.total, "total": self.total}


def count_parameters(model: ModelConfig, diffusion: DiffusionConfig, vocab_size: int) -> ParamCount:
    """Parameters of ``build_model(model, diffusion, vocab_size)`` (``vocab_size`` counts the mask token)."""
    d, c, r = model.d_model, model.cond_dim, model.mlp_ratio
    head_hidden = model.head_mlp_hidden or d
    block = block_part(d, r, c)
    head = block + Part(sharded=d * head_hidden + head_hidden + head_hidden, replicated=d)
    return ParamCount(
        embedding=Part(sharded=vocab_size * d, replicated=0),
        conditioning=Part(sharded=0, replicated=SINUSOID_DIM * c + c + c * c + c),
        block=block,
        n_layers=model.n_layers,
        output=Part(sharded=d * vocab_size + vocab_size, replicated=d + c * 2 * d + 2 * d),
        head=head,
        n_heads=2 if diffusion.scheduler == "lomdm" else 0,
    )
