"""MDLM's DiT (kuleshov-group/mdlm ``models/dit.py``) as this project's model: names, shapes, checks.

The two networks compute the same function (``docs/mdlm-import.md`` has the table and the
comparison): LayerNorm without bias in fp32 with a weight, adaLN-Zero with the chunk order
(shift, scale, gate) x (attention, MLP), rotary "rotate half" embeddings with base 10000 on q and
k, softmax scale 1/sqrt(head_dim), bias-free attention projections, MLP and adaLN with biases,
GELU (tanh), final adaLN LayerNorm + linear with bias, conditioning ``SiLU(sigma_map(sigma))``.
The only re-layout is MDLM's fused ``attn_qkv`` ('b s (three h d)'): its rows are q, k, v one
after the other, each in (head, channel) order, which is exactly our q_proj/k_proj/v_proj.

What cannot be imported exactly, refused with the reason: time conditioning (MDLM feeds
sigma(t) = -log(1 - (1 - eps) t), this project feeds t); a mask token that is a tokenizer token
(MDLM's LM1B / bert-base-uncased models use [MASK] = 103; here the mask is the last id); a
parameterization other than SUBS; a backbone other than the DiT.

The LoMDM phi/psi heads have no MDLM counterpart: they are initialised fresh (``seed``), and
``scheduler="mdlm"`` (or any fixed scheduler) gives a model without them.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from .mdlm_file import MdlmSource, read_mdlm_file
from .portable import ConversionError, PortableModel, check_tensors, expected_shapes, fresh_model_tensors

FREQUENCY_DIM = 256
"""Width of MDLM's sinusoidal timestep embedding (``TimestepEmbedder``), as ours (``NoiseLevelEmbedding``)."""
ROTARY_BUFFER = "rotary_emb.inv_freq"

# (MDLM name, our name) in MDLM's parameter registration order, which is the order of its EMA's
# shadow_params: embedding, sigma_map, blocks, output layer.
_HEAD = [("vocab_embed.embedding", "backbone.embed.weight"),
         ("sigma_map.mlp.0.weight", "backbone.sigma_map.mlp.0.weight"),
         ("sigma_map.mlp.0.bias", "backbone.sigma_map.mlp.0.bias"),
         ("sigma_map.mlp.2.weight", "backbone.sigma_map.mlp.2.weight"),
         ("sigma_map.mlp.2.bias", "backbone.sigma_map.mlp.2.bias")]
_BLOCK = [("norm1.weight", "norm1.weight"),
          ("attn_qkv.weight", None),                       # split into attn.{q,k,v}_proj.weight
          ("attn_out.weight", "attn.o_proj.weight"),
          ("norm2.weight", "norm2.weight"),
          ("mlp.0.weight", "mlp.fc1.weight"), ("mlp.0.bias", "mlp.fc1.bias"),
          ("mlp.2.weight", "mlp.fc2.weight"), ("mlp.2.bias", "mlp.fc2.bias"),
          ("adaLN_modulation.weight", "modulation.weight"), ("adaLN_modulation.bias", "modulation.bias")]
_TAIL = [("output_layer.norm_final.weight", "backbone.final.norm.weight"),
         ("output_layer.linear.weight", "backbone.final.linear.weight"),
         ("output_layer.linear.bias", "backbone.final.linear.bias"),
         ("output_layer.adaLN_modulation.weight", "backbone.final.modulation.weight"),
         ("output_layer.adaLN_modulation.bias", "backbone.final.modulation.bias")]
_QKV = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")


def mdlm_parameter_names(n_blocks: int) -> list[str]:
    """MDLM's parameter names in ``backbone.parameters()`` order (its EMA's shadow_params order)."""
    return ([m for m, _ in _HEAD] + [f"blocks.{i}.{m}" for i in range(n_blocks) for m, _ in _BLOCK]
            + [m for m, _ in _TAIL])


