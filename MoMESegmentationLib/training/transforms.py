"""MONAI dictionary transforms for training and validation.

Every sample is a dictionary with

* ``"image"``: :class:`monai.data.MetaTensor` ``[1, I, J, K]`` in HU whose ``affine`` maps voxel
  indices to **RAS** millimetres (MONAI's convention),
* ``"label"``: :class:`monai.data.MetaTensor` ``[1, I, J, K]`` of integer values on the same grid,
* ``"structure_values"``: ``{structure_id: [label values]}``: the structures this case's
  dataset annotates and the label values that make up each one.

:func:`preprocess_transforms` is deterministic (cached per case): orientation to RAS, resampling
to the training spacing, HU window to [0, 1], crop to the body. After it, array axis 0 runs from
the patient's left to the patient's right (RAS: +x points to the patient's **right**), axis 1
from posterior to anterior and axis 2 from inferior to superior.

:func:`augment_transforms` is random: patch sampling (positive/negative or class-balanced),
small rotations and zoom, contrast-phase-like histogram shifts, intensity scale and shift,
noise, smoothing, truncated field of view, thin slabs (:class:`RandSlabd`). A case smaller than a
patch is padded exactly as the engine pads a short scan (:class:`PadToWindowd`, see
:mod:`MoMESegmentationLib.windows`), and every sample carries ``"valid"``, ``[1, D, H, W]``, false
where the patch holds padding, so that the network's norms skip it as they do at inference.
Laterality is preserved: there is no left-right
flip unless :class:`RandLateralityFlipd` is enabled, which swaps ``*_left`` and ``*_right``
structures together with the voxels; rotations about the superior axis stay small.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCropd,
)

from ..windows import apply_padding, truncated_sides, window_padding
from .config import TransformConfig

__all__ = [
    "preprocess_transforms",
    "augment_transforms",
    "validation_transforms",
    "RandLateralityFlipd",
    "RandFieldOfViewd",
    "RandStructureCropd",
    "RandSlabd",
    "PadToWindowd",
    "AddValidd",
    "swap_laterality",
    "body_mask",
    "crop_size_for",
]

KEYS = ("image", "label")
#: Spatial keys of an augmented sample: image, label and the valid-voxel mask.
SPATIAL_KEYS = ("image", "label", "valid")
#: Intensity (after windowing to [0, 1]) above which a voxel counts as body for foreground cropping.
BODY_THRESHOLD = 0.0


def body_mask(image: Any) -> Any:
    """Voxels brighter than air after windowing (used by ``CropForegroundd``; picklable)."""
    return image > BODY_THRESHOLD


def swap_laterality(name: str) -> str:
    """``kidney_left`` <-> ``kidney_right`` (also ``*_left_*`` in the middle of an id)."""
    parts = name.split("_")
    swapped = ["right" if p == "left" else "left" if p == "right" else p for p in parts]
    return "_".join(swapped)


def crop_size_for(config: TransformConfig) -> list[int]:
    """Size of the patch cut before rotation/zoom, large enough that the rotated patch has no holes."""
    if not config.augment or config.prob_affine <= 0:
        return [int(s) for s in config.patch_size]
    angle = math.radians(max(config.rotate_deg))
    factor = (math.cos(angle) + math.sin(angle)) * (1.0 + config.scale_range)
    return [int(math.ceil(s * factor / 2.0) * 2) for s in config.patch_size]


def preprocess_transforms(config: TransformConfig) -> Compose:
    """Deterministic part: RAS orientation, spacing, HU window, body crop (cached per case)."""
    low, high = (float(v) for v in config.window)
    transforms: list = [
        Orientationd(keys=KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=KEYS, pixdim=tuple(float(s) for s in config.spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]
    if config.crop_foreground:
        transforms.append(CropForegroundd(keys=KEYS, source_key="image", select_fn=body_mask, margin=2,
                                          allow_smaller=True))
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32))
    return Compose(transforms)


def validation_transforms(config: TransformConfig) -> Compose:
    """Validation uses the preprocessing only (whole volumes, sliding-window inference)."""
    return preprocess_transforms(config)


class RandStructureCropd(RandomizableTransform, MapTransform):
    """Class-balanced patch sampling: centre a patch on a random annotated structure.

    With probability ``pos / (pos + neg)`` the centre is a random voxel of a structure chosen
    uniformly among the structures present in the case (so small organs are sampled as often as
    the liver); otherwise it is a random voxel of the volume.
    """

    def __init__(self, keys: KeysCollection, spatial_size: list[int], pos: float = 1.0, neg: float = 1.0,
                 label_key: str = "label", values_key: str = "structure_values") -> None:
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"pos and neg must be non-negative with a positive sum, got {pos}, {neg}")
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        self.spatial_size = [int(s) for s in spatial_size]
        self.pos_ratio = pos / (pos + neg)
        self.label_key = label_key
        self.values_key = values_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = np.asarray(d[self.label_key])[0]
        shape = label.shape
        centre = None
        if self.R.rand() < self.pos_ratio:
            groups = [v for v in d.get(self.values_key, {}).values() if v]
            present = [vals for vals in groups if np.isin(label, vals).any()]
            if present:
                vals = present[self.R.randint(len(present))]
                idx = np.argwhere(np.isin(label, vals))
                centre = idx[self.R.randint(len(idx))]
        if centre is None:
            centre = np.array([self.R.randint(s) for s in shape])
        half = [s // 2 for s in self.spatial_size]
        start = [int(np.clip(c - h, 0, max(n - s, 0))) for c, h, n, s in zip(centre, half, shape, self.spatial_size)]
        end = [st + s for st, s in zip(start, self.spatial_size)]
        cropper = SpatialCropd(keys=self.keys, roi_start=start, roi_end=end)
        return cropper(d)


class AddValidd(MapTransform):
    """Add ``"valid"``: ones shaped like the image (every voxel of a case is real until padded)."""

    def __init__(self, image_key: str = "image", valid_key: str = "valid") -> None:
        MapTransform.__init__(self, [image_key])
        self.image_key, self.valid_key = image_key, valid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.valid_key] = torch.ones(tuple(d[self.image_key].shape), dtype=torch.float32)
        return d


class RandSlabd(RandomizableTransform, MapTransform):
    """Cut a thin slab of ``slices`` (random in the range) along the superior axis (RAS axis 2).

    Mimics short scans (a few centimetres of upper abdomen, a limited follow-up): the slab is then
    padded to the patch as the engine pads it (:class:`PadToWindowd`). Cases not thicker than the
    slab are left alone.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.0, slices: tuple[int, int] = (10, 40)) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        low, high = (int(v) for v in slices)
        if not 1 <= low <= high:
            raise ValueError(f"slab slices must be 1 <= low <= high, got {slices}")
        self.slices = (low, high)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        depth = int(d[self.first_key(d)].shape[-1])
        n = int(self.R.randint(self.slices[0], self.slices[1] + 1))
        if depth <= n:
            return d
        start = int(self.R.randint(0, depth - n + 1))
        for key in self.key_iterator(d):
            d[key] = d[key][..., start:start + n]
        return d


