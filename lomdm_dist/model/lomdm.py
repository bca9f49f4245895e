"""The LoMDM model: the DiT backbone plus, for the learned-order scheduler, the phi and psi heads.

``LoMDM`` is a container; the diffusion objective and the sampler call its parts
(``backbone.conditioning`` / ``features`` / ``output_logits``, ``phi``, ``psi``) directly, because
the three-pass LoMDM step uses them in different combinations. Parameter names start with
``backbone.``, ``phi.`` or ``psi.``, which is how the optimizer tells the scheduler heads apart.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config.schema import ConfigError, DiffusionConfig, ModelConfig
from .dit import DiT
from .heads import SchedulerHead


class LoMDM(nn.Module):
    """Backbone ``DiT`` and optional ``SchedulerHead``s ``phi`` (forward order) and ``psi`` (reverse)."""

    def __init__(self, backbone: DiT, phi: SchedulerHead | None, psi: SchedulerHead | None,
                 mask_token_id: int) -> None:
        super().__init__()
        if (phi is None) != (psi is None):
            raise ValueError("phi and psi scheduler heads must both be present or both absent")
        self.backbone = backbone
        self.phi = phi
        self.psi = psi
        self.mask_token_id = mask_token_id
        self.vocab_size = backbone.vocab_size

    def init_weights(self) -> None:
        """Re-initialise every parameter (after ``to_empty`` on a model built on the meta device)."""
        self.backbone.init_weights()
        for head in (self.phi, self.psi):
            if head is not None:
                head.init_weights()

    def forward(self, tokens: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The backbone's ``(logits, h)``; present so wrappers that hook the root module's call work."""
        return self.backbone(tokens, sigma)


def _check_model_config(model_cfg: ModelConfig, vocab_size: int) -> None:
    positive = {"model.n_layers": model_cfg.n_layers, "model.d_model": model_cfg.d_model,
                "model.n_heads": model_cfg.n_heads, "model.cond_dim": model_cfg.cond_dim,
                "model.mlp_ratio": model_cfg.mlp_ratio}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if model_cfg.d_model % model_cfg.n_heads:
        raise ConfigError(f"model.d_model ({model_cfg.d_model}) must be divisible by model.n_heads "
                          f"({model_cfg.n_heads})")
    if (model_cfg.d_model // model_cfg.n_heads) % 2:
        raise ConfigError("model.d_model / model.n_heads must be even (rotary embeddings rotate pairs)")
    if not 0.0 <= model_cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {model_cfg.dropout}")
    if model_cfg.head_mlp_hidden < 0:
        raise ConfigError(f"model.head_mlp_hidden must be >= 0, got {model_cfg.head_mlp_hidden}")
    if model_cfg.rope_base <= 0:
        raise ConfigError(f"model.rope_base must be positive, got {model_cfg.rope_base}")
    if vocab_size < 2:
        raise ConfigError(f"vocab_size must count at least one token plus the mask token, got {vocab_size}")


def build_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int) -> LoMDM:
    """Build the model on the current default device (``with torch.device("meta"):`` works).

    ``vocab_size`` counts the mask token, whose id is ``vocab_size - 1``. The phi/psi heads exist
    only for ``diffusion.scheduler == "lomdm"``; their MLP width is ``model.head_mlp_hidden`` or
    ``model.d_model`` when that is 0. Initialisation is deterministic given ``torch.manual_seed``.
    """
    _check_model_config(model_cfg, vocab_size)
    m = model_cfg
    backbone = DiT(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                   cond_dim=m.cond_dim, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                   time_conditioning=m.time_conditioning, rope_base=m.rope_base)
    phi = psi = None
    if diffusion_cfg.scheduler == "lomdm":
        hidden = m.head_mlp_hidden or m.d_model
        phi, psi = (SchedulerHead(m.d_model, m.n_heads, m.cond_dim, m.mlp_ratio, m.rope_base, hidden)
                    for _ in range(2))
    return LoMDM(backbone, phi, psi, mask_token_id=vocab_size - 1)
