"""Prompt parsing, the bundled vocabulary's data and prompt resolution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from MoMESegmentationLib.errors import MoMEError, PromptError
from MoMESegmentationLib.vocabulary import (
    BODY_REGIONS,
    PROMPT_TEMPLATE,
    Group,
    Structure,
    Vocabulary,
    normalize,
    parse_prompts,
    terminology_entry,
)
from public_model_facts import UNIVERSAL_MODEL_CLASSES

# TotalSegmentator v2 'total' classes in label order (1..117).
TOTALSEGMENTATOR_TOTAL = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
    "adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right "
    "lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel "
    "duodenum colon urinary_bladder prostate kidney_cyst_left kidney_cyst_right sacrum vertebrae_S1 "
    "vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 vertebrae_T12 vertebrae_T11 "
    "vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 vertebrae_T4 "
    "vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
    "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk "
    "subclavian_artery_right subclavian_artery_left common_carotid_artery_right "
    "common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right "
    "atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein "
    "iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right "
    "scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right "
    "spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right "
    "gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left "
    "iliopsoas_right brain skull "
    + " ".join(f"rib_left_{i}" for i in range(1, 13))
    + " "
    + " ".join(f"rib_right_{i}" for i in range(1, 13))
    + " sternum costal_cartilages"
).split()


LEFT = {"scheme": "SCT", "code": "7771000", "meaning": "Left"}
RIGHT = {"scheme": "SCT", "code": "24028007", "meaning": "Right"}


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def ids(structures_or_matches) -> list[str]:
    return [getattr(s, "structure_id", None) or s.id for s in structures_or_matches]


# ---- parse_prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("liver", ["liver"]),
        ("liver, spleen", ["liver", "spleen"]),
        ("liver;spleen\nleft kidney", ["liver", "spleen", "left kidney"]),
        ("  Left   Kidney ,, ; \n aorta ", ["Left Kidney", "aorta"]),
        ("liver, Liver, LIVER, spleen, liver", ["liver", "spleen"]),
        ("spleen\r\nliver", ["spleen", "liver"]),
        ("portal vein and splenic vein", ["portal vein and splenic vein"]),
    ],
)
def test_parse_prompts(text, expected):
    assert parse_prompts(text) == expected


@pytest.mark.parametrize("text", ["", "   ", ",", " ; ,\n ", None])
def test_parse_prompts_empty_raises(text):
    with pytest.raises(PromptError, match="no prompt"):
        parse_prompts(text)


# ---- normalisation and lookup -----------------------------------------------------------------


@pytest.mark.parametrize(
    "variants",
    [
        ["L kidney", "kidney left", "left kidney", "lt kidney", "kidney (left)", "kidney_left", "LEFT  KIDNEY", "Left-kidney"],
        ["R kidney", "kidney right", "Rt. kidney", "kidney_right", "right kidney"],
        ["L3 vertebra", "l 3 vertebra", "vertebrae_L3", "vertebra L3", "L3-vertebrae"],
        ["kidneys", "kidney", "Kidneys"],
    ],
)
def test_normalize_equivalent_spellings(variants):
    assert len({normalize(v) for v in variants}) == 1


def test_normalize_keeps_sides_apart():
    assert normalize("left kidney") != normalize("right kidney")
    assert normalize("left kidney") != normalize("kidney")
    assert normalize("L3") != normalize("left 3")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("liver", ["liver"]),
        ("hepatic", ["liver"]),
        ("Livers", ["liver"]),
        ("L kidney", ["kidney_left"]),
        ("left renal", ["kidney_left"]),
        ("kidney (left)", ["kidney_left"]),
        ("Rt kidney", ["kidney_right"]),
        ("IVC", ["inferior_vena_cava"]),
        ("postcava", ["inferior_vena_cava"]),
        ("Inferior Vena Cava", ["inferior_vena_cava"]),
        ("L3", ["vertebrae_L3"]),
        ("L3 vertebra", ["vertebrae_L3"]),
        ("third lumbar vertebra", ["vertebrae_L3"]),
        ("Th12", ["vertebrae_T12"]),
        ("gall bladder", ["gallbladder"]),
        ("gallbladder", ["gallbladder"]),
        ("urinary bladder", ["urinary_bladder"]),
        ("bladder", ["urinary_bladder"]),
        ("portal vein", ["portal_vein_and_splenic_vein"]),
        ("oesophagus", ["esophagus"]),
        ("left first rib", ["rib_left_1"]),
        ("12th rib right", ["rib_right_12"]),
        ("liver tumour", ["liver_tumor"]),
        ("tumor of the liver", ["liver_tumor"]),
        ("coeliac trunk", ["celiac_trunk"]),
        ("right femoral head", ["head_of_femur_right"]),
        ("left femur", ["femur_left"]),
        ("left lung", ["lung_left"]),
        ("LUL", ["lung_upper_lobe_left"]),
        ("kidneys", ["kidney_left", "kidney_right"]),
        ("both kidneys", ["kidney_left", "kidney_right"]),
        ("left and right kidney", ["kidney_left", "kidney_right"]),
        ("lumbar vertebrae", [f"vertebrae_L{i}" for i in range(1, 6)]),
        ("lumbar spine", [f"vertebrae_L{i}" for i in range(1, 6)]),
        ("T12-L2", ["vertebrae_T12", "vertebrae_L1", "vertebrae_L2"]),
        ("L2 to T12", ["vertebrae_T12", "vertebrae_L1", "vertebrae_L2"]),
        ("adrenal glands", ["adrenal_gland_left", "adrenal_gland_right"]),
        ("lungs", ["lung_left", "lung_right"]),
        ("banana", []),
        ("L99", []),
    ],
)
def test_lookup(vocab, prompt, expected):
    assert ids(vocab.lookup(prompt)) == expected


def test_group_sizes(vocab):
    assert len(vocab.lookup("ribs")) == 24
    assert len(vocab.lookup("left ribs")) == 12
    assert all(s.id.startswith("rib_left_") for s in vocab.lookup("left ribs"))
    assert len(vocab.lookup("vertebrae")) == 25
    assert len(vocab.lookup("thoracic spine")) == 12


def test_laterality_of_every_lateral_structure(vocab):
    """Every left/right structure is found by both word orders and abbreviations, never the other side."""
    lateral = [s for s in vocab if s.terminology["modifier"] in (LEFT, RIGHT) or s.id.endswith(("_left", "_right"))]
    assert len(lateral) > 40
    for structure in lateral:
        side = "left" if structure.id.endswith("_left") or "_left_" in structure.id else "right"
        other = "right" if side == "left" else "left"
        base = structure.name.lower().replace(side, "").strip()
        for prompt in (structure.name, f"{base} {side}", f"{base} ({side})", f"{side[0]} {base}", structure.id):
            found = ids(vocab.lookup(prompt))
            assert found == [structure.id], (prompt, found)
        assert structure.id not in ids(vocab.lookup(f"{other} {base}"))
        modifier = structure.terminology["modifier"] or structure.terminology["region_modifier"]
        if modifier is None:  # the side is part of the concept, e.g. "Middle lobe of right lung"
            assert side in structure.terminology["type"]["meaning"].lower(), structure.id
        else:
            assert modifier == (LEFT if side == "left" else RIGHT), structure.id


def test_every_name_and_synonym_finds_its_structure(vocab):
    for structure in vocab:
        for text in (structure.id, structure.name, *structure.synonyms):
            assert ids(vocab.lookup(text)) == [structure.id], text
    for group in vocab.groups.values():
        assert ids(vocab.lookup(group.name)) == list(group.members)


# ---- the bundled data ---------------------------------------------------------------------------


def test_all_totalsegmentator_classes_present(vocab):
    assert len(TOTALSEGMENTATOR_TOTAL) == 117
    assert set(TOTALSEGMENTATOR_TOTAL) <= set(vocab.ids)
    labels = vocab.totalsegmentator_classes()
    assert [labels[i].id for i in range(1, 118)] == TOTALSEGMENTATOR_TOTAL


def test_universal_model_classes(vocab):
    classes = vocab.universal_model_classes()
    assert [s.id for s in classes] == UNIVERSAL_MODEL_CLASSES
    assert [s.universal_model_index for s in classes] == list(range(32))
    assert vocab["liver"].universal_model_index == 5
    assert vocab["femur_left"].universal_model_index is None


def test_every_structure_has_terminology_and_colour(vocab):
    for structure in vocab:
        assert isinstance(structure, Structure)
        terms = structure.terminology
        for key in ("category", "type"):
            code = terms[key]
            assert code["scheme"] == "SCT" and code["code"].isdigit() and code["meaning"], (structure.id, key)
        for key in ("modifier", "region", "region_modifier"):
            assert terms[key] is None or (terms[key]["code"].isdigit() and terms[key]["meaning"]), structure.id
        assert terms["modifier"] in (None, LEFT, RIGHT)
        assert len(structure.color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in structure.color)
        assert structure.name and structure.name[0].isupper()


def test_known_codes(vocab):
    liver = vocab["liver"].terminology
    assert liver["category"]["code"] == "123037004" and liver["type"]["code"] == "10200004"
    assert vocab["kidney_left"].terminology["type"]["code"] == "64033007"
    assert vocab["kidney_left"].terminology["modifier"] == LEFT
    tumor = vocab["liver_tumor"].terminology
    assert tumor["category"]["code"] == "49755003" and tumor["type"]["code"] == "108369006"
    assert tumor["region"]["code"] == "10200004"
    assert vocab["vertebrae_L3"].terminology["type"]["code"] == "36470004"


def test_display_names_are_unique(vocab):
    names = [s.name.lower() for s in vocab]
    assert len(names) == len(set(names))


def test_parts_and_prompt_text(vocab):
    assert vocab["lung_left"].parts == ("lung_upper_lobe_left", "lung_lower_lobe_left")
    assert vocab["kidney_left"].prompt_text == PROMPT_TEMPLATE.format("left kidney")
    assert vocab["kidney_left"].prompt_text == "A computerized tomography of a left kidney."


def test_terminology_entry_format(vocab):
    entry = vocab["kidney_left"].terminology_entry
    fields = entry.split("~")
    assert len(fields) == 7
    assert fields[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^64033007^Kidney", "SCT^7771000^Left"]
    assert terminology_entry(vocab["liver_tumor"].terminology).split("~")[5] == "SCT^10200004^Liver"


def test_anatomical_priors(vocab):
    """Every structure names the body regions it lies in; organs with a meaningful size have a volume range."""
    for structure in vocab:
        assert structure.regions, structure.id
        assert set(structure.regions) <= set(BODY_REGIONS), structure.id
        assert list(structure.regions) == [r for r in BODY_REGIONS if r in structure.regions], structure.id
        if structure.volume_ml is not None:
            low, high = structure.volume_ml
            assert 0 <= low <= high, structure.id
    assert vocab["liver"].regions == ("chest", "abdomen")
    assert vocab["urinary_bladder"].regions == ("pelvis",)
    assert vocab["brain"].regions == ("head",)
    assert vocab["femur_left"].regions == ("pelvis", "legs")
    assert vocab["vertebrae_C1"].regions == ("head", "neck")
    assert vocab["vertebrae_C4"].regions == ("neck",)
    assert set(vocab["lung_left"].regions) == set(vocab["lung_upper_lobe_left"].regions) == {"chest"}
    low, high = vocab["liver"].volume_ml
    assert low <= 1500 <= high < 20000  # a typical adult liver fits; a 20 L one does not
    assert vocab["liver_tumor"].volume_ml is None


@pytest.mark.parametrize(
    "priors, message",
    [
        ({"regions": ["belly"]}, "regions"),
        ({"regions": ["chest", "chest"]}, "regions"),
        ({"volume_ml": [10]}, "volume_ml"),
        ({"volume_ml": [500, 100]}, "volume_ml"),
        ({"volume_ml": [-1, 100]}, "volume_ml"),
    ],
)
def test_bad_priors_rejected(repo_root, priors, message):
    document = json.loads((repo_root / "Resources" / "vocabulary.json").read_text())
    document["structures"] = [dict(s, **priors) for s in document["structures"] if s["id"] == "liver"]
    document["groups"] = []
    with pytest.raises(MoMEError, match=message):
        Vocabulary.from_dict(document)


def test_priors_are_optional(repo_root):
    document = json.loads((repo_root / "Resources" / "vocabulary.json").read_text())
    entry = next(s for s in document["structures"] if s["id"] == "liver")
    del entry["regions"], entry["volume_ml"]
    document["structures"], document["groups"] = [entry], []
    liver = Vocabulary.from_dict(document)["liver"]
    assert liver.regions == () and liver.volume_ml is None


def test_generator_matches_shipped_file(repo_root):
    script = repo_root / "scripts" / "build_vocabulary.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- resolve ------------------------------------------------------------------------------------


def test_resolve_exact_and_groups(vocab):
    matches = vocab.resolve(["liver", "kidneys", "left kidney", "L3"])
    assert ids(matches) == ["liver", "kidney_left", "kidney_right", "vertebrae_L3"]  # duplicate dropped
    assert all(m.exact and m.similarity == 1.0 for m in matches)
    assert matches[1].prompt == "kidneys" and matches[1].name == "Left kidney"
    assert ids(vocab.resolve("hepatic; IVC")) == ["liver", "inferior_vena_cava"]


def test_resolve_inexact_uses_callback(vocab):
    calls = []

    def similarity(prompt):
        calls.append(prompt)
        return "pancreas_tumor", 0.83

    (match,) = vocab.resolve(["mass in the head of the pancreas"], similarity=similarity)
    assert calls == ["mass in the head of the pancreas"]
    assert (match.structure_id, match.similarity, match.exact) == ("pancreas_tumor", 0.83, False)
    assert match.name == "mass in the head of the pancreas"
    (low,) = vocab.resolve(["something odd"], similarity=lambda p: ("liver", 0.1), min_similarity=0.5)
    assert low.structure_id is None and low.structure is None and not low.exact


def test_resolve_inexact_string_fallback(vocab):
    (match,) = vocab.resolve(["left kidny"])
    assert match.structure_id == "kidney_left" and not match.exact and 0.5 < match.similarity < 1.0


def test_resolve_allowed(vocab):
    allowed = set(TOTALSEGMENTATOR_TOTAL)
    assert ids(vocab.resolve(["left lung"], allowed=allowed)) == ["lung_upper_lobe_left", "lung_lower_lobe_left"]
    assert ids(vocab.resolve(["kidney cyst"], allowed=allowed)) == ["kidney_cyst_left", "kidney_cyst_right"]
    with pytest.raises(PromptError, match=r"'liver tumor'.*nearest it has: Liver \(liver\)"):
        vocab.resolve(["liver tumor"], allowed=allowed)
    with pytest.raises(PromptError, match=r"'bannana'.*nearest it has"):
        vocab.resolve(["bannana"], allowed=allowed)
    um = set(UNIVERSAL_MODEL_CLASSES)
    assert ids(vocab.resolve(["kidneys"], allowed=um)) == ["kidney_left", "kidney_right"]
    # a group keeps the members the model has
    assert ids(vocab.resolve(["lumbar spine"], allowed={"vertebrae_L1", "liver"})) == ["vertebrae_L1"]
    with pytest.raises(PromptError) as info:
        vocab.resolve(["left femur"], allowed=um)
    assert "\n" not in str(info.value) and "Left head of femur" in str(info.value)


@pytest.mark.parametrize("prompts", [[""], ["liver", "   "]])
def test_resolve_empty_prompt_raises(vocab, prompts):
    with pytest.raises(PromptError, match="empty prompt"):
        vocab.resolve(prompts)


# ---- loading and validation -----------------------------------------------------------------------


def _structure(sid, name, synonyms=()):
    code = {"scheme": "SCT", "code": "1", "meaning": "x"}
    return Structure(sid, name, tuple(synonyms), (1, 2, 3), {"category": code, "type": code, "modifier": None})


def test_ambiguous_synonym_rejected():
    with pytest.raises(ValueError, match="ambiguous"):
        Vocabulary([_structure("alpha", "Alpha", ["thing"]), _structure("beta", "Beta", ["Things"])])
    with pytest.raises(ValueError, match="unknown structures"):
        Vocabulary([_structure("alpha", "Alpha")], [Group("gamma", "Gamma", (), ("alpha", "zzz"))])
    with pytest.raises(ValueError, match="normalises to nothing"):
        Vocabulary([_structure("alpha", "The")])


def test_load_errors(tmp_path):
    with pytest.raises(MoMEError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoMEError, match="bad.json"):
        Vocabulary.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "mome-vocabulary", "structures": [{"id": "x", "name": "X"}]}))
    with pytest.raises(MoMEError, match="invalid vocabulary"):
        Vocabulary.load(wrong)


def test_load_custom_file_roundtrip(tmp_path, vocab, repo_root):
    document = json.loads((repo_root / "Resources" / "vocabulary.json").read_text())
    document["structures"] = [s for s in document["structures"] if s["id"] in ("liver", "spleen")]
    document["groups"] = []
    path = tmp_path / "small.json"
    path.write_text(json.dumps(document))
    small = Vocabulary.load(path)
    assert small.ids == ["spleen", "liver"] and len(small) == 2 and "liver" in small
    assert small["liver"] == vocab["liver"]
    with pytest.raises(KeyError, match="kidney_left"):
        small["kidney_left"]


def test_module_imports_without_torch():
    code = (
        "import sys; import MoMESegmentationLib.vocabulary as v; v.Vocabulary.load(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