class PadToWindowd(MapTransform):
    """Pad image, label and valid mask to at least ``spatial_size`` with the engine's rule.

    Sides where the case's field of view cuts the body are reflected (image and label alike), other
    sides get air and background (``mode="mirror"``, see :func:`MoMESegmentationLib.windows.window_padding`);
    the valid mask is 0 in all padding. Outputs are tensors ``[1, D, H, W]``.
    """

    def __init__(self, spatial_size: list[int], mode: str = "mirror", image_key: str = "image",
                 label_key: str = "label", valid_key: str = "valid") -> None:
        MapTransform.__init__(self, [image_key, label_key, valid_key])
        self.spatial_size = [int(s) for s in spatial_size]
        self.mode = mode
        self.image_key, self.label_key, self.valid_key = image_key, label_key, valid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = np.asarray(d[self.image_key])
        plan = window_padding(image.shape[1:], self.spatial_size, truncated_sides(image[0] > BODY_THRESHOLD),
                              self.mode)
        if all(amount == 0 for sides in plan for amount, _ in sides):
            return d
        air = tuple(((b, False), (a, False)) for (b, _), (a, _) in plan)
        d[self.image_key] = torch.as_tensor(apply_padding(image, plan))
        d[self.label_key] = torch.as_tensor(apply_padding(np.asarray(d[self.label_key]), plan))
        if self.valid_key in d:
            d[self.valid_key] = torch.as_tensor(apply_padding(np.asarray(d[self.valid_key]), air))
        return d


