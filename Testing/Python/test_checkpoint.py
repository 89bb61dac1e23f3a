"""Tests of the checkpoint format (safetensors + JSON, SHA-256 verified)."""

from __future__ import annotations

import json

import pytest
import torch

from MoMESegmentationLib.checkpoint import (
    EMBEDDINGS_KEY,
    FORMAT_VERSION,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from MoMESegmentationLib.errors import CheckpointError
from MoMESegmentationLib.model import create_model

SIZE = (64, 32, 32)
STRUCTURES = ["liver", "spleen", "kidney_left"]
TEXT_ENCODER = {
    "name": "all-MiniLM-L6-v2",
    "pooling": "mean",
    "template": "a computed tomography of a {}",
    "dim": 384,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("mome-12", patch_size=SIZE).eval()


@pytest.fixture(scope="module")
def embeddings():
    return torch.randn(len(STRUCTURES), 384, generator=torch.Generator().manual_seed(5))


def _save(path, model, embeddings, **kwargs):
    args = dict(
        text_encoder=TEXT_ENCODER,
        structures=STRUCTURES,
        structure_embeddings=embeddings,
        preprocessing={"spacing": [1.5, 1.5, 1.5]},
        provenance={"dataset": "synthetic phantoms", "seed": 0},
        metrics={"dice": {"liver": 0.5}},
    )
    args.update(kwargs)
    return save_checkpoint(path, model, **args)


@pytest.fixture()
def saved(tmp_path, model, embeddings):
    weights = tmp_path / "tiny.safetensors"
    json_path = _save(weights, model, embeddings, extra={"note": "test"})
    return weights, json_path


def _outputs(model, embeddings):
    image = torch.rand(1, 1, *SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(image, embeddings)


def test_save_then_load_gives_identical_outputs(saved, model, embeddings):
    weights, json_path = saved
    assert json_path == weights.with_suffix(".json")
    loaded = load_checkpoint(weights)
    assert not loaded.model.training
    assert loaded.model.variant == "mome-12"
    assert torch.equal(loaded.structure_embeddings, embeddings)
    assert torch.equal(_outputs(loaded.model, embeddings), _outputs(model, embeddings))


def test_metadata_contents(saved):
    weights, json_path = saved
    meta = json.loads(json_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["architecture"]["variant"] == "mome-12"
    assert meta["architecture"]["config"]["feature_size"] == 12
    assert meta["text_encoder"] == TEXT_ENCODER and meta["accepts_free_text"] is True
    assert meta["structures"] == STRUCTURES
    prep = meta["preprocessing"]
    assert prep["orientation"] == "RAS" and prep["spacing"] == [1.5, 1.5, 1.5]
    assert prep["intensity"]["window"] == [-175.0, 250.0] and prep["intensity"]["range"] == [0.0, 1.0]
    assert prep["patch_size"] == list(SIZE) and 0 <= prep["overlap"] < 1
    assert meta["provenance"]["dataset"] == "synthetic phantoms"
    assert meta["metrics"] == {"dice": {"liver": 0.5}} and meta["extra"] == {"note": "test"}
    assert len(meta["weights"]["sha256"]) == 64 and meta["weights"]["file"] == weights.name
    assert read_checkpoint_meta(weights) == meta
    # Only the two files remain: temporary files of the atomic writes are gone.
    assert sorted(p.name for p in weights.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]


def test_load_accepts_json_path_and_folder(saved):
    weights, json_path = saved
    for path in (json_path, weights.parent, str(weights)):
        loaded = load_checkpoint(path)
        assert loaded.path == json_path and loaded.weights_path == weights
        assert loaded.structures == STRUCTURES


def test_weights_are_plain_safetensors(saved, model):
    from safetensors.torch import load_file

    weights, _ = saved
    tensors = load_file(str(weights))
    assert EMBEDDINGS_KEY in tensors
    expected = {k for k in model.state_dict() if not k.endswith("relative_position_index")}
    assert set(tensors) - {EMBEDDINGS_KEY} == expected


def test_half_precision_on_disk(tmp_path, model, embeddings, saved):
    full, _ = saved
    half = tmp_path / "half.safetensors"
    _save(half, model, embeddings, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.structure_embeddings.dtype == torch.float32
    assert loaded.meta["weights"]["dtype"] == "float16"
    # Every weight is exactly the original rounded to float16, and nothing else changed.
    original = model.state_dict()
    for name, value in loaded.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, original[name].half().float(), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(loaded.structure_embeddings, embeddings.half().float(), rtol=0, atol=0)


def test_fixed_vocabulary_checkpoint(tmp_path, model, embeddings):
    path = tmp_path / "fixed.safetensors"
    _save(path, model, embeddings, text_encoder=None)
    loaded = load_checkpoint(path)
    assert loaded.accepts_free_text is False and loaded.text_encoder is None


def test_tampered_weights_are_refused(saved):
    weights, _ = saved
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        load_checkpoint(weights)
    message = str(info.value)
    assert "tiny.safetensors" in message and "\n" not in message


def test_missing_files_are_refused(saved, tmp_path):
    weights, json_path = saved
    weights.unlink()
    with pytest.raises(CheckpointError, match="tiny.safetensors.*not found"):
        load_checkpoint(json_path)
    json_path.unlink()
    with pytest.raises(CheckpointError, match="tiny.json"):
        load_checkpoint(weights)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="found no checkpoints"):
        load_checkpoint(tmp_path)


def test_architecture_mismatch_is_refused(saved):
    weights, json_path = saved
    meta = json.loads(json_path.read_text())
    meta["architecture"]["config"]["feature_size"] = 24
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(weights)


def test_foreign_json_is_refused(saved):
    weights, json_path = saved
    json_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a MoME checkpoint"):
        load_checkpoint(weights)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"structure_embeddings": torch.zeros(2, 384)}, "structure_embeddings"),
        ({"text_encoder": {**TEXT_ENCODER, "dim": 512}}, "dim"),
        ({"text_encoder": None, "structure_embeddings": None}, "structure_embeddings or a text_encoder"),
        ({"structures": ["liver", "liver", "spleen"]}, "unique"),
        ({"metrics": {"dice": object()}}, "metrics"),
    ],
)
def test_save_rejects_inconsistent_arguments(tmp_path, model, embeddings, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _save(tmp_path / "bad.safetensors", model, embeddings, **kwargs)
    assert list(tmp_path.iterdir()) == []
