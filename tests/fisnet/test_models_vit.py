"""The ViT backbone (fisnet.models.vit) under LRP and ISNet training.

Oracle (written here, independent of the trace and of the model's forward): the ViT's forward
re-implemented functionally from the module's weights, in which the attention weights A are
detached ("cp") or the gradients reaching q, k, v are scaled by 1/4, 1/4, 1/2 ("attnlrp"),
GELU's gate φ(z)/z is detached and LayerNorm's σ is detached. As ε → 0 with Zb off the heatmap
must equal gradient × input of that function.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fisnet
from fisnet import models
from fisnet.loss import ISNetLoss
from fisnet.models.vit import VisionTransformer

DT = torch.float64


def tiny_vit(**kw):
    cfg = dict(image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3,
               in_channels=3)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _ln(x, ln):
    x = x - x.mean(-1, keepdim=True)
    sigma = torch.sqrt(x.square().mean(-1, keepdim=True) + ln.eps).detach()
    return x / sigma * ln.weight + ln.bias


def _gelu(z):
    gate = (F.gelu(z) / z).detach()
    return z * gate


def _attention(x, mha, rule):
    B, N, E = x.shape
    H = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, E // H).transpose(1, 2) for t in (q, k, v))
    if rule == "attnlrp" and q.requires_grad:
        q.register_hook(lambda g: g / 4)
        k.register_hook(lambda g: g / 4)
        v.register_hook(lambda g: g / 2)
    a = torch.softmax(q @ k.transpose(-2, -1) / (E // H) ** 0.5, dim=-1)
    if rule == "cp":
        a = a.detach()
    o = (a @ v).transpose(1, 2).reshape(B, N, E)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)


def oracle_forward(m, x, rule, *, cls=True, pos=True, taps=None):
    """The ViT's forward, written from its weights, with A / gate / σ detached as the rules say."""
    if isinstance(m.conv_proj, torch.nn.Conv2d):
        t = F.conv2d(x, m.conv_proj.weight, m.conv_proj.bias, stride=m.patch_size)
    else:  # conv stem (torchvision's conv_stem_configs): Conv → BatchNorm (eval: affine) → ReLU, then 1x1
        t = x
        for name, layer in m.conv_proj.named_children():
            if name == "conv_last":
                t = F.conv2d(t, layer.weight, layer.bias)
                continue
            conv, bn = layer[0], layer[1]
            t = F.conv2d(t, conv.weight, None, stride=conv.stride, padding=conv.padding)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            t = (t - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
            t = torch.relu(t)
    t = t.flatten(2).transpose(1, 2)
    c = m.class_token.expand(x.shape[0], -1, -1)
    t = torch.cat([c if cls else torch.zeros_like(c), t], 1)
    if pos:
        t = t + m.encoder.pos_embedding
    if taps is not None:
        taps.append(t)  # the embedding: patch tokens with their position embedding
    for blk in m.encoder.layers:
        y = t + _attention(_ln(t, blk.ln_1), blk.self_attention, rule)
        z = _ln(y, blk.ln_2)
        z = F.linear(_gelu(F.linear(z, blk.mlp[0].weight, blk.mlp[0].bias)), blk.mlp[3].weight, blk.mlp[3].bias)
        t = y + z
        if taps is not None:
            taps.append(t)
    t = _ln(t, m.encoder.ln)
    return F.linear(t[:, 0], m.heads.head.weight, m.heads.head.bias)


def _random_params(m, seed):
    """Non-trivial values for every parameter (class token, LayerNorm affine, biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def test_builds_and_names():
    m = models.build("vit_tiny", num_classes=5)
    keys = set(m.state_dict())
    for k in ("conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding",
              "encoder.layers.encoder_layer_0.ln_1.weight",
              "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
              "encoder.layers.encoder_layer_0.self_attention.out_proj.bias",
              "encoder.layers.encoder_layer_11.mlp.0.weight", "encoder.layers.encoder_layer_11.mlp.3.bias",
              "encoder.layers.encoder_layer_11.ln_2.bias", "encoder.ln.weight", "heads.head.weight"):
        assert k in keys, k
    assert m.encoder.pos_embedding.shape == (1, 197, 192)
    assert not any(".grid" in k for k in keys)  # the grid modules hold no state: torchvision dicts load
    # torchvision ViT-B/16 has 86,567,656 parameters; the same layout here must count the same
    b16 = VisionTransformer(224, 16, 12, 12, 768, 3072, num_classes=1000)
    assert sum(p.numel() for p in b16.parameters()) == 86_567_656
    s = models.build("vit_small")
    assert s.encoder.layers.encoder_layer_0.self_attention.num_heads == 6 and s.hidden_dim == 384
    d = models.build("vit_digits", num_classes=10)
    assert d(torch.rand(2, 1, 36, 36)).shape == (2, 10)
    assert "vit_digits" in models.names() and "vit_tiny" in models.names()
    # the demo's 36 px digits through vit_tiny's 16 px patches: a 2x2 grid, interpolated position embedding
    t = models.build("vit_tiny", in_channels=1).eval()
    assert t(torch.rand(1, 1, 36, 36)).shape == (1, 10)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(30, 4, 1, 2, 8, 16)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(8, 2, 1, 3, 8, 16)
    m = tiny_vit()
    with pytest.raises(ValueError, match="smaller than one"):
        m(torch.rand(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(torch.rand(3, 8, 8))


def test_other_input_size_interpolates_pos_embedding(seed):
    torch.manual_seed(seed)
    m = tiny_vit().to(DT).eval()
    y = m(torch.rand(2, 3, 12, 12, dtype=DT))  # 6x6 grid, configured 4x4
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    r = fisnet.explain(m, torch.rand(2, 3, 12, 12, dtype=DT), 0)
    assert r.shape == (2, 1, 3, 12, 12) and torch.isfinite(r).all()


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
def test_explain_finite_with_zb(rule, seed):
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(), seed).eval()
    x = torch.rand(2, 3, 8, 8)
    r = fisnet.explain(m, x, torch.tensor([0, 2]), rules={"attention": rule})
    assert r.shape == (2, 1, 3, 8, 8) and torch.isfinite(r).all() and float(r.abs().sum()) > 0


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
def test_equals_oracle_eps_to_zero(rule, seed):
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(), seed).to(DT).eval()
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    target = torch.tensor([0, 1, 2])
    r = fisnet.explain(m, x, target, eps=0.0, zb=False, rules={"attention": rule})[:, 0]
    xg = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(oracle_forward(m, xg, rule).gather(1, target[:, None]).sum(), xg)[0] * x
    torch.testing.assert_close(oracle_forward(m, x, rule), m(x), rtol=1e-10, atol=1e-12)  # same function
    torch.testing.assert_close(r, expected, rtol=1e-7, atol=1e-10)
    xg = x.clone().requires_grad_(True)  # and not the plain gradient × input
    plain = torch.autograd.grad(m(xg).gather(1, target[:, None]).sum(), xg)[0] * x
    assert not torch.allclose(plain, expected, rtol=1e-4)


def test_cp_conserves_without_biases(seed):
    """cp with every bias, the class token and the position embedding zero (LayerNorm β too):
    Σ R_input equals the logit as ε → 0."""
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(), seed).to(DT).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or name in ("class_token", "encoder.pos_embedding"):
                p.zero_()
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    r = fisnet.explain(m, x, 1, eps=1e-12, zb=False)
    torch.testing.assert_close(r.sum((1, 2, 3, 4)), m(x)[:, 1], rtol=1e-7, atol=1e-10)


def test_lds_default_maps_on_the_patch_grid(seed):
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(num_layers=3), seed).eval()
    assert m.lds_layers == ("encoder.grid", "encoder.layers.encoder_layer_0.grid",
                            "encoder.layers.encoder_layer_1.grid")
    assert models.default_lds_layers(m) == m.lds_layers
    x = torch.rand(2, 3, 8, 8)
    maps = fisnet.ISNet(m, "selective", lds_layers="default").eval()(x, heatmaps=True).heatmaps
    assert maps["input"].shape == (2, 1, 3, 8, 8)
    for name in m.lds_layers:  # (B, M, E, h, w): E as channels on the 4x4 patch grid
        assert maps[name].shape == (2, 1, 8, 4, 4)
        assert torch.isfinite(maps[name]).all() and float(maps[name].abs().sum()) > 0
    # the map at a grid is the relevance of those patch tokens: with Zb off and ε → 0 (cp) it is
    # their gradient × activation under the oracle, on the grid — at the embedding (patch tokens
    # plus their position embedding: the position embedding's relevance is in this map) and at
    # every block's output
    m64, x64 = m.to(DT), x.to(DT)
    got = fisnet.explain(m64, x64, 0, eps=0.0, zb=False, layers=list(m.lds_layers))
    taps = []
    y = oracle_forward(m64, x64, "cp", taps=taps)[:, 0].sum()
    assert len(taps) == 1 + 3  # embedding, then each block
    grads = torch.autograd.grad(y, taps[:3])
    for name, t, g in zip(m.lds_layers, taps[:3], grads):
        expected = (g * t)[:, 1:].transpose(1, 2).reshape(2, 8, 4, 4)  # (B, 1 + 16, 8) → grid
        torch.testing.assert_close(got[name][:, 0], expected, rtol=1e-7, atol=1e-10)
    # the embedding map holds the input map plus what the position embedding absorbs: bias-free
    # conv_proj, so the patch part is exactly the pixels' relevance
    with torch.no_grad():
        m64.conv_proj.bias.zero_()
    got = fisnet.explain(m64, x64, 0, eps=0.0, zb=False, layers=["encoder.grid"])
    taps = []
    y = oracle_forward(m64, x64, "cp", taps=taps)[:, 0].sum()
    g0 = torch.autograd.grad(y, taps[0])[0][:, 1:]
    pos_part = (g0 * m64.encoder.pos_embedding[:, 1:]).sum((1, 2))
    torch.testing.assert_close(got["encoder.grid"].sum((1, 2, 3, 4)),
                               got["input"].sum((1, 2, 3, 4)) + pos_part, rtol=1e-7, atol=1e-10)
    m.float()
    # ISNetLoss takes these maps with 1-channel image masks
    crit = ISNetLoss(P=0.5, cuts=(1.0, 10.0))
    out = fisnet.ISNet(m, "selective", lds_layers="default").train()(x, torch.tensor([0, 1]))
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    loss = crit(out, torch.tensor([0, 1]), masks)
    assert torch.isfinite(loss)
    loss.backward()
    assert float(m.conv_proj.weight.grad.abs().sum()) > 0


def test_last_block_patch_relevance_is_zero(seed):
    """Why the last block is not a default LDS layer: only its class token reaches the head."""
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(), seed).eval()
    last = "encoder.layers.encoder_layer_1.grid"
    out = fisnet.explain(m, torch.rand(2, 3, 8, 8), 0, layers=[last])
    assert float(out[last].abs().sum()) == 0.0


@pytest.mark.parametrize("variant", ["original", "selective", "stochastic", "dual"])
@pytest.mark.parametrize("lds", [False, True])
def test_every_variant_trains(variant, lds, seed):
    torch.manual_seed(seed)
    m = _random_params(tiny_vit(num_layers=2, dropout=0.1, attention_dropout=0.1), seed).train()
    net = fisnet.ISNet(m, variant, lds_layers="default" if lds else None).train()
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    out = net(x, labels)
    maps = out.heatmaps if isinstance(out.heatmaps, dict) else {"input": out.heatmaps}
    assert all(torch.isfinite(v).all() for v in maps.values())
    loss = ISNetLoss(P=0.7, cuts=(1.0, 10.0))(out, labels, masks)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    opt.zero_grad()
    loss.backward()
    for name in ("conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                 "encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.ln_1.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0, name
    opt.step()


STEM = ((4, 3, 2), (6, 3, 1))  # a 2-layer stem of total stride 2 = tiny_vit's patch size


def _stem_vit(seed):
    m = _random_params(tiny_vit(conv_stem_configs=STEM), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.conv_proj.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.2 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
    return m


def test_conv_stem_layout_and_checks():
    """torchvision's conv stem (conv_stem_configs): its state-dict keys, the same token grid, the
    strides checked against the patch size; vit_digits_stem builds and runs."""
    m = tiny_vit(conv_stem_configs=STEM)
    keys = set(m.state_dict())
    for k in ("conv_proj.conv_bn_relu_0.0.weight", "conv_proj.conv_bn_relu_0.1.running_var",
              "conv_proj.conv_bn_relu_1.1.bias", "conv_proj.conv_last.weight", "conv_proj.conv_last.bias"):
        assert k in keys, k
    assert "conv_proj.conv_bn_relu_0.0.bias" not in keys  # stem convs have no bias (BatchNorm follows)
    assert m.conv_proj.conv_bn_relu_1[0].padding == (1, 1) and m.conv_proj.conv_last.kernel_size == (1, 1)
    assert m(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="strides multiply to 4, not the patch size 2"):
        tiny_vit(conv_stem_configs=((4, 3, 2), (4, 3, 2)))
    d = models.build("vit_digits_stem", num_classes=10)
    assert "vit_digits_stem" in models.names() and d(torch.rand(2, 1, 36, 36)).shape == (2, 10)
    assert d.seq_length == 82 and d.lds_layers == models.build("vit_digits").lds_layers


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
def test_conv_stem_equals_oracle_eps_to_zero(rule, seed):
    """With a conv stem the trace still equals gradient × input of the oracle (the stem's ReLUs by the
    identity rule, its eval BatchNorms affine), and Zb at the stem's first conv gives finite maps."""
    torch.manual_seed(seed)
    m = _stem_vit(seed).to(DT).eval()
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    target = torch.tensor([0, 1, 2])
    torch.testing.assert_close(oracle_forward(m, x, rule), m(x), rtol=1e-10, atol=1e-12)
    r = fisnet.explain(m, x, target, eps=0.0, zb=False, rules={"attention": rule})[:, 0]
    xg = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(oracle_forward(m, xg, rule).gather(1, target[:, None]).sum(), xg)[0] * x
    torch.testing.assert_close(r, expected, rtol=1e-7, atol=1e-10)
    rz = fisnet.explain(m, x, target, rules={"attention": rule})
    assert torch.isfinite(rz).all() and float(rz.abs().sum()) > 0


def test_conv_stem_trains_with_lds(seed):
    """A Selective step with the default LDS layers through a train-mode conv stem (batch statistics)."""
    torch.manual_seed(seed)
    m = _stem_vit(seed).train()
    net = fisnet.ISNet(m, "selective", lds_layers="default").train()
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    out = net(x, labels)
    assert all(torch.isfinite(v).all() for v in out.heatmaps.values())
    ISNetLoss(P=0.7, cuts=(1.0, 10.0))(out, labels, masks).backward()
    for name in ("conv_proj.conv_bn_relu_0.0.weight", "conv_proj.conv_bn_relu_0.1.weight", "conv_proj.conv_last.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0, name
