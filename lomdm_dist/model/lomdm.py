"""The LoMDM model: the DiT backbone plus, for the learned-order scheduler, the phi and psi heads.

``LoMDM`` is a container; the diffusion objective and the sampler call its parts
(``backbone.conditioning`` / ``features`` / ``output_logits``, ``phi``, ``psi``) directly, because
the three-pass LoMDM step uses them in different combinations. Parameter names start with
``backbone.``, ``phi.`` or ``psi.``, which is how the optimizer tells the scheduler heads apart.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config.errors import ConfigError
from ..config.schema import DiffusionConfig, ModelConfig
from .dit import DiT
from .heads import SchedulerHead
from .init import init_parameters_


def resolve_seed(seed: int | None) -> int:
    """``seed``, or for None one drawn from torch's global generator, so that
    ``torch.manual_seed(s)`` followed by ``build_model(...)`` stays reproducible."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


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

    def init_weights(self, seed: int | None = None) -> None:
        """Re-initialise every parameter from ``seed`` (e.g. after ``to_empty`` on a model built on
        the meta device); None draws the seed from torch's global generator (see ``resolve_seed``)."""
        init_parameters_(self, resolve_seed(seed))

    def forward(self, tokens: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The backbone's ``(logits, h)``; present so wrappers that hook the root module's call work."""
        return self.backbone(tokens, sigma)


def build_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int, *,
                seed: int | None = None) -> LoMDM:
    """Build the model on the current default device, initialised from ``seed``.

    ``vocab_size`` counts the mask token, whose id is ``vocab_size - 1``. The phi/psi heads exist
    only for ``diffusion.scheduler == "lomdm"``; their MLP width is ``model.head_mlp_hidden`` or
    ``model.d_model`` when that is 0. Every parameter's initial value is a function of ``seed`` and
    its name (``model/init.py``); ``seed`` None draws one from torch's global generator. Under
    ``with torch.device("meta"):`` nothing is allocated or initialised: the distributed engine lays
    the model out first and then fills each rank's shard with the same values
    (``parallel/materialize.py``). The modules are always constructed on the meta device, so
    PyTorch's per-module default initialisation, which would be overwritten, never runs.
    ``model_cfg`` is a checked section (``ModelConfig.validate``, run by ``Config.validate``).
    """
    if vocab_size < 2:
        raise ConfigError(f"vocab_size must count at least one token plus the mask token, got {vocab_size}")
    target = torch.get_default_device()
    with torch.device("meta"):
        model = _construct(model_cfg, diffusion_cfg, vocab_size)
    if target.type != "meta":
        model.to_empty(device=target)
        init_parameters_(model, resolve_seed(seed))
    return model


def _construct(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, vocab_size: int) -> LoMDM:
    """The modules (``build_model`` constructs them on the meta device and initialises them itself)."""
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