@dataclass(frozen=True)
class MdlmShape:
    vocab_size: int
    d_model: int
    n_blocks: int
    cond_dim: int
    mlp_hidden: int

    def expected(self) -> dict[str, tuple[int, ...]]:
        """MDLM name -> shape of every parameter."""
        v, d, c, h = self.vocab_size, self.d_model, self.cond_dim, self.mlp_hidden
        shapes = {"vocab_embed.embedding": (v, d), "sigma_map.mlp.0.weight": (c, FREQUENCY_DIM),
                  "sigma_map.mlp.0.bias": (c,), "sigma_map.mlp.2.weight": (c, c), "sigma_map.mlp.2.bias": (c,),
                  "output_layer.norm_final.weight": (d,), "output_layer.linear.weight": (v, d),
                  "output_layer.linear.bias": (v,), "output_layer.adaLN_modulation.weight": (2 * d, c),
                  "output_layer.adaLN_modulation.bias": (2 * d,)}
        block = {"norm1.weight": (d,), "attn_qkv.weight": (3 * d, d), "attn_out.weight": (d, d),
                 "norm2.weight": (d,), "mlp.0.weight": (h, d), "mlp.0.bias": (h,), "mlp.2.weight": (d, h),
                 "mlp.2.bias": (d,), "adaLN_modulation.weight": (6 * d, c), "adaLN_modulation.bias": (6 * d,)}
        for i in range(self.n_blocks):
            shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
        return shapes


def infer_shape(state: dict[str, torch.Tensor], origin) -> MdlmShape:
    """Sizes from the tensors themselves (MDLM's hydra config is not always in the file)."""
    for key in ("vocab_embed.embedding", "sigma_map.mlp.0.weight", "blocks.0.mlp.0.weight"):
        if key not in state:
            raise ConversionError(f"{origin}: missing key {key}")
        if state[key].dim() != 2:
            raise ConversionError(f"{origin}: {key} has shape {tuple(state[key].shape)}, expected a matrix")
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    vocab, d_model = state["vocab_embed.embedding"].shape
    return MdlmShape(vocab_size=vocab, d_model=d_model, n_blocks=max(blocks) + 1,
                     cond_dim=state["sigma_map.mlp.0.weight"].shape[0],
                     mlp_hidden=state["blocks.0.mlp.0.weight"].shape[0])


