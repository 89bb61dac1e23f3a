"""Training transforms, partial-label bookkeeping, loss and schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from MoMESegmentationLib.io.volume import Volume  # noqa: E402
from MoMESegmentationLib.training.config import TransformConfig, config_from_dict  # noqa: E402
from MoMESegmentationLib.training.datasets import (  # noqa: E402
    StepSampler,
    make_item,
    select_prompts,
    split_laterality,
)
from MoMESegmentationLib.training.losses import PartialLabelLoss  # noqa: E402
from MoMESegmentationLib.training.trainer import learning_rate, preprocessing_changes  # noqa: E402
from MoMESegmentationLib.training.transforms import (  # noqa: E402
    RandLateralityFlipd,
    augment_transforms,
    preprocess_transforms,
    swap_laterality,
)

STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]


def _centroid_axis0(label: np.ndarray, values: list[int]) -> float:
    return float(np.argwhere(np.isin(label, values))[:, 0].mean())


def test_ras_axis0_runs_from_patient_left_to_right():
    """RAS: +x is the patient's right, so after Orientationd("RAS") index 0 grows towards the right.

    A volume whose i axis points to the patient's left (LPS +x) gets reversed along axis 0.
    """
    array = np.zeros((8, 4, 4), np.float32)
    array[6] = 1.0  # near the patient's left (large LPS x)
    labels = (array > 0).astype(np.int32)
    volume = Volume(array, spacing=[1, 1, 1], direction=np.eye(3))
    item = make_item(volume, labels, {1: ("kidney_left",)}, ["kidney_left"], {})
    config = TransformConfig(spacing=[1, 1, 1], crop_foreground=False)
    out = preprocess_transforms(config)(item)
    assert _centroid_axis0(np.asarray(out["label"])[0], [1]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_left_kidney_stays_on_patient_left_after_training_transforms(seed):
    phantoms = pytest.importorskip("MoMESegmentationLib.data.phantoms")
    phantom = phantoms.make_phantom(seed, spacing=(6.0, 6.0, 6.0), random_orientation=True)
    # Ground truth in patient space: LPS +x is the patient's left.
    values = {name: value for value, name in phantom.label_table.items()}
    lab = np.asarray(phantom.labels.array)
    x_left = phantom.labels.index_to_physical(np.argwhere(lab == values["kidney_left"]).mean(0))[0]
    x_right = phantom.labels.index_to_physical(np.argwhere(lab == values["kidney_right"]).mean(0))[0]
    assert x_left > x_right

    item = make_item(phantom.image, lab.astype(np.int32), {v: (n,) for v, n in phantom.label_table.items()},
                     STRUCTURES, {})
    config = TransformConfig(spacing=[6, 6, 6], patch_size=[96, 96, 96], sampling="class_balanced",
                             prob_affine=1.0, prob_intensity=1.0, prob_fov=0.0)
    pre = preprocess_transforms(config)(item)
    augment = augment_transforms(config)
    augment.set_random_state(seed=seed)
    out = augment(pre)
    label = np.asarray(out["label"])[0]
    table = out["structure_values"]
    # RAS: axis 0 grows towards the patient's right, so the left kidney has the smaller index.
    assert _centroid_axis0(label, table["kidney_left"]) < _centroid_axis0(label, table["kidney_right"])

    flip = RandLateralityFlipd(["image", "label"], prob=1.0)
    flipped = flip(out)
    label_f = np.asarray(flipped["label"])[0]
    table_f = flipped["structure_values"]
    assert table_f["kidney_left"] == table["kidney_right"]
    assert _centroid_axis0(label_f, table_f["kidney_left"]) < _centroid_axis0(label_f, table_f["kidney_right"])


def test_swap_laterality_names():
    assert swap_laterality("kidney_left") == "kidney_right"
    assert swap_laterality("rib_right_3") == "rib_left_3"
    assert swap_laterality("liver") == "liver"


def test_split_laterality_uses_patient_side():
    labels = np.zeros((20, 6, 6), np.int32)
    labels[2:5] = 1  # small i
    labels[14:18] = 1  # large i
    # direction flips i: larger i = smaller LPS x = patient right.
    image = Volume(np.zeros(labels.shape, np.float32), direction=np.diag([-1.0, 1.0, 1.0]))
    out, values = split_laterality(labels, {1: ("kidneys",)}, {"kidneys": ("kidney_right", "kidney_left")}, image)
    right = [v for v, ids in values.items() if "kidney_right" in ids]
    left = [v for v, ids in values.items() if "kidney_left" in ids]
    assert np.isin(out[15], right).all() and np.isin(out[3], left).all()
    assert all("kidneys" in values[v] for v in right + left)


def test_partial_labels_only_prompt_annotated_structures():
    labels = np.zeros((8, 8, 8), np.int32)
    labels[:4] = 5
    labels[4:] = 7  # not annotated by this "dataset": maps to nothing
    item = make_item(Volume(np.zeros_like(labels, np.float32)), labels, {5: ("liver",), 9: ("spleen",)},
                     STRUCTURES, {})
    assert set(item["structure_values"]) == {"liver", "spleen"}  # spleen annotated (absent), kidneys unknown
    label = np.asarray(item["label"])[0]
    assert set(np.unique(label)) == {0, item["structure_values"]["liver"][0]}
    names, targets, weights = select_prompts(item["structure_values"], label, 4, 0.5, np.random.default_rng(0))
    assert names[:2] == ["liver", "spleen"] and names[2:] == ["", ""]
    assert weights.tolist() == [1, 1, 0, 0]
    assert targets[0].sum() == 256 and targets[1].sum() == 0


def test_group_target_is_union_of_members():
    labels = np.zeros((6, 6, 6), np.int32)
    labels[0] = 27
    labels[5] = 28
    table = {27: ("vertebrae_L5",), 28: ("vertebrae_L4",)}
    groups = {"lumbar_vertebrae": ["vertebrae_L%d" % i for i in range(1, 6)]}
    item = make_item(Volume(np.zeros(labels.shape, np.float32)), labels, table, ["lumbar_vertebrae"], groups)
    assert "lumbar_vertebrae" not in item["structure_values"]  # L1-L3 not annotated: group unknown
    table.update({30: ("vertebrae_L2",), 31: ("vertebrae_L1",), 29: ("vertebrae_L3",)})
    item = make_item(Volume(np.zeros(labels.shape, np.float32)), labels, table, ["lumbar_vertebrae"], groups)
    label = np.asarray(item["label"])[0]
    assert np.isin(label, item["structure_values"]["lumbar_vertebrae"]).sum() == 72


def test_loss_ignores_padding_and_unannotated():
    loss = PartialLabelLoss(balance_weight=0.0)
    logits = torch.randn(1, 3, 8, 8, 8)
    target = torch.zeros(1, 3, 8, 8, 8)
    target[0, 0, :4] = 1
    weight = torch.tensor([[1.0, 1.0, 0.0]])
    base = loss(logits, target, weight).total
    logits2 = logits.clone()
    logits2[0, 2] = 100.0  # a padded prompt: any output is fine
    assert torch.allclose(loss(logits2, target, weight).total, base)
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert loss(perfect, target, weight).total < 1e-3


def test_learning_rate_warmup_then_cosine():
    lrs = [learning_rate(s, 1.0, 10, 110, 0.0) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_step_sampler_keys_are_disjoint_across_ranks_and_resumable():
    full = list(StepSampler(0, 4, 2, rank=1, world_size=2))
    assert full == [2, 3, 6, 7, 10, 11, 14, 15]
    assert list(StepSampler(2, 4, 2, rank=1, world_size=2)) == full[4:]
    assert not set(full) & set(StepSampler(0, 4, 2, rank=0, world_size=2))


def test_config_rejects_unknown_keys():
    from MoMESegmentationLib.errors import MoMEError

    with pytest.raises(MoMEError, match="unknown setting"):
        config_from_dict({"data": {"datasets": [{"kind": "phantoms"}]}, "optim": {"learning_rate": 1}})
    with pytest.raises(MoMEError, match="kind"):
        config_from_dict({"data": {"datasets": [{"kind": "nope"}]}})


def test_sources_cache_fully_preprocessed_cases(monkeypatch):
    """Phantoms and real cases are drawn/read and preprocessed once, before any DataLoader worker
    starts; drawing a cached case again runs neither the generator nor the resampling."""
    from MoMESegmentationLib.data import phantoms
    from MoMESegmentationLib.training import datasets

    config = config_from_dict({
        "data": {"structures": STRUCTURES, "datasets": [
            {"kind": "phantoms", "name": "phantoms", "n": 2, "seed": 0, "spacing_range": [6.0, 6.0]},
            {"kind": "sample_ct", "name": "sample_ct"},
        ]},
        "transforms": {"spacing": [6.0, 6.0, 6.0], "patch_size": [64, 64, 64]},
    })
    sources = datasets.build_sources(config, STRUCTURES).sources
    assert [len(s) for s in sources] == [2, 1]

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached case was computed again")

    monkeypatch.setattr(phantoms, "make_phantom", forbidden)
    monkeypatch.setattr(datasets, "_sample_ct_item", forbidden)
    import monai.transforms

    monkeypatch.setattr(monai.transforms.Spacingd, "__call__", forbidden)
    for source in sources:
        for index in range(len(source)):
            item = source.case(index)
            assert np.allclose(item["image"].pixdim.numpy(), 6.0)
            assert item["label"].shape == item["image"].shape


def test_finetuning_warns_about_changed_preprocessing():
    trained = {"spacing": [3.0, 3.0, 3.0], "patch_size": [96, 96, 96], "intensity": {"window": [-175.0, 250.0]}}
    same = TransformConfig(spacing=[3, 3, 3], patch_size=[96, 96, 96], window=[-175, 250])
    assert preprocessing_changes(trained, same) == []
    assert preprocessing_changes({}, same) == []
    changed = TransformConfig(spacing=[1.5, 1.5, 1.5], patch_size=[64, 64, 64], window=[-1000, 1000])
    warnings = preprocessing_changes(trained, changed)
    assert len(warnings) == 3
    assert "patch size [96, 96, 96]" in warnings[0] and "[64, 64, 64]" in warnings[0]
    assert "spacing" in warnings[1] and "HU window" in warnings[2]


# ---------------------------------------------------------------- short scans: slabs, padding, valid masks
def _trunk(shape=(40, 40, 12), hu_body=40.0, hu_organ=200.0):
    """HU array of a trunk section: a body cylinder along axis 2 (cut by its first and last slice)
    holding an organ (label 1) that changes along axis 2."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = x ** 2 + y ** 2 < 0.8
    organ = (x - 0.2) ** 2 + y ** 2 < 0.08 + 0.06 * z
    return np.where(body, hu_body, -1000.0) + np.where(organ, hu_organ - hu_body, 0.0), organ.astype(np.int32)


