"""Importing public weights: the CLIP-Driven Universal Model and MONAI's Swin UNETR files.

The real files cannot be downloaded in tests. Instead, files with exactly the public tensor
names and shapes (``Resources/universal_model_tensors.json``, checked here against an
independent construction) are filled with random values, imported, and the converted network is
compared with an independent, plain implementation of the Universal Model's forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from MoMESegmentationLib.errors import CheckpointError, MoMEError, PromptError
from MoMESegmentationLib.importers.legacy_swin import (
    LEGACY_MERGING,
    LegacyPatchMerging,
    apply_checkpoint_patch_merging,
    legacy_config_supported,
    patch_merging_mode,
    use_legacy_patch_merging,
)
from MoMESegmentationLib.importers.universal_model import load_tensor_table
from MoMESegmentationLib.model.swin_attention import use_sdpa_attention
from public_model_facts import UNIVERSAL_MODEL_CLASSES



# ---------------------------------------------------------------------------- independent references
class OldPatchMerging(nn.Module):
    """MONAI < 1.5 3D patch merging, slices written out as in the old code."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x):
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
        return self.reduction(self.norm(x))


def reference_swin_unetr(downsample=OldPatchMerging):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=32, feature_size=48, downsample=downsample).eval()


def reference_universal_model(state: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """The Universal Model's forward (word-embedding variant), written plainly: logits [B, 32, D, H, W]."""
    net = reference_swin_unetr()
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    result = net.load_state_dict(backbone, strict=False)
    assert not result.unexpected_keys and all(k.startswith("out.") for k in result.missing_keys)
    with torch.no_grad():
        h = net.swinViT(image, True)
        enc0 = net.encoder1(image)
        enc1 = net.encoder2(h[0])
        enc2 = net.encoder3(h[1])
        enc3 = net.encoder4(h[2])
        dec4 = net.encoder10(h[4])
        dec3 = net.decoder5(dec4, h[3])
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        out = net.decoder1(dec0, enc0)

        task = F.relu(
            F.linear(state["organ_embedding"], state["text_to_vision.weight"], state["text_to_vision.bias"])
        )
        g = F.relu(F.group_norm(dec4, 16, state["GAP.0.weight"], state["GAP.0.bias"]))
        g = F.conv3d(
            F.adaptive_avg_pool3d(g, 1), state["GAP.3.weight"], state["GAP.3.bias"]
        )  # [B, 256, 1, 1, 1]
        n = task.shape[0]
        logits = []
        for i in range(image.shape[0]):
            cond = torch.cat([g[i : i + 1].repeat(n, 1, 1, 1, 1), task[:, :, None, None, None]], 1)
            params = F.conv3d(cond, state["controller.weight"], state["controller.bias"]).flatten(
                1
            )  # [N, 153]
            feat = F.relu(
                F.group_norm(out[i : i + 1], 16, state["precls_conv.0.weight"], state["precls_conv.0.bias"])
            )
            feat = F.conv3d(
                feat, state["precls_conv.2.weight"], state["precls_conv.2.bias"]
            )  # [1, 8, D, H, W]
            d, hh, w = feat.shape[2:]
            x = feat.repeat(n, 1, 1, 1, 1).reshape(1, n * 8, d, hh, w)
            w1, w2, w3, b1, b2, b3 = torch.split(params, [64, 64, 8, 8, 8, 1], dim=1)
            x = F.relu(F.conv3d(x, w1.reshape(n * 8, 8, 1, 1, 1), b1.reshape(n * 8), groups=n))
            x = F.relu(F.conv3d(x, w2.reshape(n * 8, 8, 1, 1, 1), b2.reshape(n * 8), groups=n))
            x = F.conv3d(x, w3.reshape(n, 8, 1, 1, 1), b3.reshape(n), groups=n)
            logits.append(x.reshape(1, n, d, hh, w))
        return torch.cat(logits)


def fake_universal_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the public names and shapes (no ``module.`` prefix)."""
    table = load_tensor_table()
    from monai.networks.nets.swin_unetr import WindowAttention

    gen = torch.Generator().manual_seed(seed)
    index = WindowAttention(
        dim=48, num_heads=3, window_size=(7, 7, 7)
    ).relative_position_index  # same in all stages
    state = {}
    for name, shape in table["tensors"].items():
        if name in table["integer_tensors"]:
            state[name] = index.clone()
        elif name == "organ_embedding":
            state[name] = torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            base = 1.0 if name.endswith("weight") else 0.0  # norm scales near 1, biases near 0
            state[name] = base + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if "transp_conv" not in name else shape[0]
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def save_public_layout(state: dict[str, torch.Tensor], path: Path) -> Path:
    """As the public train.py saves it: DDP names under "net" beside optimizer state and the epoch."""
    torch.save(
        {
            "net": {f"module.{k}": v for k, v in state.items()},
            "epoch": 500,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        },
        path,
    )
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def public_state() -> dict[str, torch.Tensor]:
    return fake_universal_state(seed=0)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, public_state):
    """The fake public file imported through the command line."""
    from MoMESegmentationLib.cli import main

    folder = tmp_path_factory.mktemp("um")
    source = save_public_layout(public_state, folder / "clip_driven_universal_swin_unetr.pth")
    output = folder / "store" / "universal-model" / "universal-model.safetensors"
    assert main(["import", "universal-model", str(source), "--output", str(output)]) == 0
    return source, output


# --------------------------------------------------------------------------------- tensor table
def test_tensor_table_matches_public_model_code():
    table = load_tensor_table()
    expected = {
        f"backbone.{k}": tuple(v.shape)
        for k, v in reference_swin_unetr().state_dict().items()
        if not k.startswith("out.")
    }  # the Universal Model's SwinUNETR copy has no `out` layer
    expected.update({
        "precls_conv.0.weight": (48,), "precls_conv.0.bias": (48,),
        "precls_conv.2.weight": (8, 48, 1, 1, 1), "precls_conv.2.bias": (8,),
        "GAP.0.weight": (768,), "GAP.0.bias": (768,),
        "GAP.3.weight": (256, 768, 1, 1, 1), "GAP.3.bias": (256,),
        "controller.weight": (8 * 8 + 8 * 8 + 8 + 8 + 8 + 1, 512, 1, 1, 1), "controller.bias": (153,),
        "organ_embedding": (32, 512),
        "text_to_vision.weight": (256, 512), "text_to_vision.bias": (256,),
    })  # fmt: skip
    assert table["tensors"] == expected
    assert table["container"] == "net" and table["prefix"] == "module."
    assert "backbone.encoder10.layer.conv1.conv.weight" in table["tensors"]
    assert not any(k.startswith("backbone.out.") for k in table["tensors"])
    params = sum(
        math.prod(s)
        for k, s in table["tensors"].items()
        if k.startswith("backbone.") and k not in table["integer_tensors"]
    )
    assert round(params / 1e6, 2) == 62.19  # the published parameter count of the Swin UNETR backbone


# ------------------------------------------------------------------------------- patch merging
def test_legacy_patch_merging_matches_old_slicing():
    torch.manual_seed(0)
    old = OldPatchMerging(6)
    new = LegacyPatchMerging(6)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 4, 6, 8, 6)
    torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)
    from monai.networks.nets.swin_unetr import PatchMerging

    current = PatchMerging(6)
    current.load_state_dict(old.state_dict())
    assert not torch.allclose(current(x), old(x), atol=1e-3)  # MONAI >= 1.5 order differs


def test_use_legacy_patch_merging_swaps_every_stage_and_keeps_weights():
    from MoMESegmentationLib.model import create_model

    model = create_model("mome-12", patch_size=(64, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_merging_mode(model) == "merging"
    assert use_legacy_patch_merging(model) == 4
    assert use_legacy_patch_merging(model) == 0
    assert patch_merging_mode(model) == LEGACY_MERGING
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = create_model("mome-12", patch_size=(64, 32, 32))
    assert apply_checkpoint_patch_merging(fresh, {"architecture": {"patch_merging": LEGACY_MERGING}})
    assert patch_merging_mode(fresh) == LEGACY_MERGING


# ------------------------------------------------------------------------------ Universal Model
def test_import_records_structures_preprocessing_and_provenance(imported):
    source, output = imported
    meta = json.loads(output.with_suffix(".json").read_text())
    assert meta["structures"] == UNIVERSAL_MODEL_CLASSES
    assert meta["accepts_free_text"] is False and meta["text_encoder"] is None
    assert meta["architecture"]["variant"] == "universal-model"
    assert meta["architecture"]["patch_merging"] == LEGACY_MERGING
    prep = meta["preprocessing"]
    assert prep["orientation"] == "RAS" and prep["spacing"] == [1.5, 1.5, 1.5]
    assert prep["intensity"]["window"] == [-175.0, 250.0]
    assert prep["patch_size"] == [96, 96, 96] and prep["overlap"] == 0.5 and prep["threshold"] == 0.5
    assert prep["blend"] == "gaussian" and prep["activation"] == "sigmoid"
    provenance = meta["provenance"]
    assert provenance["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert provenance["license"] == "CC BY-NC-ND 4.0"
    assert "huggingface.co/ljwztc/CLIP-Driven-Universal-Model" in provenance["source_url"]


def test_imported_model_computes_the_universal_model(imported, public_state):
    from MoMESegmentationLib.checkpoint import load_checkpoint

    _, output = imported
    loaded = load_checkpoint(output)
    model = loaded.model
    if patch_merging_mode(model) != LEGACY_MERGING:  # until load_checkpoint applies the hook itself
        assert apply_checkpoint_patch_merging(model, loaded.meta)
    torch.testing.assert_close(loaded.structure_embeddings, public_state["organ_embedding"])
    torch.manual_seed(1)
    image = torch.rand(1, 1, 64, 32, 32)  # the smallest SwinUNETR input: keeps this CPU test quick
    with torch.no_grad():
        ours = model(image, loaded.structure_embeddings)  # Swin attention through SDPA (the default)
        use_sdpa_attention(model, False)
        ours_monai = model(image, loaded.structure_embeddings)  # MONAI's attention: the reference's arithmetic
    reference = reference_universal_model(public_state, image)
    assert ours.shape == reference.shape == (1, 32, 64, 32, 32)
    p_ours, p_monai, p_ref = torch.sigmoid(ours), torch.sigmoid(ours_monai), torch.sigmoid(reference)
    assert (p_monai - p_ref).abs().max().item() < 1e-4
    # SDPA sums in another order: in float64 both attentions agree to 1e-12, in float32 these logits
    # (up to ~40) differ by ~6e-4, as much as the float32 reference differs from its float64 value.
    assert (p_ours - p_ref).abs().max().item() < 1e-3
    assert ((p_ref > 0.05) & (p_ref < 0.95)).float().mean() > 0.05  # not a saturated, trivial comparison


def test_load_checkpoint_rebuilds_legacy_patch_merging(imported):
    from MoMESegmentationLib.checkpoint import load_checkpoint

    loaded = load_checkpoint(imported[1])
    assert patch_merging_mode(loaded.model) == LEGACY_MERGING


def test_engine_maps_prompts_to_universal_model_classes(imported, public_state):
    from MoMESegmentationLib.engine import Segmenter
    from MoMESegmentationLib.registry import suggest_models

    output = imported[1]
    segmenter = Segmenter(output, device="cpu")
    assert segmenter.free_text is False
    plans = segmenter.plan_prompts("liver, left kidney, IVC, liver tumour")
    assert [p.structure_id for p in plans] == ["liver", "kidney_left", "inferior_vena_cava", "liver_tumor"]
    for plan in plans:
        row = UNIVERSAL_MODEL_CLASSES.index(plan.structure_id)
        torch.testing.assert_close(plan.embedding, public_state["organ_embedding"][row])
    with pytest.raises(PromptError, match="nearest"):
        segmenter.plan_prompts("L3 vertebra")
    store = output.parent.parent
    assert suggest_models("liver_tumor", store=store)[0] == "universal-model"
    assert "universal-model" not in suggest_models("vertebrae_L3", store=store)


def test_installed_models_lists_the_import(imported):
    from MoMESegmentationLib.registry import installed_models

    source, output = imported
    models = {m.name: m for m in installed_models(store=output.parent.parent)}
    entry = models["universal-model"]
    assert entry.path == output and entry.structures == tuple(UNIVERSAL_MODEL_CLASSES) and not entry.accepts_free_text
    assert entry.license.startswith("CC BY-NC-ND 4.0")
    assert entry.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_import_refuses_files_that_would_run_code(tmp_path, writer):
    from MoMESegmentationLib.importers.monai_swin import load_backbone_weights
    from MoMESegmentationLib.importers.universal_model import import_universal_model
    from MoMESegmentationLib.model import create_model

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pth"
    content = {"net": {"module.controller.bias": torch.zeros(153)}, "extra": _Payload(marker)}
    if writer == "torch.save":
        torch.save(content, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(content, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        import_universal_model(evil, tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone_weights(create_model("mome-12", patch_size=(64, 32, 32)), evil)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_import_rejects_other_checkpoints_with_one_line(tmp_path, public_state):
    from MoMESegmentationLib.importers.universal_model import import_universal_model

    partial = {k: v for k, v in public_state.items() if not k.startswith("controller.")}
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. controller\.weight\)") as info:
        import_universal_model(save_public_layout(partial, tmp_path / "a.pth"), tmp_path / "a.safetensors")
    assert "\n" not in str(info.value)
    reshaped = dict(public_state, **{"text_to_vision.weight": torch.zeros(256, 384)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        import_universal_model(save_public_layout(reshaped, tmp_path / "b.pth"), tmp_path / "b.safetensors")
    rand_variant = dict(public_state, **{"organ_embedding.weight": torch.zeros(32, 256)})
    with pytest.raises(CheckpointError, match="rand_embedding"):
        import_universal_model(
            save_public_layout(rand_variant, tmp_path / "c.pth"), tmp_path / "c.safetensors"
        )


@pytest.mark.parametrize("content", [b"these are not weights\n", b"PK\x03\x04truncated", b""])
def test_import_reports_unreadable_files_in_one_line(tmp_path, content):
    from MoMESegmentationLib.importers.universal_model import import_universal_model

    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file") as info:
        import_universal_model(path, tmp_path / "out.safetensors")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_import_reports_missing_file(tmp_path, capsys):
    from MoMESegmentationLib.cli import main

    assert main(["import", "universal-model", str(tmp_path / "nope.pth"), "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mome: error:") and "nope.pth" in err and "\n" not in err


# ------------------------------------------------------------------------------- MONAI backbones
def _swin_unetr_state(seed: int, feature_size: int = 48) -> dict[str, torch.Tensor]:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size).state_dict()


def test_backbone_from_monai_ssl_swinvit(tmp_path):
    from MoMESegmentationLib.importers.monai_swin import load_backbone_weights
    from MoMESegmentationLib.model import create_model

    full = _swin_unetr_state(3)
    encoder = {k[len("swinViT.") :]: v for k, v in full.items() if k.startswith("swinViT.")}
    # model_swinvit.pt layout: "module." names, timm-style MLP names, inside "state_dict".
    ssl = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in encoder.items()
    }
    ssl["module.rotation_head.weight"] = torch.zeros(4, 768)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": ssl, "epoch": 100}, path)

    model = create_model("mome-48")
    report = load_backbone_weights(model, path, legacy_patch_merging=True)
    own = model.backbone.state_dict()
    weights = [k for k in encoder if not k.endswith("relative_position_index")]
    assert sorted(report.loaded) == sorted(f"swinViT.{k}" for k in weights)
    for k in weights:
        torch.testing.assert_close(own[f"swinViT.{k}"], encoder[k], rtol=0, atol=0)
    assert report.layout == "swinvit" and report.unexpected == ["rotation_head.weight"]
    assert "encoder1.layer.conv1.conv.weight" in report.missing and not report.shape_mismatched
    assert report.patch_merging == LEGACY_MERGING == patch_merging_mode(model)
    assert "loaded" in str(report) and "\n" not in str(report)


def test_backbone_from_monai_swin_unetr_base(tmp_path):
    from MoMESegmentationLib.importers.monai_swin import load_backbone_weights
    from MoMESegmentationLib.model import create_model

    full = _swin_unetr_state(4, feature_size=24)  # the real file is feature size 48; the layout is the same
    path = tmp_path / "swin_unetr.base_pretrained.pt"
    torch.save({"state_dict": full}, path)
    model = create_model("mome-24")
    report = load_backbone_weights(model, path)
    assert report.layout == "swinunetr" and report.missing == []
    # Legacy merging only where the config can record it, so saved checkpoints rebuild the same network.
    assert report.patch_merging == (LEGACY_MERGING if legacy_config_supported() else "merging")
    assert report.patch_merging == patch_merging_mode(model)
    assert sorted(report.unexpected) == sorted(k for k in full if k.startswith("out."))
    own = model.backbone.state_dict()
    for k in (
        "encoder10.layer.conv1.conv.weight",
        "decoder1.transp_conv.conv.weight",
        "swinViT.layers4.0.downsample.reduction.weight",
    ):
        torch.testing.assert_close(own[k], full[k], rtol=0, atol=0)

    small = create_model("mome-12", patch_size=(64, 32, 32))
    with pytest.raises(CheckpointError, match="feature size"):
        load_backbone_weights(small, path)


def test_backbone_loader_reports_unreadable_file(tmp_path):
    from MoMESegmentationLib.importers.monai_swin import load_backbone_weights
    from MoMESegmentationLib.model import create_model

    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MoMEError, match="broken.pt"):
        load_backbone_weights(create_model("mome-12", patch_size=(64, 32, 32)), bad)
