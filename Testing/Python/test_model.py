"""Tests of the MoME network (tiny CPU shapes: feature size 12, 64x32x32 windows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from MoMESegmentationLib.model import (
    ImageFeatures,
    MoME,
    MoMEConfig,
    SwinUNETRBackbone,
    create_model,
    get_config,
    list_models,
    switch_balance_loss,
    top_k_gates,
)

SIZE = (64, 32, 32)  # smallest SwinUNETR input: divisible by 32, bottleneck of 2 voxels
T = 384


def _model(**overrides) -> MoME:
    torch.manual_seed(0)
    return create_model("mome-12", patch_size=SIZE, **overrides)


@pytest.fixture(scope="module")
def model() -> MoME:
    return _model().eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 1, *SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def features(model, image) -> ImageFeatures:
    with torch.no_grad():
        return model.encode(image)


def _prompts(k: int, seed: int = 2, dim: int = T) -> torch.Tensor:
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))


# -- backbone --------------------------------------------------------------------------------
def test_backbone_decoder_shapes():
    net = SwinUNETRBackbone(feature_size=12).eval()
    with torch.no_grad():
        decoder, bottleneck = net.forward_features(torch.rand(1, 1, *SIZE))
    expected = [(12, 64, 32, 32), (12, 32, 16, 16), (24, 16, 8, 8), (48, 8, 4, 4), (96, 4, 2, 2)]
    assert [tuple(f.shape[1:]) for f in decoder] == expected
    assert tuple(bottleneck.shape) == (1, 192, 2, 1, 1)
    assert not hasattr(net, "out")


def test_backbone_drops_blocks_finer_than_needed():
    net = SwinUNETRBackbone(feature_size=12, finest_scale=2).eval()
    names = {n for n, _ in net.named_children()}
    assert {"encoder1", "encoder2", "decoder1", "decoder2"}.isdisjoint(names)
    assert {"encoder3", "decoder3", "decoder5", "encoder10"} <= names
    with torch.no_grad():
        decoder, _ = net.forward_features(torch.rand(1, 1, *SIZE))
    assert decoder[0] is None and decoder[1] is None
    assert tuple(decoder[2].shape) == (1, 24, 16, 8, 8)


# -- encode / decode -------------------------------------------------------------------------
def test_encode_keeps_experts_at_their_scales(features):
    assert [tuple(e.shape) for e in features.experts] == [
        (2, 16, 64 // 2**s, 32 // 2**s, 32 // 2**s) for s in range(5)
    ]
    assert tuple(features.global_feature.shape) == (2, 256)
    assert features.spatial_size == SIZE
    assert features.nbytes == sum(e.numel() * 4 for e in features.experts) + 2 * 256 * 4


@pytest.mark.parametrize("k", [1, 3, 40])
def test_output_shape_for_any_number_of_prompts(model, features, k):
    with torch.no_grad():
        shared = model.decode(features, _prompts(k))
        per_window = model.decode(features, _prompts(k).expand(2, k, T))
    assert shared.shape == (2, k, *SIZE)
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, per_window)


def test_forward_is_decode_of_encode(model, image):
    prompts = _prompts(3)
    with torch.no_grad():
        direct = model(image, prompts)
        staged = model.decode(model.encode(image), prompts)
    assert torch.equal(direct, staged)


def test_prompts_are_independent_and_matter(model, features):
    a, b = _prompts(1, seed=3), _prompts(1, seed=4)
    with torch.no_grad():
        out_a = model.decode(features, a)
        out_b = model.decode(features, b)
        out_ab = model.decode(features, torch.cat([a, b]))
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(out_ab[:, :1], out_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ab[:, 1:], out_b, rtol=1e-5, atol=1e-5)


def test_prompt_chunking_does_not_change_results(model, features):
    prompts = _prompts(5)
    with torch.no_grad():
        reference = model.decode(features, prompts)
        model.config.prompt_chunk = 2
        try:
            chunked = model.decode(features, prompts)
        finally:
            model.config.prompt_chunk = 8
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)


def test_cached_window_features_decode_like_the_batch(model, features):
    prompts = _prompts(2)
    cache = [f.detach().cpu().to(dtype=torch.float16) for f in features.split(1)]
    assert cache[0].nbytes * 2 == features[0].nbytes
    restored = ImageFeatures.cat([f.to(dtype=torch.float32) for f in cache])
    assert restored.batch_size == 2 and restored.spatial_size == features.spatial_size
    with torch.no_grad():
        single = model.decode(features[1], prompts)
        batched = model.decode(features, prompts)
        from_cache = model.decode(restored, prompts)
    torch.testing.assert_close(single[0], batched[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_cache, batched, rtol=1e-2, atol=1e-2)


def test_image_features_indexing():
    feats = ImageFeatures(
        [torch.arange(3.0).reshape(3, 1, 1, 1, 1)], torch.arange(6.0).reshape(3, 2), (2, 2, 2)
    )
    assert feats[-1].global_feature.tolist() == [[4.0, 5.0]]
    assert feats[[0, 2]].experts[0].flatten().tolist() == [0.0, 2.0]
    assert [len(p) for p in feats.split(2)] == [2, 1]
    assert torch.equal(ImageFeatures.cat(feats.split(2)).global_feature, feats.global_feature)
    with pytest.raises(IndexError):
        feats[3]
    with pytest.raises(ValueError, match="cannot concatenate"):
        ImageFeatures.cat([feats, ImageFeatures(feats.experts, feats.global_feature, (4, 4, 4))])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(1, 1, 32, 32, 32), "too small"),
        (torch.rand(1, 1, 64, 32, 40), "divisible by 32"),
        (torch.rand(1, 2, 64, 32, 32), r"\[B, 1, D, H, W\]"),
    ],
)
def test_encode_rejects_bad_images(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.encode(bad)


def test_decode_rejects_bad_prompt_embeddings(model, features):
    with pytest.raises(ValueError, match="prompt_embeddings"):
        model.decode(features, torch.randn(3, 512))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        model.decode(features, torch.randn(3, 2, T))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        model.decode(features, torch.randn(0, T))


# -- router ----------------------------------------------------------------------------------
def test_router_weights_sum_to_one_per_voxel_and_prompt(model, features):
    with torch.no_grad():
        logits, aux = model.decode(features, _prompts(4), return_aux=True)
    assert aux.weights.shape == (2, 4, 5, *SIZE)
    assert (aux.weights >= 0).all()
    torch.testing.assert_close(aux.weights.sum(dim=2), torch.ones(2, 4, *SIZE))
    torch.testing.assert_close(aux.usage, aux.weights.mean(dim=(3, 4, 5)))
    assert aux.balance_loss.ndim == 0 and 1.0 <= float(aux.balance_loss) <= 5.0
    # Gates vary across voxels (the router is per voxel, not per prompt).
    assert aux.weights[0, 0, 0].std() > 0


def test_top_k_keeps_at_most_k_experts():
    model = _model(top_k=2).eval()
    with torch.no_grad():
        _, aux = model(torch.rand(1, 1, *SIZE), _prompts(3), return_aux=True)
    nonzero = (aux.weights > 0).sum(dim=2)
    assert int(nonzero.max()) <= 2 and int(nonzero.min()) >= 1
    torch.testing.assert_close(aux.weights.sum(dim=2), torch.ones_like(nonzero, dtype=torch.float32))


def test_top_k_gates_exact_zeros_and_renormalisation():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    gates, probs, dispatch = top_k_gates(logits, 2, dim=1)
    assert gates[0, 0] == 0 and gates[0, 3] == 0
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(gates[0, 1:3], expected)
    assert dispatch.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))


def test_balance_loss_is_lowest_at_uniform_usage():
    e, n = 5, 1000
    uniform_logits = torch.zeros(1, 1, e, n)
    peaked_logits = torch.zeros(1, 1, e, n)
    peaked_logits[:, :, 0] = 6.0
    _, p_uni, d_uni = top_k_gates(uniform_logits, None, dim=2)
    _, p_peak, d_peak = top_k_gates(peaked_logits, None, dim=2)
    uniform = switch_balance_loss(p_uni, d_uni, dim=2)
    peaked = switch_balance_loss(p_peak, d_peak, dim=2)
    # Confident but balanced routing: each voxel picks one expert, experts used equally often.
    balanced_logits = torch.zeros(1, 1, e, n)
    balanced_logits[0, 0, torch.arange(n) % e, torch.arange(n)] = 6.0
    _, p_bal, d_bal = top_k_gates(balanced_logits, None, dim=2)
    balanced = switch_balance_loss(p_bal, d_bal, dim=2)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    assert peaked > 4.0 > uniform


# -- training --------------------------------------------------------------------------------
def test_gradients_reach_every_part():
    model = _model().train()
    logits, aux = model(torch.rand(1, 1, *SIZE), _prompts(3), return_aux=True)
    loss = F.binary_cross_entropy_with_logits(logits, (torch.rand_like(logits) > 0.5).float())
    (loss + 0.01 * aux.balance_loss).backward()
    for part in ("backbone", "experts", "global_pool", "text_to_vision", "router", "head_projection", "head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert grads, part
        assert all(g is not None for g in grads), f"{part} has parameters without gradient"
        assert any(g.abs().sum() > 0 for g in grads), f"{part} received zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains(name):
    torch.manual_seed(0)
    model = create_model(name, feature_size=12, patch_size=SIZE).train()
    k = 2
    prompts = torch.randn(k, model.config.text_dim)
    logits, aux = model(torch.rand(1, 1, *SIZE), prompts, return_aux=True)
    assert logits.shape == (1, k, *SIZE)
    (logits.float().mean() + aux.balance_loss).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(aux.balance_loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


# -- variants and config ---------------------------------------------------------------------
def test_list_models():
    assert list_models() == ["mome-12", "mome-24", "mome-48", "universal-model"]
    assert get_config("mome-24").feature_size == 24
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mome-7")
    with pytest.raises(ValueError, match="not_a_field"):
        create_model("mome-12", not_a_field=1)


def test_universal_model_layout_matches_published_module_shapes():
    model = create_model("universal-model")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["experts.0.0.weight"] == (48,)  # precls_conv.0: GroupNorm(16, 48)
    assert shapes["experts.0.2.weight"] == (8, 48, 1, 1, 1)  # precls_conv.2: Conv3d(48, 8, 1)
    assert shapes["global_pool.0.weight"] == (768,)  # GAP.0: GroupNorm(16, 768)
    assert shapes["global_pool.3.weight"] == (256, 768, 1, 1, 1)  # GAP.3: Conv3d(768, 256, 1)
    assert shapes["text_to_vision.weight"] == (256, 512)
    assert shapes["head.controller.weight"] == (153, 512, 1, 1, 1)
    assert model.experts[0][0].num_groups == 16 and model.global_pool[0].num_groups == 16
    assert not any(k.startswith(("router.", "head_projection.", "backbone.out.")) for k in shapes)


def test_single_expert_model_equals_universal_model_head():
    """Reference: the Universal Model's grouped-conv dynamic head on precls_conv(decoder output)."""
    torch.manual_seed(0)
    model = create_model("universal-model", feature_size=12, patch_size=SIZE).eval()
    image, prompts = torch.rand(1, 1, *SIZE), torch.randn(3, 512)
    with torch.no_grad():
        ours = model(image, prompts)
        decoder, bottleneck = model.backbone.forward_features(image)
        x_feat = model.global_pool(bottleneck)  # [1, 256, 1, 1, 1]
        task = torch.relu(model.text_to_vision(prompts))[..., None, None, None]
        params = model.head.controller(torch.cat([x_feat.repeat(3, 1, 1, 1, 1), task], 1)).flatten(1)
        head_in = model.experts[0](decoder[0]).repeat(3, 1, 1, 1, 1).reshape(1, -1, *SIZE)
        w1, w2, w3, b1, b2, b3 = torch.split(params, [64, 64, 8, 8, 8, 1], dim=1)
        x = F.relu(F.conv3d(head_in, w1.reshape(24, 8, 1, 1, 1), b1.reshape(24), groups=3))
        x = F.relu(F.conv3d(x, w2.reshape(24, 8, 1, 1, 1), b2.reshape(24), groups=3))
        reference = F.conv3d(x, w3.reshape(3, 8, 1, 1, 1), b3.reshape(3), groups=3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("feature_size", 16),
        ("patch_size", (96, 96, 80)),
        ("expert_scales", (0, 0)),
        ("expert_scales", (5,)),
        ("top_k", 6),
        ("head_layers", 0),
        ("swin_downsample", "pooling"),
        ("dropout", 1.5),
        ("router_scale", 7),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoMEConfig(**{field: value})


def test_head_projection_off_needs_equal_widths():
    with pytest.raises(ValueError, match="head_projection"):
        MoMEConfig(head_projection=False, expert_channels=16, head_channels=8)


def test_config_dict_round_trip():
    config = MoMEConfig(feature_size=24, expert_scales=(1, 2), top_k=1)
    data = config.to_dict()
    assert MoMEConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="bogus"):
        MoMEConfig.from_dict({**data, "bogus": 1})


def test_model_package_never_imports_the_importers():
    """The network (legacy patch merging included) is self-contained; importers depend on it, not back."""
    import ast
    from pathlib import Path

    import MoMESegmentationLib.model as package
    from MoMESegmentationLib.importers import legacy_swin
    from MoMESegmentationLib.model import legacy_merging

    offenders = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if "importers" in n.split(".")]
    assert not offenders, f"model/ imports the importers: {offenders}"
    # The importers' path still names the same objects.
    assert legacy_swin.LegacyPatchMerging is legacy_merging.LegacyPatchMerging
    assert legacy_swin.use_legacy_patch_merging is legacy_merging.use_legacy_patch_merging