def rotary_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """MDLM's ``Rotary.inv_freq`` for a head width and base (float32, its own expression)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _check_hparams(config: dict, origin) -> None:
    """Refuse MDLM settings this project cannot reproduce (when the checkpoint says what they were)."""
    backbone = config.get("backbone")
    if backbone not in (None, "dit"):
        raise ConversionError(f"{origin}: MDLM backbone {backbone!r}: only the DiT ('dit') can be imported")
    parameterization = config.get("parameterization")
    if parameterization not in (None, "subs"):
        raise ConversionError(f"{origin}: MDLM parameterization {parameterization!r}: this project implements "
                              f"SUBS only (absorbing mask, carry-over unmasking)")
    if config.get("time_conditioning"):
        raise ConversionError(
            f"{origin}: the MDLM model is time-conditioned (time_conditioning: true): MDLM conditions on "
            f"sigma(t) = -log(1 - (1 - eps) t), this project on t, so the network would see other inputs; "
            f"only models trained without time conditioning (MDLM's default) can be imported")


def _n_heads(source: MdlmSource, shape: MdlmShape, n_heads: int | None, rope_base: float) -> int:
    """Heads from the rotary buffer (head_dim = 2 * len(inv_freq)), the saved config or the caller;
    all that are known must agree, and the buffer must match ``rope_base``."""
    known: dict[str, int] = {}
    if n_heads is not None:
        known["--n-heads"] = int(n_heads)
    model_cfg = source.config.get("model") if isinstance(source.config.get("model"), dict) else {}
    if isinstance(model_cfg.get("n_heads"), int):
        known["the checkpoint's config (model.n_heads)"] = model_cfg["n_heads"]
    inv_freq = source.state.get(ROTARY_BUFFER)
    if inv_freq is not None:
        head_dim = 2 * inv_freq.numel()
        if inv_freq.dim() != 1 or shape.d_model % head_dim:
            raise ConversionError(f"{source.path}: shape mismatch for {ROTARY_BUFFER}: expected (head_dim / 2,) "
                                  f"dividing d_model {shape.d_model}, got {tuple(inv_freq.shape)}")
        known[ROTARY_BUFFER] = shape.d_model // head_dim
    if not known:
        raise ConversionError(f"{source.path}: the number of attention heads cannot be read from the file "
                              f"(no {ROTARY_BUFFER}, no config); pass --n-heads (MDLM small: 12)")
    if len(set(known.values())) > 1:
        raise ConversionError(f"{source.path}: the number of attention heads disagrees: "
                              + ", ".join(f"{k} says {v}" for k, v in known.items()))
    heads = next(iter(known.values()))
    if shape.d_model % heads:
        raise ConversionError(f"{source.path}: d_model {shape.d_model} is not divisible by {heads} heads")
    if inv_freq is not None:
        expected = rotary_inv_freq(shape.d_model // heads, rope_base)
        if not torch.allclose(inv_freq.float(), expected, rtol=4 * 2**-24, atol=0):
            raise ConversionError(f"{source.path}: {ROTARY_BUFFER} does not match rotary base {rope_base:g} "
                                  f"(pass the base MDLM used with --rope-base)")
    return heads


def map_backbone(tensors: dict[str, torch.Tensor], shape: MdlmShape) -> dict[str, torch.Tensor]:
    """MDLM parameter tensors (checked names and shapes) -> ours (``backbone.*``), float32."""
    d = shape.d_model
    out = {}
    for mdlm_name, ours in _HEAD + _TAIL:
        out[ours] = tensors[mdlm_name]
    for i in range(shape.n_blocks):
        for mdlm_name, ours in _BLOCK:
            value = tensors[f"blocks.{i}.{mdlm_name}"]
            if ours is None:   # 'b s (three h d)': rows [0, d) are q, [d, 2d) k, [2d, 3d) v
                for j, name in enumerate(_QKV):
                    out[f"backbone.blocks.{i}.{name}"] = value[j * d:(j + 1) * d]
            else:
                out[f"backbone.blocks.{i}.{ours}"] = value
    return {name: value.detach().to(torch.float32).contiguous() for name, value in out.items()}


def import_mdlm(path: str | os.PathLike, *, weights: str = "auto", scheduler: str = "lomdm",
                n_heads: int | None = None, rope_base: float | None = None, tokenizer: str | None = None,
                tokenizer_vocab_size: int | None = None, base_config: Config | None = None,
                seed: int = 0) -> PortableModel:
    """An MDLM checkpoint as this project's model (see the module docstring).

    ``weights``: ``ema`` (the Lightning checkpoint's shadow_params), ``raw`` or ``auto`` (EMA when
    the file has one). ``tokenizer_vocab_size``: the tokenizer's size without the mask; when given,
    MDLM's embedding must have exactly one more row (its appended mask token). ``base_config``:
    the training config to embed (data, optimizer...); its model, diffusion.scheduler and
    data.tokenizer are replaced by the imported model's.
    """
    with tqdm(total=3, desc="mdlm import", unit="phase", leave=False) as bar:
        return _import(path, bar, weights=weights, scheduler=scheduler, n_heads=n_heads, rope_base=rope_base,
                       tokenizer=tokenizer, tokenizer_vocab_size=tokenizer_vocab_size, base_config=base_config,
                       seed=seed)


def _import(path, bar, *, weights, scheduler, n_heads, rope_base, tokenizer, tokenizer_vocab_size, base_config,
            seed) -> PortableModel:
    source = read_mdlm_file(path)
    origin = source.path
    bar.update()
    _check_hparams(source.config, origin)
    shape = infer_shape(source.state, origin)
    expected = shape.expected()
    params = {k: v for k, v in source.state.items() if k != ROTARY_BUFFER}
    check_tensors(params, expected, origin)
    cfg = copy.deepcopy(base_config) if base_config is not None else Config()
    rope = float(rope_base) if rope_base is not None else cfg.model.rope_base
    heads = _n_heads(source, shape, n_heads, rope)
    if weights == "auto":
        weights = "ema" if source.shadow is not None else "raw"
    if weights == "ema":
        if source.shadow is None:
            raise ConversionError(f"{origin}: holds no EMA (only a Lightning .ckpt of a run with training.ema > 0 "
                                  f"does); use --weights raw")
        names = mdlm_parameter_names(shape.n_blocks)
        if len(source.shadow) != len(names):
            raise ConversionError(f"{origin}: ema.shadow_params has {len(source.shadow)} tensors, an MDLM DiT with "
                                  f"{shape.n_blocks} blocks has {len(names)} parameters")
        chosen = dict(zip(names, source.shadow))
        for index, name in enumerate(names):
            if tuple(chosen[name].shape) != expected[name]:
                raise ConversionError(f"{origin}: shape mismatch for ema.shadow_params[{index}] ({name}): expected "
                                      f"{expected[name]}, got {tuple(chosen[name].shape)}")
    else:
        chosen = params
    if tokenizer_vocab_size is not None and shape.vocab_size != tokenizer_vocab_size + 1:
        raise ConversionError(
            f"{origin}: the embedding has {shape.vocab_size} rows, tokenizer {tokenizer} has {tokenizer_vocab_size} "
            f"tokens + 1 mask = {tokenizer_vocab_size + 1} expected. This project's mask token is the last id; an "
            f"MDLM model whose mask is a tokenizer token (e.g. [MASK] of bert-base-uncased for LM1B) cannot be "
            f"imported")
    if shape.mlp_hidden % shape.d_model:
        raise ConversionError(f"{origin}: MLP width {shape.mlp_hidden} is not a multiple of d_model {shape.d_model}")
    bar.update()
    mdlm_model = source.config.get("model") if isinstance(source.config.get("model"), dict) else {}
    m = cfg.model
    m.n_layers, m.d_model, m.n_heads, m.cond_dim = shape.n_blocks, shape.d_model, heads, shape.cond_dim
    m.mlp_ratio, m.time_conditioning, m.rope_base = shape.mlp_hidden // shape.d_model, False, rope
    if isinstance(mdlm_model.get("dropout"), (int, float)):
        m.dropout = float(mdlm_model["dropout"])
    cfg.diffusion.scheduler = scheduler
    if tokenizer is not None:
        cfg.data.tokenizer = tokenizer
    try:
        cfg.validate()
        ours = fresh_model_tensors(cfg, shape.vocab_size, seed)
    except (ConfigError, ValueError) as err:
        raise ConversionError(f"{origin}: the imported model is not a valid configuration here: {err}") from None
    mapped = map_backbone(chosen, shape)
    unmapped = [name for name in ours if name.startswith("backbone.") and name not in mapped]
    if unmapped:   # a parameter of our DiT that MDLM's does not determine
        raise ConversionError(f"{origin}: no MDLM tensor maps to {unmapped[0]}")
    ours.update(mapped)
    check_tensors(ours, expected_shapes(cfg, shape.vocab_size), origin)
    bar.update()
    return PortableModel(tensors=ours, config=cfg, vocab_size=shape.vocab_size, tokenizer=tokenizer,
                         weights=weights, step=0,
                         source={"format": f"mdlm-{source.kind}", "path": str(origin), "mdlm_step": source.step,
                                 "heads": "fresh (seed %d)" % seed if scheduler == "lomdm" else "none"})
