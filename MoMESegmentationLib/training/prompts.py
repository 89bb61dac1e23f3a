"""Prompt embeddings for training: a cached table of text embeddings, several rows per structure.

Training machines often lack the text-encoder package, so the embeddings are computed once
(where the encoder is installed) and stored in a safetensors file::

    tensor  "embeddings"  [R, T] float32
    metadata  {"ids": JSON list of R structure ids, "texts": JSON list of R prompt texts,
               "encoder": text-encoder name, "pooling": ...}

Row order: for each structure, its canonical prompt (``vocabulary[id].prompt_text``) first,
then up to ``synonyms`` paraphrases (synonyms and display names from the vocabulary). Training
draws one of a structure's rows at random, so the network learns from text rather than from a
fixed index; validation and the saved checkpoint use the canonical row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MoMEError
from .config import TextConfig

__all__ = ["PromptTable", "prompt_texts", "load_or_compute_prompts"]

logger = logging.getLogger(__name__)


@dataclass
class PromptTable:
    """Rows of prompt embeddings.

    Attributes:
        ids: structure id of each row, length ``R``.
        texts: prompt text of each row.
        embeddings: ``[R, T]`` float32.
        encoder: name of the text encoder that produced them.
        pooling: its pooling.
    """

    ids: list[str]
    texts: list[str]
    embeddings: torch.Tensor
    encoder: str = ""
    pooling: str = "mean"
    template: str | None = None

    def rows_for(self, structures: Sequence[str]) -> dict[str, list[int]]:
        """Structure id -> its rows (canonical first)."""
        out: dict[str, list[int]] = {s: [] for s in structures}
        for row, name in enumerate(self.ids):
            if name in out:
                out[name].append(row)
        missing = [s for s, rows in out.items() if not rows]
        if missing:
            raise MoMEError(f"prompt embeddings lack structure(s) {', '.join(missing)}")
        return out

    def canonical(self, structures: Sequence[str]) -> torch.Tensor:
        """``[N, T]``: the canonical row of each structure, in order."""
        rows = self.rows_for(structures)
        return self.embeddings[[rows[s][0] for s in structures]]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ids": json.dumps(self.ids), "texts": json.dumps(self.texts), "encoder": self.encoder,
                "pooling": self.pooling, "template": json.dumps(self.template)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeddings": self.embeddings.float().contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PromptTable:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
            ids, texts = json.loads(meta["ids"]), json.loads(meta["texts"])
        except Exception as exc:  # safetensors raises several types for damaged files
            raise MoMEError(f"{path}: not a prompt-embedding file ({exc})") from exc
        if len(ids) != embeddings.shape[0] or len(texts) != len(ids):
            raise MoMEError(f"{path}: {len(ids)} ids for {embeddings.shape[0]} embedding rows")
        template = json.loads(meta.get("template", "null"))
        return cls(ids, texts, embeddings.float(), meta.get("encoder", ""), meta.get("pooling", "mean"), template)


def prompt_texts(structure: str, synonyms: int, overrides: dict[str, str] | None = None) -> list[str]:
    """Canonical prompt text then up to ``synonyms`` paraphrases of a structure id."""
    overrides = overrides or {}
    texts: list[str] = []
    entry = None
    try:
        from ..vocabulary import Vocabulary

        vocab = Vocabulary.load()
        entry = vocab.get(structure) or vocab.groups.get(structure)
    except (ImportError, MoMEError):
        entry = None
    if structure in overrides:
        texts.append(overrides[structure])
    if entry is not None:
        prompt = getattr(entry, "prompt_text", None)  # structures carry the template sentence
        texts.append(str(prompt) if prompt else str(entry.name).lower())
        texts.append(str(entry.name).lower())
        texts += [str(s) for s in (getattr(entry, "synonyms", None) or ())]
    texts.append(structure.replace("_", " "))
    unique = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    return unique[: 1 + max(0, int(synonyms))]


def load_or_compute_prompts(config: TextConfig, structures: Sequence[str], write: bool = True) -> PromptTable:
    """Load the embedding cache, computing (and storing) rows for structures it lacks.

    The text encoder is imported only when something has to be computed, so a machine without
    it trains from a cache made elsewhere.
    """
    path = Path(config.embeddings_cache) if config.embeddings_cache else None
    table = PromptTable.load(path) if path is not None and path.is_file() else None
    have = set(table.ids) if table is not None else set()
    missing = [s for s in structures if s not in have]
    if not missing and table is not None:
        return table
    try:
        from ..text import TextEncoder
    except ImportError as exc:
        raise MoMEError(
            f"{path}: prompt embeddings for {', '.join(missing)} are missing and the text encoder "
            f"cannot be loaded here ({exc}); compute the cache on a machine that has it"
        ) from exc
    kwargs = {"pooling": config.pooling}
    if config.model:
        kwargs["model"] = config.model
    encoder = TextEncoder(**kwargs)
    ids, texts = [], []
    for structure in missing:
        for text in prompt_texts(structure, config.synonyms, config.prompts):
            ids.append(structure)
            texts.append(text)
    logger.info("embedding %d prompt texts for %d structures", len(texts), len(missing))
    embeddings = encoder.encode(texts).detach().float().cpu()
    name = str(getattr(encoder, "name", None) or getattr(encoder, "model_name", None) or config.model or "default")
    template = getattr(encoder, "template", None)
    if table is not None:
        if table.encoder and table.encoder != name:
            raise MoMEError(f"{path}: cached embeddings come from {table.encoder}, not {name}; delete the cache")
        table = PromptTable(table.ids + ids, table.texts + texts, torch.cat([table.embeddings, embeddings]),
                            table.encoder or name, table.pooling, table.template)
    else:
        table = PromptTable(ids, texts, embeddings, name, config.pooling, template)
    if write and path is not None:
        table.save(path)
    return table
