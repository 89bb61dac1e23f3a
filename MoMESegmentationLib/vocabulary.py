"""The prompt vocabulary: structures, their names, codes and colours, and prompt resolution.

A *structure* is something a model can segment, identified by the TotalSegmentator v2 'total'
class name (``liver``, ``kidney_left``, ``vertebrae_L3``) or, for the Universal Model's extra
classes, a snake_case name (``liver_tumor``, ``head_of_femur_left``). Each carries a display
name, synonyms and clinical phrasings, SNOMED CT codes in the form 3D Slicer's terminologies use,
and a recommended colour, plus the anatomical priors of the plausibility guard
(:mod:`MoMESegmentationLib.anatomy`): the body regions it lies in and a plausible adult volume.
A *group* (``kidneys``, ``lumbar vertebrae``) names several structures and expands into one
prompt per member.

Prompt text is matched after normalisation (see :func:`normalize`): case, spacing, punctuation,
underscores, word order, plurals, British spellings, ordinals and the side abbreviations
``L``/``Lt``/``R``/``Rt`` do not matter, so ``"L kidney"``, ``"kidney (left)"``, ``"Left Kidney"``
and ``"kidney_left"`` all name ``kidney_left``. A prompt with no side names both sides
(``"kidney"`` is the group ``kidneys``). Vertebra ranges such as ``"T12-L2"`` expand as well.

This module uses only the standard library.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import MoMEError, PromptError

__all__ = [
    "BODY_REGIONS",
    "PROMPT_TEMPLATE",
    "Structure",
    "Group",
    "PromptMatch",
    "Vocabulary",
    "SimilarityFn",
    "normalize",
    "parse_prompts",
    "terminology_entry",
]

logger = logging.getLogger(__name__)

#: Sentence the text encoder embeds for a structure (the Universal Model's prompt).
PROMPT_TEMPLATE = "A computerized tomography of a {}."

#: Body regions from head to feet, the vocabulary of :attr:`Structure.regions`.
BODY_REGIONS = ("head", "neck", "chest", "abdomen", "pelvis", "legs")

#: ``similarity(prompt) -> (nearest structure id, similarity in [-1, 1])``.
SimilarityFn = Callable[[str], "tuple[str, float]"]

_FORMAT = "mome-vocabulary"
_ID_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_PROMPT_SEPARATORS = re.compile(r"[,;\n\r]+")

# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_LEFT_WORDS = frozenset({"left", "l", "lt", "lft", "sinister", "sinistra"})
_RIGHT_WORDS = frozenset({"right", "r", "rt", "rgt", "dexter", "dextra"})
_STOP_WORDS = frozenset({"a", "an", "the", "of", "and", "both", "bilateral", "entire", "whole"})
_SPELLINGS = {
    "tumour": "tumor",
    "oesophagus": "esophagus",
    "oesophageal": "esophageal",
    "coeliac": "celiac",
    "haemorrhage": "hemorrhage",
    "caecum": "cecum",
}
_IRREGULAR_PLURALS = {
    "vertebrae": "vertebra",
    "femora": "femur",
    "humeri": "humerus",
    "glutei": "gluteus",
    "metastases": "metastasis",
    "ossa": "os",
    "coxae": "coxa",
}
_ORDINAL_WORDS = {
    word: str(number)
    for number, word in enumerate(
        ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
         "tenth", "eleventh", "twelfth"],
        start=1,
    )
}
_ORDINAL_NUMBER = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
_SPINE_LEVEL = re.compile(r"^(?:th|[ctls])\d+$")
_VERTEBRA_RANGE = re.compile(
    r"^\s*(?:vertebrae?\s+)?(th|[ctls])\s*(\d+)\s*(?:-|\u2013|\u2014|to|through|until)\s*"
    r"(th|[ctls])?\s*(\d+)\s*(?:vertebrae?)?\s*$",
    re.IGNORECASE,
)


def _singular(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) <= 3 or any(c.isdigit() for c in word):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ae"):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "as", "os")):
        return word[:-1]
    return word


def _tokens(text: str) -> tuple[list[str], str | None]:
    """Split ``text`` into normalised words and a side (``"left"``, ``"right"`` or None)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    raw = re.findall(r"[a-z0-9]+", text.lower().replace("&", " and "))
    words: list[str] = []
    i = 0
    while i < len(raw):
        word = raw[i]
        # "L 3" / "Th 12" -> "l3" / "t12" (a vertebra level written with a space).
        if word in ("c", "t", "th", "l", "s") and i + 1 < len(raw) and raw[i + 1].isdigit():
            word = word[0] + raw[i + 1]
            i += 1
        elif _SPINE_LEVEL.match(word) and word.startswith("th"):
            word = "t" + word[2:]
        words.append(word)
        i += 1
    sides = set()
    out: list[str] = []
    for word in words:
        if word in _LEFT_WORDS:
            sides.add("left")
            continue
        if word in _RIGHT_WORDS:
            sides.add("right")
            continue
        word = _SPELLINGS.get(word, word)
        word = _ORDINAL_WORDS.get(word, word)
        match = _ORDINAL_NUMBER.match(word)
        if match:
            word = match.group(1)
        word = _SPELLINGS.get(_singular(word), _singular(word))
        if word not in _STOP_WORDS:
            out.append(word)
    # Both sides named ("left and right kidney") means the pair, like no side at all.
    side = sides.pop() if len(sides) == 1 else None
    return out, side