def _windowed_sample(shape=(40, 40, 12)):
    """A sample as augment_transforms receives it, already windowed to [0, 1]; label = f(image)."""
    hu, _ = _trunk(shape)
    image = np.clip((hu + 175.0) / 425.0, 0.0, 1.0).astype(np.float32)[None]
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(_label_of(image)),
            "valid": torch.ones(image.shape)}


def _label_of(image):
    image = np.asarray(image)
    return np.where(image > 0.8, 2, np.where(image > 0, 1, 0)).astype(np.uint8)


def test_rand_slab_cuts_a_contiguous_slab_of_a_thickness_in_range_along_the_superior_axis():
    from MoMESegmentationLib.training.transforms import RandSlabd

    depth = torch.arange(30, dtype=torch.float32)
    data = {"image": depth.expand(1, 6, 5, 30).clone(), "label": (depth % 3).expand(1, 6, 5, 30).clone(),
            "valid": torch.ones(1, 6, 5, 30)}
    slab = RandSlabd(["image", "label", "valid"], prob=1.0, slices=(5, 9))
    thicknesses, starts = set(), set()
    for seed in range(20):
        slab.set_random_state(seed=seed)
        out = slab(data)
        n = out["image"].shape[-1]
        assert 5 <= n <= 9 and out["image"].shape[:3] == (1, 6, 5)
        start = int(out["image"][0, 0, 0, 0])
        expected = torch.arange(start, start + n, dtype=torch.float32)
        assert torch.equal(out["image"], expected.expand(1, 6, 5, n))  # the same slab in every column
        assert torch.equal(out["label"], out["image"] % 3) and out["valid"].shape == out["image"].shape
        thicknesses.add(n)
        starts.add(start)
    assert len(thicknesses) > 2 and len(starts) > 2
    assert data["image"].shape[-1] == 30  # the input is not modified


