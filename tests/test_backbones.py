"""Backbone registry, descriptor models, pooling layers and the IBN-a ResNet-50."""

import pytest
import timm
import torch
import torch.nn.functional as F

from core.models.backbones import DescriptorModel, build_backbone, list_backbones
from core.models.ibn import IBN, resnet50_ibn_a
from core.models.layers import GeM, TokenPool, gem

FEATURE_DIMS = {
    "resnet18": 512, "resnet50": 2048, "resnet152": 2048, "r50_ibn_a": 2048,
    "vit_ti16": 192, "vit_s16": 384, "vit_b16": 768, "tiny_cnn": 96, "tiny_vit": 64,
}


# ---- layers ---------------------------------------------------------------------------------

def test_gem_matches_brute_force() -> None:
    x = torch.rand(2, 3, 4, 5) + 0.1
    got = GeM(p=3.0)(x)
    want = torch.tensor(
        [[(x[b, c] ** 3).mean().item() ** (1 / 3) for c in range(3)] for b in range(2)]
    )
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gem(x, 1.0), x.mean(dim=(2, 3)), atol=1e-6)  # p=1: average pooling
    assert torch.allclose(gem(x, 200.0), x.amax(dim=(2, 3)), rtol=0.02)  # large p: ~max pooling


def test_gem_grid_pools_each_cell_in_row_major_order() -> None:
    x = torch.rand(2, 3, 4, 6) + 0.1
    got = GeM(p=3.0, grid=2)(x)
    assert got.shape == (2, 3 * 4)
    cells = [x[:, :, :2, :3], x[:, :, :2, 3:], x[:, :, 2:, :3], x[:, :, 2:, 3:]]  # top-left .. bottom-right
    want = torch.cat([gem(c, 3.0) for c in cells], dim=1)
    assert torch.allclose(got, want, atol=1e-6)


def test_grid_pool_sizes_the_descriptor() -> None:
    model = build_backbone("tiny_cnn", pool="gem_grid2").eval()
    flat = build_backbone("tiny_cnn").eval()
    assert model.dim == 4 * flat.dim and model(torch.randn(1, 3, 64, 64)).shape == (1, model.dim)
    assert build_backbone("tiny_cnn", pool="gem_grid2", dim=8).proj.in_features == 4 * flat.dim


def test_gem_clamps_negative_input_to_eps() -> None:
    x = torch.full((1, 1, 2, 2), -5.0)
    assert torch.allclose(gem(x, 3.0, eps=1e-3), torch.tensor([[1e-3]]), rtol=1e-4)
    with pytest.raises(ValueError, match="B x C x H x W"):
        gem(torch.rand(2, 3), 3.0)


def test_gem_p_learnable_or_fixed() -> None:
    learn, fixed = GeM(learnable=True), GeM(learnable=False)
    assert [n for n, _ in learn.named_parameters()] == ["p"]
    assert list(fixed.parameters()) == [] and "p" in fixed.state_dict()
    learn(torch.rand(2, 3, 4, 4)).sum().backward()
    assert learn.p.grad is not None and learn.p.grad.abs().item() > 0


def test_token_pool_cls_and_mean_skip_prefix_tokens() -> None:
    x = torch.randn(2, 7, 4)
    assert torch.equal(TokenPool("cls", 1)(x), x[:, 0])
    assert torch.allclose(TokenPool("mean", 2)(x), x[:, 2:].sum(1) / 5)
    with pytest.raises(ValueError, match="cls"):
        TokenPool("cls", 0)


# ---- registry / descriptor models -----------------------------------------------------------

def test_registered_names() -> None:
    assert set(list_backbones()) == set(FEATURE_DIMS)
    assert list_backbones("vit_*") == ["vit_b16", "vit_s16", "vit_ti16"]


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
@pytest.mark.parametrize("dim", [None, 32])
def test_every_backbone_shape_and_config(name: str, dim: int | None) -> None:
    with torch.device("meta"):  # shapes only: no weights are allocated
        model = build_backbone(name, dim=dim)
        out = model(torch.empty(2, 3, 64, 48))
    assert isinstance(model, DescriptorModel) and model.name == name
    assert model.dim == (FEATURE_DIMS[name] if dim is None else dim)
    assert out.shape == (2, model.dim)
    assert len(model.mean) == len(model.std) == 3
    with torch.device("meta"):
        assert build_backbone(**model.config()).config() == model.config()