def normalize(text: str) -> str:
    """Return the lookup key of a structure name or prompt.

    The key is the set of normalised words in alphabetical order followed by the side, so
    ``normalize("L kidney") == normalize("kidney (left)") == normalize("kidney_left") ==
    "kidney left"``. Lower-cased; punctuation, underscores, repeated spaces, ``of``/``the``/``and``
    dropped; plurals singular (``"kidneys"`` -> ``"kidney"``); ordinals as numbers
    (``"first rib"`` -> ``"1 rib"``); ``L``/``Lt``/``R``/``Rt`` read as sides except when they
    start a vertebra level (``"L3"``, ``"L 3"``).
    """
    words, side = _tokens(text)
    key = " ".join(sorted(set(words)))
    return f"{key} {side}".strip() if side else key


def _compact_key(text: str) -> str:
    """Words in their original order without spaces, then the side (``"gall bladder"`` -> ``"gallbladder"``)."""
    words, side = _tokens(text)
    return "".join(words) + (side or "")


def parse_prompts(text: str) -> list[str]:
    """Split a prompt string into prompts.

    Prompts are separated by commas, semicolons or new lines; each is stripped and its inner
    white space collapsed; empty ones are dropped; repeats (ignoring case) are dropped, keeping
    the first; the order is kept.

    Raises:
        PromptError: when no prompt is left.
    """
    prompts: list[str] = []
    seen: set[str] = set()
    for part in _PROMPT_SEPARATORS.split(text or ""):
        prompt = " ".join(part.split())
        if prompt and prompt.casefold() not in seen:
            seen.add(prompt.casefold())
            prompts.append(prompt)
    if not prompts:
        raise PromptError("no prompt given: enter structure names separated by commas, e.g. 'liver, left kidney'")
    return prompts


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """One segmentable structure.

    Attributes:
        id: TotalSegmentator 'total' class name, or snake_case for the Universal Model's extras.
        name: display name ("Left kidney").
        synonyms: other names and clinical phrasings accepted as prompts.
        color: recommended display colour, RGB 0-255.
        terminology: SNOMED CT codes as 3D Slicer uses them: ``category``, ``type``, ``modifier``,
            ``region``, ``region_modifier``, each ``{"scheme", "code", "meaning"}`` or None.
        universal_model_index: output channel (0-31) of the CLIP-Driven Universal Model, or None.
        totalsegmentator_label: label value in TotalSegmentator's 'total' task (1-117), or None.
        parts: structures that together make up this one (``lung_left`` = its two lobes); a
            model that lacks this structure but has all its parts segments the parts instead.
        regions: the body regions (:data:`BODY_REGIONS`, head to feet) whose axial slices the
            structure occupies in an adult, generously; empty when unknown.
        volume_ml: a plausible adult volume range in millilitres ``(low, high)``, generous at the
            top so that disease fits, or None where no range means anything (tumours).
    """

    id: str
    name: str
    synonyms: tuple[str, ...]
    color: tuple[int, int, int]
    terminology: dict = field(hash=False, compare=False, repr=False)
    universal_model_index: int | None = None
    totalsegmentator_label: int | None = None
    parts: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    volume_ml: tuple[float, float] | None = None

    @property
    def prompt_text(self) -> str:
        """The sentence a text encoder embeds for this structure (:data:`PROMPT_TEMPLATE`)."""
        return PROMPT_TEMPLATE.format(self.name.lower())

    @property
    def color_float(self) -> tuple[float, float, float]:
        """The colour as RGB in [0, 1] (Slicer segment colours)."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    @property
    def terminology_entry(self) -> str:
        """The terminology as a Slicer ``TerminologyEntry`` tag string."""
        return terminology_entry(self.terminology)


@dataclass(frozen=True)
class Group:
    """A name for several structures ("kidneys"); a group prompt expands into its members."""

    id: str
    name: str
    synonyms: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class PromptMatch:
    """How one prompt was understood.

    Attributes:
        prompt: the prompt as the user wrote it.
        structure_id: the structure it names or is nearest to, or None when nothing fits.
        structure: the :class:`Structure` of ``structure_id``, or None.
        similarity: 1.0 for an exact (name, synonym or group) match, otherwise the
            embedding cosine similarity or string similarity to ``structure_id``.
        exact: whether the prompt names the structure (directly or as a group member).
    """

    prompt: str
    structure_id: str | None
    structure: Structure | None
    similarity: float
    exact: bool

    @property
    def name(self) -> str:
        """Display name: the structure's when exact, otherwise the prompt itself."""
        return self.structure.name if self.exact and self.structure is not None else self.prompt


_SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_entry(terminology: dict) -> str:
    """Format terminology codes as Slicer's ``TerminologyEntry`` segment tag.

    Example: ``"Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^
    Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"``.
    """

    def code(entry: dict | None) -> str:
        if not entry:
            return "^^"
        return f"{entry['scheme']}^{entry['code']}^{entry['meaning']}"

    return "~".join([
        _SLICER_CONTEXT,
        code(terminology.get("category")),
        code(terminology.get("type")),
        code(terminology.get("modifier")),
        _SLICER_REGION_CONTEXT,
        code(terminology.get("region")),
        code(terminology.get("region_modifier")),
    ])


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


class Vocabulary:
    """Structures and groups, indexed for prompt lookup.

    Example::

        vocab = Vocabulary.load()
        vocab["kidney_left"].name                    # 'Left kidney'
        [s.id for s in vocab.lookup("kidneys")]      # ['kidney_left', 'kidney_right']
        vocab.resolve(parse_prompts("liver, L3"))    # two exact PromptMatch records
    """

    def __init__(self, structures: Iterable[Structure], groups: Iterable[Group] = (), source: str = "<memory>"):
        self.source = source
        self._structures: dict[str, Structure] = {}
        for structure in structures:
            if structure.id in self._structures:
                raise ValueError(f"{source}: duplicate structure id {structure.id!r}")
            self._structures[structure.id] = structure
        self._groups: dict[str, Group] = {}
        for group in groups:
            if group.id in self._groups:
                raise ValueError(f"{source}: duplicate group id {group.id!r}")
            unknown = [m for m in group.members if m not in self._structures]
            if unknown:
                raise ValueError(f"{source}: group {group.id!r} names unknown structures {unknown}")
            self._groups[group.id] = group
        for structure in self._structures.values():
            unknown = [p for p in structure.parts if p not in self._structures]
            if unknown:
                raise ValueError(f"{source}: structure {structure.id!r} has unknown parts {unknown}")
        self._index: dict[str, tuple[str, str]] = {}
        self._compact: dict[str, tuple[str, str] | None] = {}
        for structure in self._structures.values():
            for text in (structure.id, structure.name, *structure.synonyms):
                self._add_key(text, ("structure", structure.id))
        for group in self._groups.values():
            for text in (group.id, group.name, *group.synonyms):
                self._add_key(text, ("group", group.id))
        indices = [s.universal_model_index for s in self._structures.values() if s.universal_model_index is not None]
        if len(indices) != len(set(indices)):
            raise ValueError(f"{source}: repeated universal_model_index")
        self._vertebrae = [sid for sid in self._structures if re.fullmatch(r"vertebrae_[CTLS]\d+", sid)]
        self._vertebrae.sort(key=_vertebra_order)

    def _add_key(self, text: str, target: tuple[str, str]) -> None:
        key = normalize(text)
        if not key:
            raise ValueError(f"{self.source}: name {text!r} of {target[1]!r} normalises to nothing")
        previous = self._index.setdefault(key, target)
        if previous != target:
            raise ValueError(
                f"{self.source}: {text!r} of {target[0]} {target[1]!r} is ambiguous with "
                f"{previous[0]} {previous[1]!r} (both normalise to {key!r})"
            )
        compact = _compact_key(text)
        if compact in self._compact and self._compact[compact] != target:
            self._compact[compact] = None  # ambiguous without spaces: only the word key counts
        else:
            self._compact[compact] = target

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str | None = None) -> Vocabulary:
        """Read a vocabulary JSON file (default: the bundled ``Resources/vocabulary.json``).

        Raises:
            MoMEError: when the file is missing or malformed (one line naming the file).
        """
        if path is None:
            from .resources import resource_path

            path = resource_path("vocabulary.json")
        path = Path(path).expanduser().resolve()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError as exc:
            raise MoMEError(f"{path}: vocabulary file not found ({exc.strerror})") from None
        return _load_cached(str(path), stamp)

    @classmethod
    def from_dict(cls, document: dict, source: str = "<memory>") -> Vocabulary:
        """Build a vocabulary from the JSON document written by ``scripts/build_vocabulary.py``."""
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise MoMEError(f"{source}: not a MoME vocabulary file (expected \"format\": \"{_FORMAT}\")")
        try:
            structures = [_structure_from_json(entry) for entry in document["structures"]]
            groups = [
                Group(
                    id=str(entry["id"]),
                    name=str(entry["name"]),
                    synonyms=tuple(str(s) for s in entry.get("synonyms", ())),
                    members=tuple(str(m) for m in entry["members"]),
                )
                for entry in document.get("groups", ())
            ]
            return cls(structures, groups, source=source)
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise MoMEError(f"{source}: invalid vocabulary: {detail}") from None

    # ---- container protocol ------------------------------------------------------------

    def __getitem__(self, structure_id: str) -> Structure:
        try:
            return self._structures[structure_id]
        except KeyError:
            raise KeyError(f"unknown structure id {structure_id!r}") from None

    def __contains__(self, structure_id: object) -> bool:
        return structure_id in self._structures

    def __iter__(self) -> Iterator[Structure]:
        return iter(self._structures.values())

    def __len__(self) -> int:
        return len(self._structures)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} structures, {len(self._groups)} groups, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        """All structure ids, TotalSegmentator classes first in label order."""
        return list(self._structures)

    @property
    def groups(self) -> dict[str, Group]:
        """Groups by id."""
        return dict(self._groups)

    def get(self, structure_id: str) -> Structure | None:
        """The structure with this id, or None."""
        return self._structures.get(structure_id)

    def universal_model_classes(self) -> list[Structure]:
        """The Universal Model's classes in output-channel order (index 0 first)."""
        indexed = sorted(
            (s for s in self._structures.values() if s.universal_model_index is not None),
            key=lambda s: s.universal_model_index,
        )
        return indexed

    def totalsegmentator_classes(self) -> dict[int, Structure]:
        """TotalSegmentator 'total' label value -> structure."""
        return {
            s.totalsegmentator_label: s for s in self._structures.values() if s.totalsegmentator_label is not None
        }

    # ---- lookup ---------------------------------------------------------------------------

    def lookup(self, text: str) -> list[Structure]:
        """Structures that ``text`` names exactly (after :func:`normalize`), or ``[]``.

        A structure name or synonym gives one structure; a group gives its members; a vertebra
        range ("L1-L5", "T12 to L2") gives the vertebrae in between, cranial first.
        """
        target = self._index.get(normalize(text))
        if target is None:
            target = self._compact.get(_compact_key(text))
        if target is None:
            return self._lookup_range(text)
        kind, target_id = target
        if kind == "group":
            return [self._structures[m] for m in self._groups[target_id].members]
        return [self._structures[target_id]]

    def _lookup_range(self, text: str) -> list[Structure]:
        match = _VERTEBRA_RANGE.match(text)
        if not match:
            return []
        first_region, first_number, last_region, last_number = match.groups()
        first = f"vertebrae_{first_region[0].upper()}{int(first_number)}"
        last = f"vertebrae_{(last_region or first_region)[0].upper()}{int(last_number)}"
        if first not in self._vertebrae or last not in self._vertebrae:
            return []
        i, j = sorted((self._vertebrae.index(first), self._vertebrae.index(last)))
        return [self._structures[v] for v in self._vertebrae[i : j + 1]]

    def string_similarity(self, text: str, candidates: Iterable[str] | None = None) -> tuple[str, float]:
        """Nearest structure by spelling: ``(id, ratio in [0, 1])`` over names and synonyms.

        ``candidates`` restricts the answer to those structure ids.
        """
        key = normalize(text) or text.lower()
        allowed = set(candidates) if candidates is not None else None
        best_id, best = "", -1.0
        for indexed_key, (kind, target_id) in self._index.items():
            if kind != "structure" or (allowed is not None and target_id not in allowed):
                continue
            ratio = difflib.SequenceMatcher(None, key, indexed_key).ratio()
            if ratio > best:
                best_id, best = target_id, ratio
        if not best_id:
            raise PromptError(f"prompt {text!r}: no structure to compare with")
        return best_id, best

    def resolve(
        self,
        prompts: list[str] | str,
        allowed: set[str] | None = None,
        similarity: SimilarityFn | None = None,
        *,
        min_similarity: float = 0.0,
    ) -> list[PromptMatch]:
        """Map prompts to structures.

        Args:
            prompts: prompts as returned by :func:`parse_prompts` (a string is parsed first).
            allowed: the structure ids a fixed-vocabulary model segments, or None for a
                free-text model. A structure outside ``allowed`` whose parts are all inside it
                resolves to its parts; a group resolves to its members inside ``allowed``.
            similarity: nearest-structure callback for prompts that match nothing exactly
                (e.g. :meth:`MoMESegmentationLib.text.TextEncoder.nearest`); without it, the
                nearest structure is found by spelling (:meth:`string_similarity`).
            min_similarity: inexact matches below this similarity get ``structure_id=None``.

        Returns:
            One :class:`PromptMatch` per prompt, or per member for group prompts, in prompt
            order; a structure named exactly twice appears once.

        Raises:
            PromptError: for an empty prompt; with ``allowed``, for a prompt that names no
                structure of the model (the message names the nearest one it has).
        """
        if isinstance(prompts, str):
            prompts = parse_prompts(prompts)
        if allowed is not None:
            allowed = set(allowed)
            unknown = sorted(a for a in allowed if a not in self._structures)
            if unknown:
                logger.debug("allowed structures not in the vocabulary: %s", unknown)
        matches: list[PromptMatch] = []
        seen: set[str] = set()

        def add(prompt: str, structure_id: str) -> None:
            if structure_id not in seen:
                seen.add(structure_id)
                matches.append(PromptMatch(prompt, structure_id, self._structures[structure_id], 1.0, True))

        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptError("empty prompt: enter a structure name such as 'liver'")
            prompt = " ".join(prompt.split())
            found = self.lookup(prompt)
            if found and allowed is None:
                for structure in found:
                    add(prompt, structure.id)
                continue
            if found:
                ids = [i for structure in found for i in self._restrict(structure, allowed)]
                if not ids:
                    nearest = self._nearest_allowed(prompt, allowed, similarity, exclude=found)
                    raise PromptError(
                        f"prompt {prompt!r} ({', '.join(s.name for s in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}) is not segmented by this model; "
                        f"nearest it has: {nearest}"
                    )
                for structure_id in ids:
                    add(prompt, structure_id)
                continue
            if allowed is not None:
                nearest = self._nearest_allowed(prompt, allowed, similarity)
                raise PromptError(
                    f"prompt {prompt!r} is not a structure this model segments; nearest it has: {nearest}"
                )
            structure_id, score = similarity(prompt) if similarity is not None else self.string_similarity(prompt)
            structure = self._structures.get(structure_id)
            if structure is None or score < min_similarity:
                matches.append(PromptMatch(prompt, None, None, float(score), False))
            else:
                matches.append(PromptMatch(prompt, structure_id, structure, float(score), False))
        return matches

    def _restrict(self, structure: Structure, allowed: set[str]) -> list[str]:
        if structure.id in allowed:
            return [structure.id]
        if structure.parts and all(p in allowed for p in structure.parts):
            return list(structure.parts)
        return []

    def _nearest_allowed(
        self,
        prompt: str,
        allowed: set[str],
        similarity: SimilarityFn | None,
        exclude: Iterable[Structure] = (),
    ) -> str:
        candidates = [a for a in allowed if a in self._structures]
        if not candidates:
            return "(the model lists no known structures)"
        if similarity is not None:
            structure_id, _ = similarity(prompt)
            if structure_id in allowed and structure_id in self._structures:
                return f"{self._structures[structure_id].name} ({structure_id})"
        # Compare the names of what the prompt means (if anything) with the model's structures.
        probes = [s.name for s in exclude] or [prompt]
        best_id, best = "", -1.0
        for probe in probes:
            structure_id, ratio = self.string_similarity(probe, candidates)
            if ratio > best:
                best_id, best = structure_id, ratio
        return f"{self._structures[best_id].name} ({best_id})"


