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