def test_rand_slab_leaves_thin_cases_and_prob_zero_alone():
    from MoMESegmentationLib.training.transforms import RandSlabd

    thin = _windowed_sample((20, 20, 8))
    for slab, data in [(RandSlabd(["image", "label", "valid"], prob=1.0, slices=(8, 12)), thin),
                       (RandSlabd(["image", "label", "valid"], prob=0.0, slices=(2, 3)), _windowed_sample())]:
        slab.set_random_state(seed=0)
        out = slab(data)
        assert all(out[k] is data[k] for k in ("image", "label", "valid"))
    with pytest.raises(ValueError, match="slab slices"):
        RandSlabd(["image"], prob=1.0, slices=(0, 4))
    with pytest.raises(ValueError, match="slab slices"):
        RandSlabd(["image"], prob=1.0, slices=(9, 4))


def test_pad_to_window_mirrors_cut_sides_and_marks_only_padding_invalid():
    from MoMESegmentationLib.training.transforms import PadToWindowd

    data = _windowed_sample((40, 40, 12))
    image = data["image"][0]
    out = PadToWindowd([48, 40, 32])(data)
    assert all(isinstance(out[k], torch.Tensor) and out[k].shape == (1, 48, 40, 32) for k in ("image", "label", "valid"))
    inside = (slice(4, 44), slice(0, 40), slice(10, 22))  # axis 0: 8 voxels of air; axis 2: 20 reflected
    valid = torch.zeros(48, 40, 32)
    valid[inside] = 1
    assert torch.equal(out["valid"][0].float(), valid)
    padded = out["image"][0]
    assert torch.equal(padded[inside], image)
    assert not padded[:4].any() and not padded[44:].any()  # the body ends inside along axis 0: air
    for k in range(1, 11):  # the field of view cuts the body along axis 2: reflected
        assert torch.equal(padded[4:44, :, 10 - k], image[:, :, k])
        assert torch.equal(padded[4:44, :, 21 + k], image[:, :, 11 - k])
    np.testing.assert_array_equal(np.asarray(out["label"]), _label_of(out["image"]))  # labels moved with the image
    assert np.asarray(out["label"]).dtype == np.uint8

    constant = PadToWindowd([48, 40, 32], mode="constant")(_windowed_sample((40, 40, 12)))
    assert torch.equal(constant["valid"], out["valid"])
    assert not constant["image"][0, :, :, :10].any() and not constant["label"][0, :, :, 22:].any()

    big = _windowed_sample((40, 40, 40))
    same = PadToWindowd([32, 32, 32])(big)
    assert all(same[k] is big[k] for k in ("image", "label", "valid"))