def _vertebra_order(structure_id: str) -> tuple[int, int]:
    level = structure_id.split("_", 1)[1]
    return "CTLS".index(level[0]), int(level[1:])


def _code_from_json(entry: dict | None, what: str) -> dict | None:
    if entry is None:
        return None
    code = {k: str(entry[k]) for k in ("scheme", "code", "meaning")}
    if not all(code.values()):
        raise ValueError(f"empty SNOMED {what} code {entry}")
    return code


def _structure_from_json(entry: dict) -> Structure:
    sid = str(entry["id"])
    if not _ID_PATTERN.match(sid):
        raise ValueError(f"bad structure id {sid!r}")
    color = tuple(int(c) for c in entry["color"])
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise ValueError(f"structure {sid!r}: colour {entry['color']} is not RGB 0-255")
    terms = entry["terminology"]
    terminology = {
        "category": _code_from_json(terms["category"], "category"),
        "type": _code_from_json(terms["type"], "type"),
        "modifier": _code_from_json(terms.get("modifier"), "modifier"),
        "region": _code_from_json(terms.get("region"), "region"),
        "region_modifier": _code_from_json(terms.get("region_modifier"), "region modifier"),
    }
    if terminology["category"] is None or terminology["type"] is None:
        raise ValueError(f"structure {sid!r}: terminology needs a category and a type")
    um_index = entry.get("universal_model_index")
    ts_label = entry.get("totalsegmentator_label")
    regions = tuple(str(r) for r in entry.get("regions", ()))
    unknown = [r for r in regions if r not in BODY_REGIONS]
    if unknown or len(set(regions)) != len(regions):
        raise ValueError(
            f"structure {sid!r}: regions {list(regions)} must be distinct names from {list(BODY_REGIONS)}"
        )
    regions = tuple(r for r in BODY_REGIONS if r in regions)
    volume = entry.get("volume_ml")
    if volume is not None:
        volume = tuple(float(v) for v in volume)
        if len(volume) != 2 or not all(math.isfinite(v) and v >= 0 for v in volume) or volume[0] > volume[1]:
            raise ValueError(f"structure {sid!r}: volume_ml {entry['volume_ml']} is not a range [low, high]")
    return Structure(
        id=sid,
        name=str(entry["name"]),
        synonyms=tuple(str(s) for s in entry.get("synonyms", ())),
        color=color,  # type: ignore[arg-type]
        terminology=terminology,
        universal_model_index=None if um_index is None else int(um_index),
        totalsegmentator_label=None if ts_label is None else int(ts_label),
        parts=tuple(str(p) for p in entry.get("parts", ())),
        regions=regions,
        volume_ml=volume,  # type: ignore[arg-type]
    )


@lru_cache(maxsize=8)
def _load_cached(path: str, stamp: int) -> Vocabulary:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoMEError(f"{path}: cannot read vocabulary ({exc})") from None
    vocabulary = Vocabulary.from_dict(document, source=path)
    logger.debug("loaded %r", vocabulary)
    return vocabulary
