"""The frozen text encoder: offline loading of the packaged MiniLM, pooling, caching, errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from MoMESegmentationLib.errors import CheckpointError, MoMEError  # noqa: E402
from MoMESegmentationLib.text import DEFAULT_TEXT_ENCODER, TextEncoder, resolve_text_encoder  # noqa: E402
from MoMESegmentationLib.vocabulary import PROMPT_TEMPLATE, Vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        try:
            return TextEncoder()
        except CheckpointError as exc:
            pytest.skip(f"packaged MiniLM not installed: {exc}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_default_encoder_resolves_to_packaged_folder():
    path = resolve_text_encoder(DEFAULT_TEXT_ENCODER)
    assert path.endswith("model")
    assert resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2") == path


def test_loads_offline_and_is_frozen(encoder):
    assert encoder.dim == 384
    assert not any(p.requires_grad for p in encoder._model.parameters())
    assert not encoder._model.training
    assert DEFAULT_TEXT_ENCODER in encoder.identity and "mean" in encoder.identity
    assert PROMPT_TEMPLATE in encoder.identity


def test_embeddings_shape_and_norm(encoder):
    out = encoder.encode(["liver", "left kidney", "urinary bladder"])
    assert out.shape == (3, 384) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_semantics(encoder):
    a, b, c, d = encoder.encode(["left kidney", "kidney left", "urinary bladder", "right kidney"])
    assert cosine(a, b) > cosine(a, c)
    assert cosine(a, d) > cosine(a, c)
    liver, hepatic, femur = encoder.encode(["liver", "hepatic parenchyma", "thigh bone"])
    assert cosine(liver, hepatic) > cosine(liver, femur)


def test_template_applied_once(encoder):
    assert encoder.format("liver") == "A computerized tomography of a liver."
    vocab = Vocabulary.load()
    raw, templated = encoder.encode(["left kidney", vocab["kidney_left"].prompt_text])
    assert torch.equal(raw, templated)


def test_cache_hit_returns_identical_values(encoder, monkeypatch):
    first = encoder.encode(["spleen", "aorta"])
    calls = []
    original = encoder._forward
    monkeypatch.setattr(encoder, "_forward", lambda texts: calls.append(texts) or original(texts))
    second = encoder.encode(["aorta", "spleen", "aorta"])
    assert calls == []
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0]) and torch.equal(second[2], first[1])
    encoder.encode(["spleen", "a structure never embedded before"])
    assert calls == [["A computerized tomography of a a structure never embedded before."]]


def test_cls_pooling_differs_and_has_its_own_cache_entries(encoder):
    cls = TextEncoder(pooling="cls")
    assert cls.identity != encoder.identity
    a = cls.encode(["liver"])
    b = encoder.encode(["liver"])
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_nearest_callback_resolves_free_text(encoder):
    vocab = Vocabulary.load()
    ids = ["liver", "kidney_left", "kidney_right", "pancreas_tumor", "urinary_bladder", "spleen"]
    similarity = encoder.structure_matcher(vocab, ids)
    structure_id, score = similarity("a tumour in the pancreas")
    assert structure_id == "pancreas_tumor" and 0.5 < score <= 1.0 + 1e-6
    table = encoder.encode([vocab[i].name.lower() for i in ids])
    assert encoder.nearest(table, ids)("left renal organ")[0] == "kidney_left"
    (match,) = vocab.resolve(["pancreatic tumour region"], similarity=similarity)
    assert match.structure_id == "pancreas_tumor" and not match.exact
    with pytest.raises(ValueError, match="embedding_table"):
        encoder.nearest(table[:2], ids)


def test_missing_model_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"text encoder 'no-such-org/no-such-encoder' is not installed locally") as info:
        TextEncoder("no-such-org/no-such-encoder")
    assert "\n" not in str(info.value)
    empty = tmp_path / "encoder"
    empty.mkdir()
    with pytest.raises(MoMEError, match="is not installed locally"):
        TextEncoder(str(empty))


@pytest.mark.parametrize("kwargs, match", [({"pooling": "max"}, "pooling"), ({"template": "no slot"}, "template")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder(**kwargs)
