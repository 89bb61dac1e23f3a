"""What the router did: per-voxel expert maps and per-structure expert usage (``mome segment --explain``).

MoME's text-guided router gives every voxel, for every prompt, a gate per expert (a softmax over the
decoder scales, :mod:`~MoMESegmentationLib.model.router`). With ``explain`` the engine stitches those
gates like the logits (the same Gaussian-weighted average over overlapping windows, so they still sum
to 1), brings them onto the input grid with the same resampling, and this module turns them into:

* the **dominant expert** per voxel: a label map, value ``e + 1`` for expert ``e`` (the checkpoint's
  order), 0 where nothing was computed (outside the scan's body or the ROI);
* the router's **entropy** per voxel, normalised to [0, 1] by ``log E``: 0 where one expert takes
  every gate, 1 where all experts weigh the same (0 outside, like the label map);
* per structure, the **mean gate of each expert inside the structure's mask and at its border** (a
  band of :data:`BORDER_VOXELS` voxels on both sides of the mask's surface), and the expert that
  dominates inside. The border is where fine scales should win: edges need full-resolution detail,
  while the inside of an organ is recognised from context.

The mask is the one the rules judged: the final mask of a found structure, the rejected one of a
structure a rule refused (empty when no voxel reached the threshold).

Nothing here runs without ``explain``. A single-expert model (the imported Universal Model) has no
routing: every gate is 1, so there is nothing to show, and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BORDER_VOXELS", "ExpertInfo", "Explanation", "StructureRouting", "expert_infos", "gate_maps",
           "structure_routing", "border_band", "SINGLE_EXPERT_NOTE"]

#: Half-width, in voxels, of the band around a mask's surface whose gates count as "border".
BORDER_VOXELS = 2

#: Colours of the experts by decoder scale (viridis: dark for the deepest scale, yellow for full
#: resolution), the same for every model so that maps of different checkpoints compare.
SCALE_COLORS = {
    0: (253, 231, 37),
    1: (94, 201, 98),
    2: (33, 145, 140),
    3: (59, 82, 139),
    4: (68, 1, 84),
}

SINGLE_EXPERT_NOTE = ("the model has one expert: every gate is 1, so there is no routing to explain "
                      "and no expert maps were written")


@dataclass(frozen=True)
class ExpertInfo:
    """One expert: its index in the model, its value in the dominant-expert map, its decoder scale."""

    index: int
    label: int
    scale: int
    name: str
    color: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"index": self.index, "label": self.label, "scale": self.scale, "name": self.name,
                "color": list(self.color)}


def scale_name(scale: int, deepest: int = 4) -> str:
    """``0`` -> ``"full resolution"``, ``4`` -> ``"1/16 scale (deepest)"``."""
    if scale == 0:
        return "full resolution"
    name = f"1/{2 ** scale} scale"
    return f"{name} (deepest)" if scale == deepest else name


def expert_infos(expert_scales) -> list[ExpertInfo]:
    """The experts of a model with these decoder scales (``MoMEConfig.expert_scales``)."""
    from .model.backbone import NUM_DECODER_SCALES

    return [ExpertInfo(index=e, label=e + 1, scale=int(s), name=scale_name(int(s), NUM_DECODER_SCALES - 1),
                       color=SCALE_COLORS.get(int(s), (200, 200, 200)))
            for e, s in enumerate(expert_scales)]


def gate_maps(gates: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dominant expert and the normalised entropy of gates ``[E, *spatial]``.

    Voxels whose gates sum to less than one half were not computed (the gates are 0 there, and in
    between after interpolation): they get label 0 and entropy 0. Elsewhere the gates are
    renormalised to sum to 1 before the entropy is taken.

    Returns:
        ``(dominant, entropy, computed)``: uint8 labels ``1..E`` (0 where not computed), float32 in
        [0, 1], and the boolean mask of computed voxels.
    """
    gates = np.asarray(gates, dtype=np.float32)
    count = gates.shape[0]
    total = gates.sum(axis=0)
    computed = total >= 0.5
    dominant = (np.argmax(gates, axis=0) + 1).astype(np.uint8)
    dominant[~computed] = 0
    entropy = np.zeros(gates.shape[1:], dtype=np.float32)
    if count > 1 and computed.any():
        g = gates[:, computed] / total[computed]
        h = -(g * np.log(np.clip(g, eps, None))).sum(axis=0)
        entropy[computed] = np.clip(h / np.log(count), 0.0, 1.0)
    return dominant, entropy, computed


