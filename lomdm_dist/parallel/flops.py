"""Model FLOPs of one training step (all three LoMDM passes) and the MFU derived from them.

The count is of *model* FLOPs (matmuls and attention, 2 per multiply-add; backward = 2 x forward),
as MFU is defined by PaLM / Megatron: recomputation under activation checkpointing is not
counted, elementwise work (norms, modulate, GELU, softmax) is not counted. The formulas, with the
numbers for ``configs/owt-small.yaml``, are in ``docs/mfu.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_FLOPS = {
    "h100-sxm-bf16": 989.4e12,
    "h100-pcie-bf16": 756.0e12,
    "h200-bf16": 989.4e12,
    "a100-bf16": 312.0e12,
}
"""Dense (no sparsity) peak tensor-core FLOP/s per device, from the vendors' data sheets."""

SINUSOID_DIM = 256   # NoiseLevelEmbedding's frequency_dim


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step of the global batch, by part."""

    clean_pass: float
    """Pass 1: backbone forward on the clean rows, no grad (lomdm only)."""
    phi_head: float
    """phi head forward and backward on the clean features (lomdm only)."""
    masked_pass: float
    """Passes 2..K+1: backbone forward and backward on the K masked copies."""
    psi_head: float
    """psi head forward and backward on the masked copies' features (lomdm only)."""
    output_layer: float
    """Vocabulary projection, forward and backward, on the masked positions only."""

    @property
    def total(self) -> float:
        return self.clean_pass + self.phi_head + self.masked_pass + self.psi_head + self.output_layer


def block_flops(d_model: int, mlp_ratio: int, cond_dim: int, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs of one DiT block: (per token, per row).

    Per token: q, k, v, o projections 8 d^2, MLP 4 r d^2, attention scores and weighted sum
    4 L d (bidirectional: the full L x L). Per row: the adaLN modulation 12 cond d.
    """
    per_token = 8 * d_model ** 2 + 4 * mlp_ratio * d_model ** 2 + 4 * seq_len * d_model
    return float(per_token), float(12 * cond_dim * d_model)


def step_flops(*, n_layers: int, d_model: int, mlp_ratio: int, cond_dim: int, head_hidden: int, vocab_size: int,
               seq_len: int, rows: int, num_masks: int, learned: bool, masked_fraction: float) -> StepFlops:
    """FLOPs of one step on ``rows`` rows of ``seq_len`` tokens.

    ``masked_fraction``: masked share of the K x rows x seq_len positions (the logits are computed
    there only; measure it, e.g. ``LossOutput.stats['masked_fraction']``, or use its expectation:
    E[t] = 0.5 for mdlm). ``head_hidden``: the phi/psi read-out width (model.head_mlp_hidden or d).
    Also counted: the conditioning MLP per row (2 (256 cond + cond^2)) and the final layer's
    modulation, which runs per masked position (4 cond d).
    """
    tokens = rows * seq_len
    blk_token, blk_row = block_flops(d_model, mlp_ratio, cond_dim, seq_len)
    backbone_token = n_layers * blk_token
    backbone_row = n_layers * blk_row + 2 * (SINUSOID_DIM * cond_dim + cond_dim ** 2)
    head_token = blk_token + 2 * d_model * head_hidden + 2 * head_hidden
    head_row = blk_row
    copies = num_masks * rows
    masked_tokens = masked_fraction * copies * seq_len
    clean = (backbone_token * tokens + backbone_row * rows) if learned else 0.0
    phi = 3 * (head_token * tokens + head_row * rows) if learned else 0.0
    masked = 3 * (backbone_token * copies * seq_len + backbone_row * copies)
    psi = 3 * (head_token * copies * seq_len + head_row * copies) if learned else 0.0
    output = 3 * (2 * d_model * vocab_size + 4 * cond_dim * d_model) * masked_tokens
    return StepFlops(clean_pass=float(clean), phi_head=float(phi), masked_pass=float(masked), psi_head=float(psi),
                     output_layer=float(output))


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    if step_seconds <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError("mfu: step_seconds, num_devices and peak_flops_per_device must be positive")
    return flops_per_step / (step_seconds * num_devices * peak_flops_per_device)


def config_step_flops(cfg, *, vocab_size: int, rows: int, masked_fraction: float) -> StepFlops:
    """:func:`step_flops` for a run's config (``model``, ``data``, ``diffusion``) on ``rows`` rows."""
    m, d = cfg.model, cfg.diffusion
    return step_flops(n_layers=m.n_layers, d_model=m.d_model, mlp_ratio=m.mlp_ratio, cond_dim=m.cond_dim,
                      head_hidden=m.head_mlp_hidden or m.d_model, vocab_size=vocab_size, seq_len=cfg.data.seq_len,
                      rows=rows, num_masks=d.resolved_masks_per_row(), learned=d.scheduler == "lomdm",
                      masked_fraction=masked_fraction)


def device_peak_flops(device_name: str | None, compute_dtype: str | None) -> float | None:
    """Dense peak of a GPU from :data:`PEAK_FLOPS` by its CUDA name, for bf16 compute; None when it
    is unknown (CPU, another GPU, fp32 compute): MFU is then not reported rather than guessed."""
    if not device_name or compute_dtype != "bf16":
        return None
    name = device_name.lower()
    if "h200" in name:
        return PEAK_FLOPS["h200-bf16"]
    if "h100" in name:
        return PEAK_FLOPS["h100-pcie-bf16" if "pcie" in name else "h100-sxm-bf16"]
    if "a100" in name:
        return PEAK_FLOPS["a100-bf16"]
    return None