class RandLateralityFlipd(RandomizableTransform, MapTransform):
    """Mirror left-right (RAS axis 0) and swap ``*_left`` / ``*_right`` structure ids with it.

    The mirrored image shows the patient's left kidney where the right one was, so the label
    values of ``kidney_left`` and ``kidney_right`` are exchanged in ``structure_values``:
    the prompt "left kidney" still points at the patient's left kidney. Off by default.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.0, values_key: str = "structure_values") -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.values_key = values_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=(1,))  # channel-first: spatial axis 0
        table = d.get(self.values_key, {})
        d[self.values_key] = {swap_laterality(name): vals for name, vals in table.items()}
        return d


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """Truncate the axial field of view to a random circle (voxels outside become air, label 0).

    Mimics scans reconstructed with a small field of view, where the body touches or crosses
    the image border.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.1, radius_range: tuple[float, float] = (0.3, 0.5),
                 image_key: str = "image") -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.radius_range = radius_range
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shape = tuple(d[self.image_key].shape[1:])
        radius = self.R.uniform(*self.radius_range) * min(shape[0], shape[1])
        cx = shape[0] / 2 + self.R.uniform(-0.15, 0.15) * shape[0]
        cy = shape[1] / 2 + self.R.uniform(-0.15, 0.15) * shape[1]
        x = torch.arange(shape[0]).view(-1, 1) - cx
        y = torch.arange(shape[1]).view(1, -1) - cy
        outside = ((x**2 + y**2) > radius**2).unsqueeze(-1).expand(shape).unsqueeze(0)
        for key in self.key_iterator(d):
            value = d[key]
            d[key] = value.masked_fill(outside, 0) if isinstance(value, torch.Tensor) else np.where(outside, 0, value)
        return d


def augment_transforms(config: TransformConfig) -> Compose:
    """Random part: patch sampling, then (when ``config.augment``) spatial and intensity augmentation.

    Output patches are ``config.patch_size`` (``[1, D, H, W]``); the label stays integer. With
    positive/negative sampling the result is a one-element list (MONAI's ``RandCropBy*`` style).
    """
    patch = [int(s) for s in config.patch_size]
    crop = crop_size_for(config)
    keys = SPATIAL_KEYS
    transforms: list = [AddValidd()]
    if config.augment and config.prob_slab > 0:
        transforms.append(RandSlabd(keys, prob=config.prob_slab, slices=tuple(config.slab_slices)))
    transforms.append(PadToWindowd(crop, mode=config.pad_mode))
    if config.sampling == "class_balanced":
        transforms.append(RandStructureCropd(keys, crop, pos=config.pos, neg=config.neg))
    else:
        transforms += [
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=crop, pos=config.pos, neg=config.neg,
                                   num_samples=1, image_key="image", image_threshold=BODY_THRESHOLD),
        ]  # returns a one-element list; Compose maps the following transforms over it
    if config.augment:
        rotate = tuple(math.radians(a) for a in config.rotate_deg)
        transforms += [
            RandAffined(keys=keys, spatial_size=patch, prob=config.prob_affine, rotate_range=rotate,
                        scale_range=(config.scale_range,) * 3, mode=("bilinear", "nearest", "nearest"),
                        padding_mode="zeros", cache_grid=False),
            RandLateralityFlipd(keys, prob=config.prob_lr_flip),
            RandFieldOfViewd(KEYS, prob=config.prob_fov),
            RandHistogramShiftd(keys="image", num_control_points=(5, 10), prob=config.prob_intensity),
            RandScaleIntensityd(keys="image", factors=0.1, prob=config.prob_intensity),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=config.prob_intensity),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=config.prob_intensity / 2),
            RandGaussianSmoothd(keys="image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0),
                                prob=config.prob_smooth),
            RandGaussianNoised(keys="image", std=0.03, prob=config.prob_noise),
        ]
    else:
        transforms.append(SpatialCropd(keys=keys, roi_center=[c // 2 for c in crop], roi_size=patch))
    transforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    transforms.append(EnsureTyped(keys="valid", dtype=torch.bool, track_meta=False))
    transforms.append(EnsureTyped(keys="label", track_meta=False))
    return Compose(transforms)