def border_band(mask: np.ndarray, width: int = BORDER_VOXELS) -> np.ndarray:
    """Voxels within ``width`` voxels of the mask's surface, inside and outside (6-connected steps)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    band = np.zeros_like(mask)
    if not mask.any():
        return band
    # Work in the mask's bounding box grown by the band: a small organ in a large CT stays cheap.
    where = np.nonzero(mask)
    box = tuple(slice(max(0, int(w.min()) - width - 1), int(w.max()) + width + 2) for w in where)
    sub = mask[box]
    structure = ndimage.generate_binary_structure(3, 1)
    grown = ndimage.binary_dilation(sub, structure, iterations=width)
    shrunk = ndimage.binary_erosion(sub, structure, iterations=width, border_value=1)
    band[box] = grown & ~shrunk
    return band


@dataclass
class StructureRouting:
    """Mean gate of each expert inside one structure's mask and in the band around its surface."""

    label: int
    inside: list[float] | None  # per expert, None when the mask is empty
    border: list[float] | None
    inside_voxels: int
    border_voxels: int
    mask: str  # "final" (found) or "rejected" (a rule refused it)

    def dominant(self) -> int | None:
        """Index of the expert with the largest mean gate inside the mask."""
        return None if self.inside is None else int(np.argmax(self.inside))

    def to_json(self, experts: list[ExpertInfo]) -> dict:
        def named(values):
            return None if values is None else {x.name: round(float(v), 4) for x, v in zip(experts, values)}

        dominant = self.dominant()
        return {"inside": named(self.inside), "border": named(self.border),
                "dominant": None if dominant is None else experts[dominant].name,
                "inside_voxels": self.inside_voxels, "border_voxels": self.border_voxels, "mask": self.mask}


def structure_routing(gates: np.ndarray, mask: np.ndarray, label: int, found: bool,
                      width: int = BORDER_VOXELS, computed: np.ndarray | None = None) -> StructureRouting:
    """Per-expert mean gates of ``gates [E, *spatial]`` inside ``mask`` and in its border band.

    Only computed voxels count (``computed`` from :func:`gate_maps`; derived from the gates when not
    given): the band may reach outside the body or the ROI.
    """
    mask = np.asarray(mask, dtype=bool)
    band = border_band(mask, width)
    if computed is None:
        computed = gates.sum(axis=0) >= 0.5

    def mean(region: np.ndarray) -> tuple[list[float] | None, int]:
        region = region & computed
        n = int(region.sum())
        if n == 0:
            return None, 0
        values = gates[:, region].astype(np.float64)
        values /= values.sum(axis=0, keepdims=True)
        return [float(v) for v in values.mean(axis=1)], n

    inside, n_inside = mean(mask)
    border, n_border = mean(band)
    return StructureRouting(label=label, inside=inside, border=border, inside_voxels=n_inside,
                            border_voxels=n_border, mask="final" if found else "rejected")


@dataclass
class Explanation:
    """The router's maps and per-structure usage of one run, on the input's grid.

    ``dominant[k]`` and ``entropy[k]`` belong to ``SegmentationResult.structures[k]`` (one per prompt);
    both lists are empty for a single-expert model, whose ``note`` says why.
    """

    experts: list[ExpertInfo]
    dominant: list[np.ndarray] = field(default_factory=list)  # uint8 per prompt
    entropy: list[np.ndarray] = field(default_factory=list)  # float32 per prompt, in [0, 1]
    routing: list[StructureRouting] = field(default_factory=list)
    border_width: int = BORDER_VOXELS
    note: str = ""

    @property
    def has_maps(self) -> bool:
        return len(self.experts) > 1 and bool(self.dominant)

    def to_json(self) -> dict:
        return {"num_experts": len(self.experts), "experts": [x.to_json() for x in self.experts],
                "border_voxels": self.border_width, "note": self.note,
                "maps": None}  # filled in with the files' names when they are written

    def routing_json(self) -> dict[int, dict]:
        """Per-structure entries, by label value."""
        return {r.label: r.to_json(self.experts) for r in self.routing}

    def color_table(self) -> str:
        """The dominant-expert map's colours as a Slicer colour table (``.ctbl``: index name R G B A)."""
        lines = ["# MoME experts: value, name, red, green, blue, alpha", "0 none 0 0 0 0"]
        lines += [f"{x.label} {x.name.replace(' ', '_')} {x.color[0]} {x.color[1]} {x.color[2]} 255"
                  for x in self.experts]
        return "\n".join(lines) + "\n"