def _case(shape, seed=0):
    """A preprocessed case (6 mm grid) of the trunk phantom, as the training sources cache it."""
    hu, organ = _trunk(shape)
    hu = hu + np.random.default_rng(seed).normal(0, 5, shape)
    volume = Volume(hu.astype(np.float32), spacing=[6, 6, 6], direction=np.eye(3))
    item = make_item(volume, organ, {1: ("liver",)}, ["liver"], {})
    return preprocess_transforms(TransformConfig(spacing=[6, 6, 6]))(item)


def _valid_slices(valid: torch.Tensor) -> torch.Tensor:
    """Which slices along the last axis hold any valid voxel."""
    return valid[0].flatten(0, 1).any(dim=0)


def test_augment_pads_a_thin_case_like_the_engine_and_carries_a_bool_valid_mask():
    case = _case((40, 40, 12))
    depth = case["image"].shape[-1]
    assert depth < 32
    config = TransformConfig(spacing=[6, 6, 6], patch_size=[32, 32, 32], augment=False)
    augment = augment_transforms(config)
    augment.set_random_state(seed=0)
    out = augment(case)
    out = out[0] if isinstance(out, list) else out
    valid = out["valid"]
    assert valid.dtype == torch.bool and valid.shape == (1, 32, 32, 32)
    slices = _valid_slices(valid)
    before = (32 - depth) // 2
    assert slices.tolist() == [before <= k < before + depth for k in range(32)]
    assert bool(valid[..., before:before + depth].all())  # axes 0 and 1 are cut from real voxels
    image = out["image"][0]
    assert out["image"].dtype == torch.float32 and out["image"].shape == (1, 32, 32, 32)
    assert torch.equal(image[:, :, before - 1], image[:, :, before + 1])  # mirrored, not air
    assert image[:, :, 0].any()


