"""Tests of the DiT backbone and the scheduler heads against computations written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lomdm_dist.config import ConfigError, DiffusionConfig, ModelConfig
from lomdm_dist.model import DiTBlock, LoMDM, apply_rotary, build_model, rotary_cos_sin

VOCAB = 37
SMALL = ModelConfig(n_layers=2, d_model=32, n_heads=4, cond_dim=16, mlp_ratio=4, dropout=0.0,
                    head_mlp_hidden=24)


def small_model(seed: int = 0, scheduler: str = "lomdm", **overrides) -> LoMDM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**SMALL.__dict__, **overrides})
    return build_model(cfg, DiffusionConfig(scheduler=scheduler), VOCAB)


def randomise_zero_init(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised layers (adaLN modulations, output and head read-out) random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modulation" in name or name.startswith("backbone.final.linear") or ".out." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- independent references -------------------------------------------------------------------

def complex_rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """x (B, L, H, D) -> rotated, as the complex number x_j + i x_{j+D/2} times e^{i p theta_j}."""
    d = x.shape[-1]
    half = d // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    theta = torch.tensor([base ** (-2.0 * j / d) for j in range(half)], dtype=torch.float64)
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    rot = torch.polar(torch.ones(x.shape[1], half, dtype=torch.float64), pos[:, None] * theta[None])
    out = z * rot[None, :, None, :]
    return torch.cat((out.real, out.imag), dim=-1)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def block_ref(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, n_heads: int, base: float) -> torch.Tensor:
    """One DiT block written out in float64 with an explicit softmax(q k^T / sqrt(d))."""
    p = {k: v.double() for k, v in block.state_dict().items()}
    x, c = x.double(), c.double()
    b, s, d = x.shape
    hd = d // n_heads
    mod = c @ p["modulation.weight"].T + p["modulation.bias"]
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = [m[:, None, :] for m in mod.split(d, dim=-1)]
    a = layer_norm_ref(x, p["norm1.weight"]) * (1 + sc_a) + sh_a
    q = (a @ p["attn.q_proj.weight"].T).reshape(b, s, n_heads, hd)
    k = (a @ p["attn.k_proj.weight"].T).reshape(b, s, n_heads, hd)
    v = (a @ p["attn.v_proj.weight"].T).reshape(b, s, n_heads, hd)
    q, k = complex_rotary(q, base), complex_rotary(k, base)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d)
    x = x + g_a * (attn @ p["attn.o_proj.weight"].T)
    m = layer_norm_ref(x, p["norm2.weight"]) * (1 + sc_m) + sh_m
    hidden = gelu_tanh_ref(m @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
    return x + g_m * (hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"])


def dit_param_count(vocab: int, d: int, layers: int, cond: int, ratio: int, freq: int = 256) -> int:
    """Parameters of the DDiT from its architecture formula."""
    embed = vocab * d
    sigma_map = (freq * cond + cond) + (cond * cond + cond)
    attn = 4 * d * d
    mlp = (d * ratio * d + ratio * d) + (ratio * d * d + d)
    block = attn + mlp + 2 * d + (cond * 6 * d + 6 * d)
    final = d + (cond * 2 * d + 2 * d) + (d * vocab + vocab)
    return embed + sigma_map + layers * block + final


def head_param_count(d: int, cond: int, ratio: int, hidden: int) -> int:
    block = 4 * d * d + (d * ratio * d + ratio * d) + (ratio * d * d + d) + 2 * d + (cond * 6 * d + 6 * d)
    return block + d + (d * hidden + hidden) + hidden          # read-out Linear(hidden, 1) has no bias


# --- tests --------------------------------------------------------------------------------------

def test_fresh_model_is_uniform_and_gradients_reach_zero_init_layers():
    model = small_model()
    x = tokens(3, 10)
    c = model.backbone.conditioning(3)
    logits, h = model.backbone(x)
    assert logits.shape == (3, 10, VOCAB) and h.shape == (3, 10, SMALL.d_model)
    assert torch.equal(logits, torch.zeros_like(logits))
    g_phi, g_psi = model.phi(h, c), model.psi(h, c)
    assert g_phi.dtype == torch.float32 and g_phi.shape == (3, 10)
    assert torch.equal(g_phi, torch.zeros(3, 10)) and torch.equal(g_psi, torch.zeros(3, 10))
    # Blocks start as the identity: features equal the token embeddings.
    assert torch.equal(h, model.backbone.embed(x))

    # First-order gradients: the output projection from a logits loss, each block's gates from a
    # features loss, the head read-out from a head loss.
    target = tokens(3, 10, seed=5)
    F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).backward(retain_graph=True)
    assert model.backbone.final.linear.weight.grad.abs().sum() > 0
    assert model.backbone.final.linear.bias.grad.abs().sum() > 0
    model.zero_grad()
    h2 = model.backbone.features(x, model.backbone.conditioning(3))
    (h2 * torch.randn_like(h2)).sum().backward()
    for block in model.backbone.blocks:
        assert block.modulation.weight.grad.abs().sum() > 0
    model.zero_grad()
    (model.phi(h, c) * torch.randn(3, 10)).sum().backward()
    assert model.phi.out.weight.grad.abs().sum() > 0

    # After one SGD step on the output projection the final modulation gets gradient too.
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = lambda: F.cross_entropy(model.backbone(x)[0].reshape(-1, VOCAB), target.reshape(-1))
    loss().backward()
    opt.step()
    opt.zero_grad()
    loss().backward()
    assert model.backbone.final.modulation.weight.grad.abs().sum() > 0
    for block in model.backbone.blocks:
        assert block.modulation.weight.grad.abs().sum() > 0


def test_rotary_matches_complex_multiplication():
    x = torch.randn(2, 11, 3, 16, dtype=torch.float64)
    cos, sin = rotary_cos_sin(11, 16, 500.0)
    ours = apply_rotary(x, cos.double(), sin.double())
    # the tables are float32: angles p * theta (p <= 10, theta <= 1) carry (3 * 10 + 2) * 2^-24 radians of
    # rounding, which moves an output by that much times the length of its pair, <= sqrt(2) max|x|
    atol = (3 * 10 + 2) * 2**-24 * 2**0.5 * x.abs().max().item()
    torch.testing.assert_close(ours, complex_rotary(x, 500.0), atol=atol, rtol=0)
    with pytest.raises(ValueError, match="even head dimension"):
        rotary_cos_sin(4, 7, 10000.0)


def test_rotary_scores_depend_only_on_position_difference():
    length, d = 12, 8
    q = torch.randn(d, dtype=torch.float64)
    k = torch.randn(d, dtype=torch.float64)
    cos, sin = rotary_cos_sin(length, d, 10000.0)
    cos, sin = cos.double(), sin.double()
    rq = apply_rotary(q.expand(1, length, 1, d), cos, sin)[0, :, 0]
    rk = apply_rotary(k.expand(1, length, 1, d), cos, sin)[0, :, 0]
    scores = rq @ rk.T
    for m in range(length):
        for n in range(length):
            expected = scores[m - n, 0] if m >= n else scores[0, n - m]
            # float32 angles (p <= 11): a score moves by |q| |k| times their (3 * 11 + 2) * 2^-24 rounding, twice
            atol = 2 * (3 * 11 + 2) * 2**-24 * float(q.norm() * k.norm())
            assert torch.isclose(scores[m, n], expected, rtol=0, atol=atol), (m, n)
    # and the rotation is not trivial: different offsets give different scores
    assert not torch.isclose(scores[0, 0], scores[3, 0])


def test_block_matches_explicit_computation():
    model = small_model()
    randomise_zero_init(model)
    block = model.backbone.blocks[0].eval()
    x = torch.randn(2, 9, SMALL.d_model)
    c = torch.randn(2, SMALL.cond_dim)
    expected = block_ref(block, x, c, SMALL.n_heads, SMALL.rope_base)
    # float32 block against float64: reductions of d_model = 32 (norms, projections), 9 (attention), 4 * 32 (MLP):
    # (4 * 32 + 9 + 4 * 32) * 2^-24 = 1.6e-5 of the O(1) activations
    torch.testing.assert_close(block(x, c).double(), expected, atol=2e-5, rtol=1e-4)


def test_attention_is_bidirectional():
    model = small_model().eval()
    randomise_zero_init(model)
    x = tokens(1, 8)
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % VOCAB
    c = model.backbone.conditioning(1)
    h, h_changed = model.backbone.features(x, c), model.backbone.features(changed, c)
    assert (h[0, 0] - h_changed[0, 0]).abs().max() > 1e-4


def test_heads_read_detached_features():
    model = small_model()
    randomise_zero_init(model)
    x = tokens(2, 6)
    c = model.backbone.conditioning(2)
    h = model.backbone.features(x, c)
    (model.phi(h, c).square().sum() + model.psi(h, c).sum()).backward()
    for name, param in model.backbone.named_parameters():
        assert param.grad is None, name
    assert all(p.grad is not None for p in model.phi.parameters())


def test_output_logits_on_gathered_subset_equals_gathered_full_logits():
    model = small_model(time_conditioning=True)
    randomise_zero_init(model)
    b, length = 3, 7
    x = tokens(b, length)
    sigma = torch.tensor([0.1, 1.5, 3.0])
    c = model.backbone.conditioning(b, sigma)
    assert not torch.allclose(c[0], c[1])  # time conditioning makes rows differ
    h = model.backbone.features(x, c)
    full = model.backbone.output_logits(h, c)
    mask = torch.rand(b, length, generator=torch.Generator().manual_seed(3)) < 0.5
    sub = model.backbone.output_logits(h[mask], c[:, None].expand(b, length, -1)[mask])
    # other matmul shapes: a logit is a float32 norm over d_model = 32, modulated from cond_dim = 16, then a
    # length-32 dot product: (32 + 16 + 32) * 2^-24 of the logits' scale
    torch.testing.assert_close(sub, full[mask], atol=(32 + 16 + 32) * 2**-24 * full.abs().max().item(), rtol=0)
    torch.testing.assert_close(model.backbone(x, sigma)[0], full, atol=0, rtol=0)  # the same operations


def test_conditioning_without_time_is_constant_and_matches_sinusoid_mlp():
    model = small_model()
    emb = model.backbone.sigma_map
    c = model.backbone.conditioning(4, torch.rand(4))  # sigma is ignored without time conditioning
    lin1, lin2 = emb.mlp[0], emb.mlp[2]
    sinusoid = torch.cat((torch.ones(128), torch.zeros(128)))  # cos(0), sin(0)
    hidden = lin1.weight @ sinusoid + lin1.bias
    expected = F.silu(lin2.weight @ (hidden * torch.sigmoid(hidden)) + lin2.bias)
    for row in c:
        # float32 dot products of length 256 (the sinusoid) and cond_dim = 16: (256 + 16) * 2^-24 of O(1) values
        torch.testing.assert_close(row, expected, atol=(256 + 16) * 2**-24, rtol=(256 + 16) * 2**-24)


def test_bf16_autocast_close_to_fp32():
    model = small_model().eval()
    randomise_zero_init(model)
    x = tokens(2, 8)
    c = model.backbone.conditioning(2)
    logits32, h32 = model.backbone(x)
    g32 = model.phi(h32, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, h16 = model.backbone(x)
        g16 = model.phi(h16, model.backbone.conditioning(2))
    assert g16.dtype == torch.float32 and torch.isfinite(logits16).all()
    scale = logits32.abs().max()
    # bf16 keeps 2^-8 relative; about a dozen roundings (2 blocks of 5 matmul inputs, the output layer) add up
    # to 0.05 = 12.8 * 2^-8 of the scale
    assert (logits16.float() - logits32).abs().max() < 0.05 * scale
    assert (g16 - g32).abs().max() < 0.05 * g32.abs().max()


def test_heads_only_for_lomdm_and_mask_token():
    assert small_model(scheduler="mdlm").phi is None and small_model(scheduler="mdlm").psi is None
    model = small_model()
    assert model.phi is not None and model.psi is not None and model.phi is not model.psi
    assert model.mask_token_id == VOCAB - 1 and model.vocab_size == VOCAB


def test_deterministic_init_and_reinit():
    a, b = small_model(seed=7), small_model(seed=7)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(7)
    with torch.device("meta"):
        meta = build_model(ModelConfig(**SMALL.__dict__), DiffusionConfig(), VOCAB)
    meta.to_empty(device="cpu")
    meta.init_weights()
    for name, param in meta.named_parameters():
        assert torch.isfinite(param).all(), name
    # MDLM's embedding init: kaiming_uniform_(a=sqrt(5)) is uniform in +-1/sqrt(d_model).
    bound = 1 / math.sqrt(SMALL.d_model)
    embed = meta.backbone.embed.weight
    assert embed.abs().max() <= bound and embed.abs().max() > 0.9 * bound
    assert torch.equal(meta.backbone.final.linear.weight, torch.zeros_like(meta.backbone.final.linear.weight))


def test_parameter_count_mdlm_small():
    cfg = ModelConfig(n_layers=12, d_model=768, n_heads=12, cond_dim=128, mlp_ratio=4)
    with torch.device("meta"):
        model = build_model(cfg, DiffusionConfig(), 50258)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    head = sum(p.numel() for p in model.phi.parameters())
    assert backbone == dit_param_count(50258, 768, 12, 128, 4)
    assert head == head_param_count(768, 128, 4, 768)
    assert 165e6 < backbone < 175e6
    assert 7e6 < head < 9e6
    assert sum(p.numel() for p in model.psi.parameters()) == head


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="model.d_model"):
        ModelConfig(d_model=30, n_heads=4).validate()
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(SMALL, DiffusionConfig(), 1)
    model = small_model(time_conditioning=True)
    with pytest.raises(ValueError, match="time_conditioning"):
        model.backbone.conditioning(2)
    with pytest.raises(ValueError, match="tokens"):
        model.backbone.features(torch.zeros(2, 3), model.backbone.conditioning(2, torch.zeros(2)))
    with pytest.raises(ValueError, match="c must have shape"):
        model.backbone.features(tokens(2, 3), torch.zeros(3, SMALL.cond_dim))