def test_tiny_cnn_descriptor_is_trunk_gem_proj_l2() -> None:
    model = build_backbone("tiny_cnn", dim=16).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        fmap = model.trunk.forward_features(x)
        pooled = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        want = F.normalize(pooled @ model.proj.weight.T + model.proj.bias, dim=1)
    assert got.shape == (4, 16)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(4), atol=1e-5)


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = build_backbone("tiny_cnn"), build_backbone("tiny_cnn")
    assert torch.equal(torch.rand(3), expected_next)
    c = build_backbone("tiny_cnn", seed=1)
    w = "trunk.conv1.0.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_tiny_vit_pools_and_any_input_size() -> None:
    cls_model = build_backbone("tiny_vit").eval()
    mean_model = build_backbone("tiny_vit", pool="mean").eval()
    x = torch.randn(2, 3, 48, 80)  # not the nominal 160x160: position embedding is resampled
    with torch.no_grad():
        tokens = cls_model.trunk.forward_features(x)
        assert tokens.shape == (2, 1 + 3 * 5, 64)
        assert torch.allclose(cls_model(x), F.normalize(tokens[:, 0], dim=1), atol=1e-6)
        assert torch.allclose(mean_model(x), F.normalize(tokens[:, 1:].mean(1), dim=1), atol=1e-6)


def test_vit_ti16_runs_at_small_and_odd_scales() -> None:
    model = build_backbone("vit_ti16", dim=8, img_size=64).eval()
    assert model.trunk.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    with torch.no_grad():
        for h, w in [(32, 32), (48, 80)]:
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 8) and torch.allclose(out.norm(), torch.tensor(1.0), atol=1e-5)


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*resnet50"):
        build_backbone("nope")
    with pytest.raises(ValueError, match="pool 'cls' does not fit backbone 'tiny_cnn'"):
        build_backbone("tiny_cnn", pool="cls")
    with pytest.raises(ValueError, match="dim"):
        build_backbone("tiny_cnn", dim=0)


# ---- IBN-a ----------------------------------------------------------------------------------

def test_ibn_block_is_instance_norm_on_first_half_batch_norm_on_rest() -> None:
    block = IBN(8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
        block.BN.running_mean.copy_(torch.randn(4))
        block.BN.running_var.copy_(torch.rand(4) + 0.5)
    x = torch.randn(2, 8, 5, 5)
    a, b = x[:, :4], x[:, 4:]
    var = a.var((2, 3), unbiased=False, keepdim=True)
    ia = (a - a.mean((2, 3), keepdim=True)) / torch.sqrt(var + 1e-5)
    ia = ia * block.IN.weight[None, :, None, None] + block.IN.bias[None, :, None, None]
    bn_ = block.BN
    bn = F.batch_norm(b, bn_.running_mean, bn_.running_var, bn_.weight, bn_.bias)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.cat([ia, bn], 1), atol=1e-5)


def test_r50_ibn_a_published_architecture() -> None:
    with torch.device("meta"):
        ibn = resnet50_ibn_a(num_classes=1000)
        plain = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    n_params = sum(p.numel() for p in ibn.parameters())
    assert n_params == 25_557_032 == sum(p.numel() for p in plain.parameters())
    ibn_modules = {name: m for name, m in ibn.named_modules() if isinstance(m, IBN)}
    assert len(ibn_modules) == 13
    assert all(name.endswith(".bn1") for name in ibn_modules)
    assert not any(name.startswith("layer4") for name in ibn_modules)
    for layer, n_blocks, half in [("layer1", 3, 32), ("layer2", 4, 64), ("layer3", 6, 128)]:
        mods = [m for name, m in ibn_modules.items() if name.startswith(layer + ".")]
        assert len(mods) == n_blocks
        assert all(m.IN.num_features == half and m.BN.num_features == half for m in mods)


def test_r50_ibn_a_descriptor_forward() -> None:
    model = build_backbone("r50_ibn_a").eval()
    assert model.trunk.num_features == 2048
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