@pytest.mark.parametrize("seed", [0, 1])
def test_augmented_samples_always_carry_a_bool_valid_mask_of_the_patch(seed):
    config = TransformConfig(spacing=[6, 6, 6], patch_size=[32, 32, 32], prob_affine=1.0, prob_intensity=1.0,
                             prob_slab=0.5, slab_slices=[6, 10], sampling="pos_neg")
    augment = augment_transforms(config)
    augment.set_random_state(seed=seed)
    out = augment(_case((36, 36, 30)))
    out = out[0] if isinstance(out, list) else out
    assert out["valid"].dtype == torch.bool and out["valid"].shape == (1, 32, 32, 32)
    assert out["image"].shape == out["label"].shape == (1, 32, 32, 32)
    assert bool(out["valid"].any())


class _OneCase:
    """A training source holding one preprocessed case."""

    weight = 1.0

    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 1

    def case(self, index):
        return self.item


def test_slab_config_gives_training_samples_padded_along_the_slab_axis():
    from MoMESegmentationLib.training.datasets import TrainingSamples

    config = config_from_dict({
        "data": {"datasets": [{"kind": "phantoms"}]},
        "transforms": {"spacing": [6, 6, 6], "patch_size": [32, 32, 32], "prob_slab": 1.0, "slab_slices": [6, 10],
                       "prob_affine": 0.0, "prob_fov": 0.0, "sampling": "class_balanced"},
    }).transforms
    samples = TrainingSamples([_OneCase(_case((36, 36, 40)))], {"liver": [0]}, config, prompts_per_sample=1,
                              positive_fraction=1.0, seed=0)
    for key in range(3):
        sample = samples[key]
        valid = sample["valid"]
        assert valid.dtype == torch.bool and valid.shape == (1, 32, 32, 32)
        assert sample["image"].shape == (1, 32, 32, 32) and sample["target"].shape == (1, 32, 32, 32)
        slices = _valid_slices(valid)
        n = int(slices.sum())
        assert 6 <= n <= 10
        first = int(slices.nonzero()[0])
        assert slices[first:first + n].all() and first == (32 - n) // 2  # centred, padding on both sides
        assert not valid[..., :first].any() and not valid[..., first + n:].any()
        assert sample["image"][0, :, :, :first].any()  # the slab cuts the body: mirrored, not air


@pytest.mark.parametrize("transforms, setting", [
    ({"pad_mode": "reflect"}, "pad_mode"),
    ({"pad_mode": ""}, "pad_mode"),
    ({"slab_slices": [0, 5]}, "slab_slices"),
    ({"slab_slices": [12, 5]}, "slab_slices"),
    ({"slab_slices": [5]}, "slab_slices"),
])
def test_config_rejects_bad_padding_and_slab_settings(transforms, setting):
    from MoMESegmentationLib.errors import MoMEError

    with pytest.raises(MoMEError, match=setting):
        config_from_dict({"data": {"datasets": [{"kind": "phantoms"}]}, "transforms": transforms})


def test_config_accepts_padding_and_slab_settings():
    config = config_from_dict({"data": {"datasets": [{"kind": "phantoms"}]},
                               "transforms": {"pad_mode": "constant", "slab_slices": [4, 4], "prob_slab": 0.3}})
    assert config.transforms.pad_mode == "constant" and config.transforms.slab_slices == [4, 4]
    assert TransformConfig().pad_mode == "mirror" and TransformConfig().prob_slab == 0.0
