"""Checkpoint conversion (``lomdm_dist.convert``, ``tools/convert_checkpoint.py``).

- A checkpoint written by two TP=2 training steps on two gloo ranks goes through the command line
  to consolidated safetensors and back to a sharded checkpoint, which two ranks load under FSDP
  dp_shard=2: every tensor is bitwise the TP=2 model's, and the validation NELBO is the same
  (up to the regrouping of float32 sums between layouts).
- MDLM checkpoints (a Lightning ``.ckpt`` with EMA shadow_params, plain safetensors without the
  ``backbone.`` prefix), built from a module with MDLM's names, structure and parameter order,
  convert into a model whose logits equal an independent float64 implementation of MDLM's forward
  pass (``MdlmReference`` below, written from MDLM's math).
- Wrong or truncated files are errors naming the file and what is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dist_utils import run_workers  # noqa: E402
from lomdm_dist.convert import (ConversionError, import_mdlm, load_consolidated_model, read_consolidated,  # noqa: E402
                                read_sharded, write_consolidated)
from lomdm_dist.convert.cli import main as convert_main  # noqa: E402
from lomdm_dist.model import build_model  # noqa: E402

# ----------------------------------------------------------------------------- MDLM reference
V, D, HEADS, COND, BLOCKS, L = 64, 32, 2, 24, 2, 16


class _Norm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Embedding(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab, dim))


class _Timestep(nn.Module):
    def __init__(self, cond):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, cond), nn.SiLU(), nn.Linear(cond, cond))


class _Rotary(nn.Module):
    def __init__(self, head_dim, base=10_000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim))


class _Block(nn.Module):
    def __init__(self, dim, cond):
        super().__init__()
        self.norm1 = _Norm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(0.0)
        self.norm2 = _Norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.dropout2 = nn.Dropout(0.0)
        self.adaLN_modulation = nn.Linear(cond, 6 * dim)


class _Final(nn.Module):
    def __init__(self, dim, vocab, cond):
        super().__init__()
        self.norm_final = _Norm(dim)
        self.linear = nn.Linear(dim, vocab)
        self.adaLN_modulation = nn.Linear(cond, 2 * dim)


class MdlmReference(nn.Module):
    """MDLM's DiT module tree (names, shapes and registration order, hence its EMA's parameter
    order) with a forward pass written from MDLM's math in float64 and plain tensor operations:
    its own LayerNorm-times-weight, 'b s (three h d)' qkv split, rotate-half rotary, explicit
    softmax attention, tanh GELU and (shift, scale, gate) adaLN."""

    def __init__(self, seed: int):
        super().__init__()
        self.vocab_embed = _Embedding(V, D)
        self.sigma_map = _Timestep(COND)
        self.rotary_emb = _Rotary(D // HEADS)
        self.blocks = nn.ModuleList(_Block(D, COND) for _ in range(BLOCKS))
        self.output_layer = _Final(D, V, COND)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                fan_in = p.shape[-1] if p.dim() == 2 else 1
                if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm_final" in name:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                elif "adaLN" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))

    @staticmethod
    def _layer_norm(x, weight):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * weight

    @staticmethod
    def _gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def _rotate(self, x, positions):
        head_dim = x.shape[-1]
        inv_freq = 1.0 / 10_000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = positions[:, None] * inv_freq[None]
        emb = torch.cat((angles, angles), dim=-1)                  # (L, head_dim)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        w = {k: v.double() for k, v in self.named_parameters()}
        b, s = indices.shape
        x = w["vocab_embed.embedding"][indices]
        half = 128
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
        t_freq = torch.cat((torch.cos(sigma.double()[:, None] * freqs), torch.sin(sigma.double()[:, None] * freqs)), -1)
        h = t_freq @ w["sigma_map.mlp.0.weight"].T + w["sigma_map.mlp.0.bias"]
        h = h * torch.sigmoid(h)
        c = h @ w["sigma_map.mlp.2.weight"].T + w["sigma_map.mlp.2.bias"]
        c = c * torch.sigmoid(c)
        positions = torch.arange(s, dtype=torch.float64)
        for i in range(BLOCKS):
            p = f"blocks.{i}."
            mod = (c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"])[:, None]
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
            y = self._layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_a) + shift_a
            qkv = (y @ w[p + "attn_qkv.weight"].T).view(b, s, 3, HEADS, D // HEADS)
            q, k, v = (qkv[:, :, j] for j in range(3))
            q, k = self._rotate(q, positions), self._rotate(k, positions)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
            attn = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v).reshape(b, s, D)
            x = x + gate_a * (attn @ w[p + "attn_out.weight"].T)
            y = self._layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_m) + shift_m
            y = self._gelu_tanh(y @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"])
            x = x + gate_m * (y @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
        shift, scale = (c @ w["output_layer.adaLN_modulation.weight"].T
                        + w["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, dim=-1)
        y = self._layer_norm(x, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
        return y @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


# Longest float32 reductions on the path to a logit: conditioning (256 sinusoid terms + 2 x COND),
# per block LayerNorm (D), qkv (D), scores (D / HEADS), softmax and values (2 L), out-projection
# (D), MLP (D + 4 D), adaLN (COND); final LayerNorm and projection (2 D). Worst case n * 2^-24 of
# the logits' size.
REDUCTIONS = 256 + 2 * COND + BLOCKS * (D + D + D // HEADS + 2 * L + D + 5 * D + COND) + 2 * D
REL_LOGITS = REDUCTIONS * 2**-24


def _tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, V - 1, (3, L), generator=gen)


def _our_logits(portable) -> torch.Tensor:
    model = build_model(portable.config.model, portable.config.diffusion, portable.vocab_size, seed=0)
    model.load_state_dict(portable.tensors)
    model.eval()
    with torch.no_grad():
        return model.backbone(_tokens())[0].double()


def _reference_logits(reference: MdlmReference) -> torch.Tensor:
    tokens = _tokens()
    with torch.no_grad():
        return reference(tokens, torch.zeros(tokens.shape[0]))


def _assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    bound = REL_LOGITS * ref.abs().max().item()
    assert err <= bound, f"max |logits - reference| = {err:.3g} > {bound:.3g}"


def _lightning_checkpoint(path: Path, raw: MdlmReference, ema: MdlmReference, **config) -> Path:
    hparams = argparse.Namespace(backbone="dit", parameterization="subs", time_conditioning=False,
                                 model={"n_heads": HEADS, "dropout": 0.1, "n_blocks": BLOCKS}, **config)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in raw.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 7,
                        "shadow_params": [p.detach().clone() for p in ema.parameters()]},
                "hyper_parameters": {"config": hparams}, "global_step": 7, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def mdlm_models():
    return MdlmReference(seed=1), MdlmReference(seed=2)


# ----------------------------------------------------------------------------------- MDLM tests
def test_mdlm_lightning_checkpoint_imports_its_ema_and_raw_weights(tmp_path, mdlm_models):
    raw, ema = mdlm_models
    ckpt = _lightning_checkpoint(tmp_path / "last.ckpt", raw, ema)
    imported = import_mdlm(ckpt, scheduler="lomdm")          # auto: the EMA
    assert imported.weights == "ema" and imported.config.model.n_heads == HEADS
    assert imported.config.model.dropout == 0.1 and imported.config.model.n_layers == BLOCKS
    assert any(name.startswith("phi.") for name in imported.tensors)
    _assert_logits_match(_our_logits(imported), _reference_logits(ema))
    imported_raw = import_mdlm(ckpt, weights="raw", scheduler="mdlm")
    assert not any(name.startswith(("phi.", "psi.")) for name in imported_raw.tensors)
    _assert_logits_match(_our_logits(imported_raw), _reference_logits(raw))


def test_mdlm_safetensors_without_prefix_converts_through_the_command_line(tmp_path, mdlm_models):
    raw, _ = mdlm_models
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(tmp_path / "mdlm.safetensors"))
    out = tmp_path / "imported"
    assert convert_main([str(tmp_path / "mdlm.safetensors"), str(out), "--from", "mdlm", "--scheduler", "mdlm",
                         "--tokenizer", "none"]) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["vocab_size"] == V and info["mask_token_id"] == V - 1 and info["weights"] == "raw"
    cfg, model, _ = load_consolidated_model(out)
    assert cfg.diffusion.scheduler == "mdlm" and model.phi is None
    with torch.no_grad():
        ours = model.backbone(_tokens())[0].double()
    _assert_logits_match(ours, _reference_logits(raw))


def test_wrong_or_truncated_mdlm_files_name_the_file_and_the_problem(tmp_path, mdlm_models):
    raw, ema = mdlm_models
    state = {k: v.contiguous() for k, v in raw.state_dict().items()}
    ckpt = _lightning_checkpoint(tmp_path / "good.ckpt", raw, ema)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ConversionError, match=f"{truncated}: not a readable PyTorch checkpoint"):
        import_mdlm(truncated)

    missing = dict(state)
    del missing["blocks.1.norm2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConversionError, match=r"missing\.safetensors: missing key blocks\.1\.norm2\.weight"):
        import_mdlm(tmp_path / "missing.safetensors")

    wrong = dict(state, **{"blocks.0.attn_out.weight": torch.zeros(D, D + 2)})
    torch.save({f"backbone.{k}": v for k, v in wrong.items()}, tmp_path / "wrong.pt")
    with pytest.raises(ConversionError, match=r"wrong\.pt: shape mismatch for blocks\.0\.attn_out\.weight: "
                                              r"expected \(32, 32\), got \(32, 34\)"):
        import_mdlm(tmp_path / "wrong.pt")

    no_rotary = {k: v for k, v in state.items() if k != "rotary_emb.inv_freq"}
    save_file(no_rotary, str(tmp_path / "norotary.safetensors"))
    with pytest.raises(ConversionError, match="pass --n-heads"):
        import_mdlm(tmp_path / "norotary.safetensors")
    assert import_mdlm(tmp_path / "norotary.safetensors", n_heads=HEADS).config.model.n_heads == HEADS
    with pytest.raises(ConversionError, match="number of attention heads disagrees"):
        import_mdlm(tmp_path / "good.ckpt", n_heads=4)

    short_ema = torch.load(ckpt, weights_only=False)
    short_ema["ema"]["shadow_params"] = short_ema["ema"]["shadow_params"][:-1]
    torch.save(short_ema, tmp_path / "short_ema.ckpt")
    with pytest.raises(ConversionError, match="ema.shadow_params has 29 tensors, an MDLM DiT with 2 blocks has 30"):
        import_mdlm(tmp_path / "short_ema.ckpt")

    timed = _lightning_checkpoint(tmp_path / "timed.ckpt", raw, ema)
    obj = torch.load(timed, weights_only=False)
    obj["hyper_parameters"]["config"].time_conditioning = True
    torch.save(obj, timed)
    with pytest.raises(ConversionError, match="time-conditioned"):
        import_mdlm(timed)

    with pytest.raises(ConversionError, match="64 rows, tokenizer gpt2 has 50257 tokens"):
        import_mdlm(ckpt, tokenizer="gpt2", tokenizer_vocab_size=50257)
    assert convert_main([str(truncated), str(tmp_path / "out"), "--from", "mdlm", "--tokenizer", "none"]) == 2


def test_truncated_or_mismatched_consolidated_files_are_errors(tmp_path, mdlm_models, capsys):
    raw, _ = mdlm_models
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(tmp_path / "mdlm.safetensors"))
    imported = import_mdlm(tmp_path / "mdlm.safetensors", weights="raw", scheduler="mdlm")
    good = tmp_path / "good"
    write_consolidated(imported, good)
    assert torch.equal(read_consolidated(good).tensors["backbone.embed.weight"],
                       imported.tensors["backbone.embed.weight"])

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((good / "config.json").read_bytes())
    data = (good / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ConversionError, match=f"{cut / 'model.safetensors'}: not a readable safetensors file"):
        read_consolidated(cut)
    assert convert_main([str(cut), str(tmp_path / "run")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    info = json.loads((good / "config.json").read_text())
    info["model"]["n_layers"] = 3
    (other / "config.json").write_text(json.dumps(info))
    (other / "model.safetensors").write_bytes(data)
    with pytest.raises(ConversionError, match=r"model\.safetensors: missing key backbone\.blocks\.2\."):
        read_consolidated(other)


# ------------------------------------------------------------------ sharded <-> consolidated
@pytest.mark.dist
def test_tp2_checkpoint_to_consolidated_and_back_loads_bitwise_under_fsdp(tmp_path):
    """Worker (``parallel_workers/conversion.py``): TP=2 trains two steps and saves; rank 0 runs the
    command line twice (sharded -> consolidated EMA, consolidated -> sharded); FSDP dp_shard=2
    loads the result. Reference numbers: the TP=2 model's full tensors and validation NELBO."""
    results = run_workers("conversion.py", 2, tmp_path / "out", str(tmp_path / "work"), timeout=300)
    tp2 = results[0]
    consolidated = read_consolidated(tmp_path / "work" / "consolidated")
    assert consolidated.weights == "ema" and consolidated.step == 2
    assert set(consolidated.tensors) == set(tp2["ema"])
    for name, value in tp2["ema"].items():
        assert torch.equal(consolidated.tensors[name], value), name
        assert torch.equal(tp2["fsdp_params"][name], value), name
    raw = read_sharded(tmp_path / "work" / "tp2", weights="raw")
    for name, value in tp2["params"].items():
        assert torch.equal(raw.tensors[name], value), name
    # A validation NELBO sums float32 rows of 16 token terms over a batch of 8 rows, with 61 logits
    # and length-32 dot products, regrouped by the layout (as in test_parallel_dist.py).
    rel = (8 + 16 + 61 + 32) * 2**-24
    assert tp2["fsdp_val"] == pytest.approx(tp2["tp2_val_ema"], rel=rel, abs=0)
    assert tp2["fsdp_loaded_step"] == 2 and tp2["fsdp_parts"] == ["ema", "model"]
