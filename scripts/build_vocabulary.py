#!/usr/bin/env python3
"""Generate ``Resources/vocabulary.json``: the structures and groups that prompts resolve to.

The shipped JSON is self-contained; this script records where its facts come from and
rebuilds it deterministically::

    python scripts/build_vocabulary.py            # writes Resources/vocabulary.json
    python scripts/build_vocabulary.py --check    # exits 1 if the file is out of date

Sources (public facts, transcribed into the tables below):

* Structure ids and label values: TotalSegmentator v2, task ``total`` (117 classes).
* SNOMED CT codes and colours: the TotalSegmentator-to-SNOMED mapping table shipped with
  3D Slicer's TotalSegmentator extension (``totalsegmentator_snomed_mapping.csv``); the
  meaning of 75297007 is spelled "Gluteus minimus muscle" here.
* Colours missing from that table: the ``recommendedDisplayRGBValue`` of the same SNOMED type
  in Slicer's terminology files (``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json``
  and ``-DICOM-Master.json``); failing that, the colour of the enclosing structure (S1 vertebra:
  sacrum; left atrial appendage: heart; rectum: colon; head of femur: femur) or of the tissue
  class (artery, vein, cartilage, mass).
* Universal Model classes (CLIP-Driven Universal Model, 32 classes) in the order of its
  output channels; ``universal_model_index`` is that channel.
* Anatomical priors of the plausibility guard (``regions``, ``volume_ml``): general adult anatomy,
  written down generously; see the comment above ``STRUCTURE_REGIONS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCT_ANATOMY = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
SCT_ALTERED = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}
SIDES = {
    "L": {"scheme": "SCT", "code": "7771000", "meaning": "Left"},
    "R": {"scheme": "SCT", "code": "24028007", "meaning": "Right"},
}
SIDE_WORD = {"L": "left", "R": "right"}

# Slicer General Anatomy tissue colours used where no structure colour is recommended.
ARTERY = (216, 101, 79)
VEIN = (0, 151, 206)
CARTILAGE = (111, 184, 210)
MASS = (144, 238, 144)
CYST = (205, 205, 100)
LUNG = (197, 165, 145)

# TotalSegmentator 'total' classes in label order (label value = position + 1):
# (id, SNOMED type code, type meaning, side, colour from the mapping table or None).
TOTALSEGMENTATOR_TOTAL = [
    ('spleen', '78961009', 'Spleen', None, (157, 108, 162)),
    ('kidney_right', '64033007', 'Kidney', 'R', (212, 126, 151)),
    ('kidney_left', '64033007', 'Kidney', 'L', (212, 126, 151)),
    ('gallbladder', '28231008', 'Gallbladder', None, (139, 150, 98)),
    ('liver', '10200004', 'Liver', None, (221, 130, 101)),
    ('stomach', '69695003', 'Stomach', None, (160, 139, 76)),
    ('pancreas', '15776009', 'Pancreas', None, (249, 180, 111)),
    ('adrenal_gland_right', '23451007', 'Adrenal gland', 'R', (199, 27, 27)),
    ('adrenal_gland_left', '23451007', 'Adrenal gland', 'L', (199, 27, 27)),
    ('lung_upper_lobe_left', '45653009', 'Upper lobe of lung', 'L', (112, 162, 95)),
    ('lung_lower_lobe_left', '90572001', 'Lower lobe of lung', 'L', (242, 150, 232)),
    ('lung_upper_lobe_right', '45653009', 'Upper lobe of lung', 'R', (173, 69, 44)),
    ('lung_middle_lobe_right', '72481006', 'Middle lobe of right lung', None, (202, 164, 140)),
    ('lung_lower_lobe_right', '90572001', 'Lower lobe of lung', 'R', (212, 191, 32)),
    ('esophagus', '32849002', 'Esophagus', None, (211, 171, 143)),
    ('trachea', '44567001', 'Trachea', None, (182, 228, 255)),
    ('thyroid_gland', '69748006', 'Thyroid gland', None, None),
    ('small_bowel', '30315005', 'Small Intestine', None, (205, 167, 142)),
    ('duodenum', '38848004', 'Duodenum', None, (255, 253, 229)),
    ('colon', '71854001', 'Colon', None, (204, 168, 143)),
    ('urinary_bladder', '89837001', 'Urinary bladder', None, (222, 154, 132)),
    ('prostate', '41216001', 'Prostate', None, None),
    ('kidney_cyst_left', '367643001', 'Cyst', None, None),
    ('kidney_cyst_right', '367643001', 'Cyst', None, None),
    ('sacrum', '54735007', 'Sacrum', None, (163, 140, 140)),
    ('vertebrae_S1', '65985001', 'S1 vertebra', None, None),
    ('vertebrae_L5', '49668003', 'L5 vertebra', None, (117, 78, 55)),
    ('vertebrae_L4', '11994002', 'L4 vertebra', None, (255, 255, 128)),
    ('vertebrae_L3', '36470004', 'L3 vertebra', None, (157, 126, 0)),
    ('vertebrae_L2', '14293000', 'L2 vertebra', None, (255, 144, 32)),
    ('vertebrae_L1', '66794005', 'L1 vertebra', None, (255, 255, 1)),
    ('vertebrae_T12', '23215003', 'T12 vertebra', None, (166, 89, 255)),
    ('vertebrae_T11', '12989004', 'T11 vertebra', None, (16, 164, 144)),
    ('vertebrae_T10', '7610001', 'T10 vertebra', None, (26, 97, 228)),
    ('vertebrae_T9', '82687006', 'T9 vertebra', None, (96, 188, 62)),
    ('vertebrae_T8', '11068009', 'T8 vertebra', None, (164, 216, 199)),
    ('vertebrae_T7', '62487009', 'T7 vertebra', None, (109, 0, 145)),
    ('vertebrae_T6', '45296009', 'T6 vertebra', None, (88, 119, 255)),
    ('vertebrae_T5', '56401006', 'T5 vertebra', None, (8, 82, 73)),
    ('vertebrae_T4', '73071006', 'T4 vertebra', None, (73, 228, 202)),
    ('vertebrae_T3', '1626008', 'T3 vertebra', None, (30, 128, 188)),
    ('vertebrae_T2', '53733008', 'T2 vertebra', None, (141, 186, 216)),
    ('vertebrae_T1', '64864005', 'T1 vertebra', None, (0, 2, 145)),
    ('vertebrae_C7', '87391001', 'C7 vertebra', None, (255, 0, 0)),
    ('vertebrae_C6', '36054005', 'C6 vertebra', None, (253, 134, 125)),
    ('vertebrae_C5', '36978003', 'C5 vertebra', None, (118, 40, 9)),
    ('vertebrae_C4', '5329002', 'C4 vertebra', None, (250, 14, 116)),
    ('vertebrae_C3', '113205007', 'C3 vertebra', None, (167, 117, 152)),
    ('vertebrae_C2', '39976000', 'C2 vertebra', None, (193, 99, 36)),
    ('vertebrae_C1', '14806007', 'C1 vertebra', None, (255, 186, 107)),
    ('heart', '80891009', 'Heart', None, None),
    ('aorta', '15825003', 'Aorta', None, (224, 97, 76)),
    ('pulmonary_vein', '122972007', 'Pulmonary vein', None, None),
    ('brachiocephalic_trunk', '12691009', 'Brachiocephalic artery', None, None),
    ('subclavian_artery_right', '29700009', 'Subclavian artery', 'R', None),
    ('subclavian_artery_left', '29700009', 'Subclavian artery', 'L', None),
    ('common_carotid_artery_right', '32062004', 'Common carotid artery', 'R', None),
    ('common_carotid_artery_left', '32062004', 'Common carotid artery', 'L', None),
    ('brachiocephalic_vein_left', '8887007', 'Brachiocephalic vein', 'L', None),
    ('brachiocephalic_vein_right', '8887007', 'Brachiocephalic vein', 'R', None),
    ('atrial_appendage_left', '68786006', 'Auricular appendage', 'L', None),
    ('superior_vena_cava', '48345005', 'Superior vena cava', None, None),
    ('inferior_vena_cava', '64131007', 'Inferior vena cava', None, (110, 165, 54)),
    ('portal_vein_and_splenic_vein', '110765007', 'Portal vein and splenic vein', None, (0, 151, 206)),
    ('iliac_artery_left', '73634005', 'Common iliac artery', 'L', (217, 162, 48)),
    ('iliac_artery_right', '73634005', 'Common iliac artery', 'R', (217, 162, 48)),
    ('iliac_vena_left', '46027005', 'Common iliac vein', 'L', (197, 174, 37)),
    ('iliac_vena_right', '46027005', 'Common iliac vein', 'R', (197, 174, 37)),
    ('humerus_left', '85050009', 'Humerus', 'L', (95, 229, 185)),
    ('humerus_right', '85050009', 'Humerus', 'R', (95, 229, 185)),
    ('scapula_left', '79601000', 'Scapula', 'L', (199, 204, 131)),
    ('scapula_right', '79601000', 'Scapula', 'R', (199, 204, 131)),
    ('clavicula_left', '51299004', 'Clavicle', 'L', (241, 188, 38)),
    ('clavicula_right', '51299004', 'Clavicle', 'R', (241, 188, 38)),
    ('femur_left', '71341001', 'Femur', 'L', (130, 222, 207)),
    ('femur_right', '71341001', 'Femur', 'R', (130, 222, 207)),
    ('hip_left', '29836001', 'Hip', 'L', (241, 214, 145)),
    ('hip_right', '29836001', 'Hip', 'R', (241, 214, 145)),
    ('spinal_cord', '2748008', 'Spinal cord', None, None),
    ('gluteus_maximus_left', '181674001', 'Gluteus maximus muscle', 'L', (192, 104, 88)),
    ('gluteus_maximus_right', '181674001', 'Gluteus maximus muscle', 'R', (192, 104, 88)),
    ('gluteus_medius_left', '78333006', 'Gluteus medius muscle', 'L', (192, 104, 88)),
    ('gluteus_medius_right', '78333006', 'Gluteus medius muscle', 'R', (192, 104, 88)),
    ('gluteus_minimus_left', '75297007', 'Gluteus minius muscle', 'L', (192, 104, 88)),
    ('gluteus_minimus_right', '75297007', 'Gluteus minius muscle', 'R', (192, 104, 88)),
    ('autochthon_left', '244849004', 'Deep muscle of back', 'L', (192, 104, 88)),
    ('autochthon_right', '244849004', 'Deep muscle of back', 'R', (192, 104, 88)),
    ('iliopsoas_left', '68455001', 'Iliopsoas muscle', 'L', (192, 104, 88)),
    ('iliopsoas_right', '68455001', 'Iliopsoas muscle', 'R', (192, 104, 88)),
    ('brain', '12738006', 'Brain', None, (250, 250, 225)),
    ('skull', '89546000', 'Skull', None, None),
    ('rib_left_1', '48535007', 'First rib', 'L', (0, 2, 145)),
    ('rib_left_2', '78247007', 'Second rib', 'L', (141, 186, 216)),
    ('rib_left_3', '25888004', 'Third rib', 'L', (30, 128, 188)),
    ('rib_left_4', '25523003', 'Fourth rib', 'L', (73, 228, 202)),
    ('rib_left_5', '15339008', 'Fifth rib', 'L', (8, 82, 73)),
    ('rib_left_6', '59558009', 'Sixth rib', 'L', (88, 119, 255)),
    ('rib_left_7', '24915002', 'Seventh rib', 'L', (109, 0, 145)),
    ('rib_left_8', '5953002', 'Eighth rib', 'L', (164, 216, 199)),
    ('rib_left_9', '22565002', 'Ninth rib', 'L', (96, 188, 62)),
    ('rib_left_10', '77644006', 'Tenth rib', 'L', (26, 97, 228)),
    ('rib_left_11', '58830002', 'Eleventh rib', 'L', (16, 164, 144)),
    ('rib_left_12', '43993008', 'Twelfth rib', 'L', (166, 89, 255)),
    ('rib_right_1', '48535007', 'First rib', 'R', (0, 2, 145)),
    ('rib_right_2', '78247007', 'Second rib', 'R', (141, 186, 216)),
    ('rib_right_3', '25888004', 'Third rib', 'R', (30, 128, 188)),
    ('rib_right_4', '25523003', 'Fourth rib', 'R', (73, 228, 202)),
    ('rib_right_5', '15339008', 'Fifth rib', 'R', (8, 82, 73)),
    ('rib_right_6', '59558009', 'Sixth rib', 'R', (88, 119, 255)),
    ('rib_right_7', '24915002', 'Seventh rib', 'R', (109, 0, 145)),
    ('rib_right_8', '5953002', 'Eighth rib', 'R', (164, 216, 199)),
    ('rib_right_9', '22565002', 'Ninth rib', 'R', (96, 188, 62)),
    ('rib_right_10', '77644006', 'Tenth rib', 'R', (26, 97, 228)),
    ('rib_right_11', '58830002', 'Eleventh rib', 'R', (16, 164, 144)),
    ('rib_right_12', '43993008', 'Twelfth rib', 'R', (166, 89, 255)),
    ('sternum', '56873002', 'Sternum', None, None),
    ('costal_cartilages', '50016007', 'Costal cartilage', None, None),
]

# Colours for classes the mapping table leaves without one (see module docstring).
FILL_COLORS = {
    "thyroid_gland": (62, 162, 114),
    "prostate": (230, 158, 140),
    "kidney_cyst_left": CYST,
    "kidney_cyst_right": CYST,
    "vertebrae_S1": (163, 140, 140),
    "heart": (206, 110, 84),
    "pulmonary_vein": (186, 77, 64),
    "brachiocephalic_trunk": ARTERY,
    "subclavian_artery_right": ARTERY,
    "subclavian_artery_left": ARTERY,
    "common_carotid_artery_right": ARTERY,
    "common_carotid_artery_left": ARTERY,
    "brachiocephalic_vein_left": VEIN,
    "brachiocephalic_vein_right": VEIN,
    "atrial_appendage_left": (206, 110, 84),
    "superior_vena_cava": VEIN,
    "spinal_cord": (244, 214, 49),
    "skull": (241, 213, 144),
    "sternum": (244, 217, 154),
    "costal_cartilages": CARTILAGE,
}

MEANING_FIXES = {"75297007": "Gluteus minimus muscle"}

# Display names where "<Side> <type meaning>" does not read well.
DISPLAY_NAMES = {
    "small_bowel": "Small bowel",
    "kidney_cyst_left": "Left kidney cyst",
    "kidney_cyst_right": "Right kidney cyst",
    "brachiocephalic_trunk": "Brachiocephalic trunk",
    "atrial_appendage_left": "Left atrial appendage",
    "autochthon_left": "Left autochthonous back muscle",
    "autochthon_right": "Right autochthonous back muscle",
    "hip_left": "Left hip bone",
    "hip_right": "Right hip bone",
    "costal_cartilages": "Costal cartilages",
}

# Synonyms and clinical phrasings of the side-free concept. For lateral structures each is
# prefixed with the side ("renal" -> "left renal"); prompt normalisation takes care of word
# order, abbreviations (L/Lt/R/Rt), plurals, punctuation and case.
CONCEPT_SYNONYMS = {
    "spleen": ["splenic", "lien"],
    "kidney": ["kidney", "renal"],
    "gallbladder": ["gall bladder", "cholecyst"],
    "liver": ["hepatic", "hepar", "liver parenchyma", "hepatic parenchyma"],
    "stomach": ["gastric"],
    "pancreas": ["pancreatic", "pancreas gland"],
    "adrenal_gland": ["adrenal gland", "adrenal", "suprarenal gland", "suprarenal"],
    "lung_upper_lobe": ["upper lobe", "upper lung lobe", "upper pulmonary lobe"],
    "lung_lower_lobe": ["lower lobe", "lower lung lobe", "lower pulmonary lobe"],
    "esophagus": ["oesophagus", "esophageal", "gullet"],
    "trachea": ["windpipe", "tracheal"],
    "thyroid_gland": ["thyroid"],
    "small_bowel": ["small intestine", "jejunum and ileum", "small gut"],
    "duodenum": ["duodenal"],
    "colon": ["large bowel", "large intestine", "colonic"],
    "urinary_bladder": ["bladder", "vesica urinaria"],
    "prostate": ["prostate gland", "prostatic"],
    "kidney_cyst": ["kidney cyst", "renal cyst"],
    "sacrum": ["sacral bone", "os sacrum"],
    "heart": ["cardiac"],
    "aorta": ["aortic", "arota"],
    "pulmonary_vein": ["pulmonary venous"],
    "brachiocephalic_trunk": ["brachiocephalic artery", "innominate artery"],
    "subclavian_artery": ["subclavian artery", "subclavian"],
    "common_carotid_artery": ["common carotid artery", "carotid artery", "common carotid", "carotid"],
    "brachiocephalic_vein": ["brachiocephalic vein", "innominate vein"],
    "superior_vena_cava": ["SVC", "superior caval vein"],
    "inferior_vena_cava": ["IVC", "postcava", "inferior caval vein", "vena cava inferior"],
    "portal_vein_and_splenic_vein": [
        "portal vein", "splenic vein", "portal and splenic vein", "splenoportal vein",
        "portal vein and splenic vein",
    ],
    "iliac_artery": ["common iliac artery", "iliac artery"],
    "iliac_vena": ["common iliac vein", "iliac vein"],
    "humerus": ["humerus", "humeral bone", "upper arm bone"],
    "scapula": ["scapula", "shoulder blade"],
    "clavicula": ["clavicle", "collarbone", "collar bone"],
    "femur": ["femur", "femoral bone", "thigh bone", "thighbone"],
    "hip": ["hip", "hip bone", "os coxae", "coxal bone", "innominate bone", "pelvic bone"],
    "spinal_cord": ["medulla spinalis"],
    "gluteus_maximus": ["gluteus maximus", "gluteus maximus muscle"],
    "gluteus_medius": ["gluteus medius", "gluteus medius muscle"],
    "gluteus_minimus": ["gluteus minimus", "gluteus minimus muscle"],
    "autochthon": [
        "autochthon", "autochthonous muscle", "autochthonous back muscle", "deep back muscle",
        "erector spinae", "paraspinal muscle",
    ],
    "iliopsoas": ["iliopsoas", "iliopsoas muscle", "psoas", "psoas muscle"],
    "brain": ["encephalon", "cerebral"],
    "skull": ["cranium"],
    "sternum": ["breastbone", "breast bone"],
    "costal_cartilages": ["costal cartilage", "rib cartilage"],
    # Universal Model classes that TotalSegmentator lacks.
    "hepatic_vessel": [
        "hepatic vessel", "liver vessel", "hepatic vasculature", "liver vasculature",
        "intrahepatic vessel",
    ],
    "lung": ["lung", "lung field"],
    "intestine": ["intestines", "bowel", "gut"],
    "rectum": ["rectal"],
    "head_of_femur": ["head of femur", "femoral head", "femur head", "caput femoris"],
    "celiac_trunk": ["celiac artery", "celiac axis", "coeliac trunk", "truncus coeliacus", "celiac truck"],
    "kidney_tumor": [
        "renal tumor", "kidney cancer", "renal cancer", "kidney mass", "renal mass",
        "kidney neoplasm", "renal neoplasm", "renal cell carcinoma", "RCC",
    ],
    "liver_tumor": [
        "hepatic tumor", "liver cancer", "liver lesion", "hepatic lesion", "liver mass",
        "hepatic mass", "liver neoplasm", "hepatic neoplasm", "hepatocellular carcinoma", "HCC",
        "liver metastasis",
    ],
    "pancreas_tumor": [
        "pancreatic tumor", "pancreatic cancer", "pancreatic mass", "pancreatic lesion",
        "pancreatic neoplasm", "pancreatic adenocarcinoma", "PDAC",
    ],
    "hepatic_vessel_tumor": ["liver vessel tumor", "hepatic vascular tumor", "vessel tumor"],
    "lung_tumor": [
        "lung cancer", "lung nodule", "lung mass", "lung lesion", "lung neoplasm",
        "pulmonary nodule", "pulmonary tumor", "pulmonary mass", "pulmonary neoplasm",
    ],
    "colon_tumor": [
        "colonic tumor", "colon cancer", "colon mass", "colon lesion", "colon neoplasm",
        "colorectal cancer", "colorectal tumor",
    ],
}

# Synonyms used verbatim (abbreviations that carry the side themselves).
STRUCTURE_SYNONYMS = {
    "lung_upper_lobe_left": ["LUL"],
    "lung_lower_lobe_left": ["LLL"],
    "lung_upper_lobe_right": ["RUL"],
    "lung_lower_lobe_right": ["RLL"],
    "lung_middle_lobe_right": ["right middle lobe", "middle lobe", "middle lung lobe", "RML"],
    "atrial_appendage_left": ["left auricle", "left auricular appendage", "LAA"],
}

ORDINALS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth",
]
SPINE_REGIONS = {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "sacral"}

# Universal Model output channels (its own class names, in order) -> our structure id.
UNIVERSAL_MODEL = [
    ("Spleen", "spleen"),
    ("Right Kidney", "kidney_right"),
    ("Left Kidney", "kidney_left"),
    ("Gall Bladder", "gallbladder"),
    ("Esophagus", "esophagus"),
    ("Liver", "liver"),
    ("Stomach", "stomach"),
    ("Aorta", "aorta"),
    ("Postcava", "inferior_vena_cava"),
    ("Portal Vein and Splenic Vein", "portal_vein_and_splenic_vein"),
    ("Pancreas", "pancreas"),
    ("Right Adrenal Gland", "adrenal_gland_right"),
    ("Left Adrenal Gland", "adrenal_gland_left"),
    ("Duodenum", "duodenum"),
    ("Hepatic Vessel", "hepatic_vessel"),
    ("Right Lung", "lung_right"),
    ("Left Lung", "lung_left"),
    ("Colon", "colon"),
    ("Intestine", "intestine"),
    ("Rectum", "rectum"),
    ("Bladder", "urinary_bladder"),
    ("Prostate", "prostate"),
    ("Left Head of Femur", "head_of_femur_left"),
    ("Right Head of Femur", "head_of_femur_right"),
    ("Celiac Trunk", "celiac_trunk"),
    ("Kidney Tumor", "kidney_tumor"),
    ("Liver Tumor", "liver_tumor"),
    ("Pancreas Tumor", "pancreas_tumor"),
    ("Hepatic Vessel Tumor", "hepatic_vessel_tumor"),
    ("Lung Tumor", "lung_tumor"),
    ("Colon Tumor", "colon_tumor"),
    ("Kidney Cyst", "kidney_cyst"),
]


def _code(code: str, meaning: str) -> dict:
    return {"scheme": "SCT", "code": code, "meaning": meaning}


def _terminology(category, type_, side=None, region=None, region_side=None) -> dict:
    return {
        "category": category,
        "type": type_,
        "modifier": SIDES[side] if side else None,
        "region": region,
        "region_modifier": SIDES[region_side] if region_side else None,
    }


# Universal Model classes without a TotalSegmentator counterpart:
# id -> (display name, terminology, colour, parts, concept for synonyms).
LIVER = _code("10200004", "Liver")
KIDNEY = _code("64033007", "Kidney")
NEOPLASM = _code("108369006", "Neoplasm")
UNIVERSAL_MODEL_EXTRA = {
    "hepatic_vessel": ("Hepatic vessels", _terminology(SCT_ANATOMY, _code("59820001", "Blood vessel"), region=LIVER), VEIN, (), "hepatic_vessel"),
    "lung_right": ("Right lung", _terminology(SCT_ANATOMY, _code("39607008", "Lung"), "R"), LUNG, ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"), "lung"),
    "lung_left": ("Left lung", _terminology(SCT_ANATOMY, _code("39607008", "Lung"), "L"), LUNG, ("lung_upper_lobe_left", "lung_lower_lobe_left"), "lung"),
    "intestine": ("Intestine", _terminology(SCT_ANATOMY, _code("113276009", "Intestine")), (205, 167, 142), (), "intestine"),
    "rectum": ("Rectum", _terminology(SCT_ANATOMY, _code("34402009", "Rectum")), (204, 168, 143), (), "rectum"),
    "head_of_femur_left": ("Left head of femur", _terminology(SCT_ANATOMY, _code("2812003", "Head of femur"), "L"), (130, 222, 207), (), "head_of_femur"),
    "head_of_femur_right": ("Right head of femur", _terminology(SCT_ANATOMY, _code("2812003", "Head of femur"), "R"), (130, 222, 207), (), "head_of_femur"),
    "celiac_trunk": ("Celiac trunk", _terminology(SCT_ANATOMY, _code("57850000", "Celiac artery")), ARTERY, (), "celiac_trunk"),
    "kidney_tumor": ("Kidney tumor", _terminology(SCT_ALTERED, NEOPLASM, region=KIDNEY), MASS, (), "kidney_tumor"),
    "liver_tumor": ("Liver tumor", _terminology(SCT_ALTERED, NEOPLASM, region=LIVER), MASS, (), "liver_tumor"),
    "pancreas_tumor": ("Pancreas tumor", _terminology(SCT_ALTERED, NEOPLASM, region=_code("15776009", "Pancreas")), MASS, (), "pancreas_tumor"),
    "hepatic_vessel_tumor": ("Hepatic vessel tumor", _terminology(SCT_ALTERED, NEOPLASM, region=LIVER), MASS, (), "hepatic_vessel_tumor"),
    "lung_tumor": ("Lung tumor", _terminology(SCT_ALTERED, NEOPLASM, region=_code("39607008", "Lung")), MASS, (), "lung_tumor"),
    "colon_tumor": ("Colon tumor", _terminology(SCT_ALTERED, NEOPLASM, region=_code("71854001", "Colon")), MASS, (), "colon_tumor"),
    "kidney_cyst": ("Kidney cyst", _terminology(SCT_ALTERED, _code("367643001", "Cyst"), region=KIDNEY), CYST, ("kidney_cyst_left", "kidney_cyst_right"), "kidney_cyst"),
}

VERTEBRAE = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"]


def _pair(base: str) -> list[str]:
    return [f"{base}_left", f"{base}_right"]


# Groups: a prompt that names a group expands into one prompt per member.
GROUPS = [
    ("kidneys", "Kidneys", ["both kidneys", "bilateral kidneys", "renal"], _pair("kidney")),
    ("adrenal_glands", "Adrenal glands", ["adrenals", "suprarenal glands"], _pair("adrenal_gland")),
    ("lungs", "Lungs", ["both lungs", "lung fields"], _pair("lung")),
    ("lung_lobes", "Lung lobes", ["pulmonary lobes", "lobes of lung"], [
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
        "lung_middle_lobe_right", "lung_lower_lobe_right"]),
    ("femurs", "Femurs", ["femora", "thigh bones"], _pair("femur")),
    ("heads_of_femur", "Heads of femur", ["femoral heads", "femur heads"], _pair("head_of_femur")),
    ("hips", "Hip bones", ["hips", "ossa coxae", "pelvic bones"], _pair("hip")),
    ("humeri", "Humeri", ["humeruses", "upper arm bones"], _pair("humerus")),
    ("scapulae", "Scapulae", ["shoulder blades", "scapulas"], _pair("scapula")),
    ("clavicles", "Clavicles", ["claviculae", "collarbones"], _pair("clavicula")),
    ("gluteus_maximus", "Gluteus maximus muscles", ["gluteus maximus"], _pair("gluteus_maximus")),
    ("gluteus_medius", "Gluteus medius muscles", ["gluteus medius"], _pair("gluteus_medius")),
    ("gluteus_minimus", "Gluteus minimus muscles", ["gluteus minimus"], _pair("gluteus_minimus")),
    ("gluteal_muscles", "Gluteal muscles", ["glutei", "gluteus muscles", "buttock muscles"],
     _pair("gluteus_maximus") + _pair("gluteus_medius") + _pair("gluteus_minimus")),
    ("autochthon", "Autochthonous back muscles", ["autochthon", "erector spinae", "deep back muscles", "paraspinal muscles"], _pair("autochthon")),
    ("iliopsoas", "Iliopsoas muscles", ["iliopsoas", "psoas"], _pair("iliopsoas")),
    ("iliac_arteries", "Common iliac arteries", ["iliac arteries"], _pair("iliac_artery")),
    ("iliac_veins", "Common iliac veins", ["iliac veins"], _pair("iliac_vena")),
    ("subclavian_arteries", "Subclavian arteries", ["subclavians"], ["subclavian_artery_left", "subclavian_artery_right"]),
    ("common_carotid_arteries", "Common carotid arteries", ["carotid arteries", "carotids"], ["common_carotid_artery_left", "common_carotid_artery_right"]),
    ("brachiocephalic_veins", "Brachiocephalic veins", ["innominate veins"], ["brachiocephalic_vein_left", "brachiocephalic_vein_right"]),
    ("ribs", "Ribs", ["all ribs", "rib cage bones"], [f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)]),
    ("ribs_left", "Left ribs", ["left ribs"], [f"rib_left_{i}" for i in range(1, 13)]),
    ("ribs_right", "Right ribs", ["right ribs"], [f"rib_right_{i}" for i in range(1, 13)]),
    ("cervical_vertebrae", "Cervical vertebrae", ["cervical spine", "C spine", "C1-C7"], [f"vertebrae_C{i}" for i in range(1, 8)]),
    ("thoracic_vertebrae", "Thoracic vertebrae", ["thoracic spine", "T spine", "dorsal spine", "T1-T12"], [f"vertebrae_T{i}" for i in range(1, 13)]),
    ("lumbar_vertebrae", "Lumbar vertebrae", ["lumbar spine", "L1-L5"], [f"vertebrae_L{i}" for i in range(1, 6)]),
    ("vertebrae", "Vertebrae", ["spine", "spinal column", "vertebral column", "all vertebrae"], [f"vertebrae_{v}" for v in VERTEBRAE]),
]


# --------------------------------------------------------------------------------------------
# Anatomical priors for the plausibility guard (MoMESegmentationLib.anatomy)
# --------------------------------------------------------------------------------------------
#
# ``regions``: the body regions (head, neck, chest, abdomen, pelvis, legs) whose axial slices an
# adult's structure occupies. The regions are the ones the guard reads off a CT: the chest is the
# slices that contain aerated lung, so organs under the diaphragm domes (liver, spleen, stomach,
# adrenals, kidneys' upper poles) also lie in "chest" slices; the abdomen runs from the lung bases
# to the iliac crests; the pelvis from the iliac crests to the ischial tuberosities; the legs below.
# The lists are deliberately wide (normal variants and common disease: ptotic, pelvic and
# transplanted kidneys, a dilated stomach, arms down along the trunk); the guard only catches
# gross errors such as a liver in a head CT.
#
# ``volume_ml``: a plausible adult range in millilitres, generous at the top so that disease fits
# (hepatomegaly, splenomegaly, polycystic kidneys, urinary retention, aneurysms, goitre). The guard
# uses only the upper bound, and only when a mask exceeds it by half again: a field of view that
# cuts an organ makes its mask small for good reasons. Typical values are from CT volumetry
# (e.g. a mean standard liver volume of about 1.5 L: Heinemann et al., Liver Transpl Surg 1999);
# the bounds themselves are rounded, deliberately loose estimates. None where no range means
# anything (tumours, cysts, vessels in a liver, bowel).
UPPER_ABDOMEN = ("chest", "abdomen")
WHOLE_ABDOMEN = ("chest", "abdomen", "pelvis")
LOWER_ABDOMEN = ("abdomen", "pelvis")

STRUCTURE_REGIONS = {
    "spleen": UPPER_ABDOMEN,
    "kidney": WHOLE_ABDOMEN,
    "gallbladder": UPPER_ABDOMEN,
    "liver": UPPER_ABDOMEN,
    "stomach": UPPER_ABDOMEN,
    "pancreas": UPPER_ABDOMEN,
    "adrenal_gland": UPPER_ABDOMEN,
    "lung_upper_lobe": ("chest",),
    "lung_lower_lobe": ("chest",),
    "lung_middle_lobe_right": ("chest",),
    "esophagus": ("neck", "chest", "abdomen"),
    "trachea": ("neck", "chest"),
    "thyroid_gland": ("neck", "chest"),
    "small_bowel": LOWER_ABDOMEN,
    "duodenum": UPPER_ABDOMEN,
    "colon": WHOLE_ABDOMEN,
    "urinary_bladder": ("pelvis",),
    "prostate": ("pelvis",),
    "kidney_cyst": WHOLE_ABDOMEN,
    "sacrum": ("pelvis",),
    "heart": ("chest",),
    "aorta": ("chest", "abdomen"),
    "pulmonary_vein": ("chest",),
    "brachiocephalic_trunk": ("neck", "chest"),
    "subclavian_artery": ("neck", "chest"),
    "common_carotid_artery": ("neck", "chest"),
    "brachiocephalic_vein": ("neck", "chest"),
    "atrial_appendage_left": ("chest",),
    "superior_vena_cava": ("chest",),
    "inferior_vena_cava": WHOLE_ABDOMEN,
    "portal_vein_and_splenic_vein": UPPER_ABDOMEN,
    "iliac_artery": LOWER_ABDOMEN,
    "iliac_vena": LOWER_ABDOMEN,
    "humerus": ("head", "neck", "chest", "abdomen"),  # arms up beside the head or down along the trunk
    "scapula": ("neck", "chest"),
    "clavicula": ("neck", "chest"),
    "femur": ("pelvis", "legs"),
    "hip": ("pelvis",),
    "spinal_cord": ("head", "neck", "chest", "abdomen", "pelvis"),  # with the dural sac below the conus
    "gluteus_maximus": ("pelvis", "legs"),
    "gluteus_medius": ("pelvis",),
    "gluteus_minimus": ("pelvis",),
    "autochthon": ("neck", "chest", "abdomen", "pelvis"),
    "iliopsoas": ("abdomen", "pelvis", "legs"),
    "brain": ("head",),
    "skull": ("head",),
    "sternum": ("chest",),
    "costal_cartilages": UPPER_ABDOMEN,
    # Universal Model classes that TotalSegmentator lacks.
    "hepatic_vessel": UPPER_ABDOMEN,
    "lung": ("chest",),
    "intestine": WHOLE_ABDOMEN,
    "rectum": ("pelvis",),
    "head_of_femur": ("pelvis",),
    "celiac_trunk": UPPER_ABDOMEN,
    "kidney_tumor": WHOLE_ABDOMEN,
    "liver_tumor": UPPER_ABDOMEN,
    "pancreas_tumor": UPPER_ABDOMEN,
    "hepatic_vessel_tumor": UPPER_ABDOMEN,
    "lung_tumor": ("chest",),
    "colon_tumor": WHOLE_ABDOMEN,
}

VERTEBRA_REGIONS = {
    **{f"C{i}": ("head", "neck") for i in (1, 2)},
    **{f"C{i}": ("neck",) for i in range(3, 7)},
    "C7": ("neck", "chest"),
    "T1": ("neck", "chest"),
    **{f"T{i}": ("chest",) for i in range(2, 10)},
    **{f"T{i}": UPPER_ABDOMEN for i in (10, 11, 12)},
    "L1": UPPER_ABDOMEN,
    "L2": ("abdomen",),
    "L3": ("abdomen",),
    "L4": LOWER_ABDOMEN,
    "L5": LOWER_ABDOMEN,
    "S1": ("pelvis",),
}


def _rib_regions(number: int) -> tuple[str, ...]:
    """First ribs reach above the lung apices; the lower ribs' anterior ends reach below the lung bases."""
    if number <= 2:
        return ("neck", "chest")
    return ("chest",) if number <= 6 else UPPER_ABDOMEN


# Plausible adult volume in mL (see above); the guard flags a mask above 1.5 x the upper bound.
STRUCTURE_VOLUME_ML = {
    "spleen": (50, 2000),
    "kidney": (60, 1500),
    "gallbladder": (0, 250),
    "liver": (700, 4000),
    "stomach": (0, 4000),
    "pancreas": (20, 250),
    "adrenal_gland": (1, 150),
    "lung_upper_lobe": (200, 3000),
    "lung_lower_lobe": (200, 3000),
    "lung_middle_lobe_right": (50, 1500),
    "esophagus": (5, 500),
    "trachea": (10, 200),
    "thyroid_gland": (3, 500),
    "small_bowel": (0, 6000),
    "duodenum": (0, 800),
    "colon": (0, 6000),
    "urinary_bladder": (0, 1500),
    "prostate": (5, 300),
    "sacrum": (40, 500),
    "heart": (200, 2000),
    "aorta": (30, 1000),
    "pulmonary_vein": (2, 200),
    "brachiocephalic_trunk": (1, 60),
    "subclavian_artery": (1, 60),
    "common_carotid_artery": (1, 50),
    "brachiocephalic_vein": (1, 80),
    "atrial_appendage_left": (1, 60),
    "superior_vena_cava": (3, 120),
    "inferior_vena_cava": (10, 400),
    "portal_vein_and_splenic_vein": (5, 300),
    "iliac_artery": (1, 200),
    "iliac_vena": (1, 200),
    "humerus": (50, 500),
    "scapula": (30, 400),
    "clavicula": (10, 120),
    "femur": (150, 1200),
    "hip": (100, 900),
    "spinal_cord": (10, 150),
    "gluteus_maximus": (100, 2500),
    "gluteus_medius": (50, 1000),
    "gluteus_minimus": (10, 400),
    "autochthon": (100, 2500),
    "iliopsoas": (50, 1500),
    "brain": (900, 1900),
    "skull": (200, 1500),
    "sternum": (10, 200),
    "costal_cartilages": (10, 500),
    "lung": (500, 6000),
    "rectum": (0, 800),
    "head_of_femur": (20, 200),
    "celiac_trunk": (0, 20),
}

VERTEBRA_VOLUME_ML = {"C": (2, 50), "T": (8, 120), "L": (20, 180), "S": (20, 180)}
RIB_VOLUME_ML = (1, 80)


def _priors(sid: str, concept: str | None) -> tuple[list[str], list[float] | None]:
    """The guard's (regions, volume range) of a structure, by its id or side-free concept."""
    if sid.startswith("vertebrae_"):
        level = sid.split("_", 1)[1]
        return list(VERTEBRA_REGIONS[level]), list(VERTEBRA_VOLUME_ML[level[0]])
    if sid.startswith("rib_"):
        return list(_rib_regions(int(sid.rsplit("_", 1)[1]))), list(RIB_VOLUME_ML)
    for key in (sid, concept):
        if key in STRUCTURE_REGIONS:
            volume = STRUCTURE_VOLUME_ML.get(key)
            return list(STRUCTURE_REGIONS[key]), None if volume is None else list(volume)
    raise KeyError(f"no anatomical priors for {sid!r}")


def _vertebra_synonyms(level: str) -> list[str]:
    region, number = level[0], int(level[1:])
    name = SPINE_REGIONS[region]
    out = [level, f"{level} vertebra", f"vertebra {level}", f"{level} vertebral body",
           f"{ORDINALS[number - 1]} {name} vertebra", f"{name} vertebra {number}"]
    out += {"C1": ["atlas"], "C2": ["axis"]}.get(level, [])
    return out


def build() -> dict:
    """Return the vocabulary document (see ``MoMESegmentationLib.vocabulary`` for its schema)."""
    um_index = {sid: i for i, (_, sid) in enumerate(UNIVERSAL_MODEL)}
    um_name = {sid: name for name, sid in UNIVERSAL_MODEL}
    structures = []
    for label, (sid, code, meaning, side, color) in enumerate(TOTALSEGMENTATOR_TOTAL, start=1):
        meaning = MEANING_FIXES.get(code, meaning)
        if sid.startswith("kidney_cyst_"):
            side = "L" if sid.endswith("left") else "R"
            terminology = _terminology(SCT_ALTERED, _code(code, meaning), region=KIDNEY, region_side=side)
            concept = "kidney_cyst"
        else:
            terminology = _terminology(SCT_ANATOMY, _code(code, meaning), side)
            concept = sid[: -len("_left")] if sid.endswith("_left") else sid[: -len("_right")] if sid.endswith("_right") else sid
        if sid in DISPLAY_NAMES:
            name = DISPLAY_NAMES[sid]
        elif side:
            name = f"{SIDE_WORD[side].capitalize()} {meaning[0].lower()}{meaning[1:]}"
        else:
            name = meaning
        if sid.startswith("rib_"):
            concept = None
        structures.append(_structure(sid, name, concept, side, color or FILL_COLORS[sid], terminology,
                                     um_index.get(sid), label, (), um_name.get(sid)))
    for sid, (name, terminology, color, parts, concept) in UNIVERSAL_MODEL_EXTRA.items():
        side = "L" if sid.endswith("_left") else "R" if sid.endswith("_right") else None
        structures.append(_structure(sid, name, concept, side, color, terminology,
                                     um_index[sid], None, parts, um_name[sid]))
    groups = [
        {"id": gid, "name": name, "synonyms": synonyms, "members": members}
        for gid, name, synonyms, members in GROUPS
    ]
    return {
        "format": "mome-vocabulary",
        "version": 1,
        "description": (
            "Structures that text prompts resolve to: the 117 TotalSegmentator v2 'total' classes "
            "plus the CLIP-Driven Universal Model's extra classes, with SNOMED CT terminology as 3D Slicer "
            "uses it and recommended colours. Generated by scripts/build_vocabulary.py."
        ),
        "universal_model_classes": len(UNIVERSAL_MODEL),
        "structures": structures,
        "groups": groups,
    }


def _structure(sid, name, concept, side, color, terminology, um_index, ts_label, parts, um_name) -> dict:
    synonyms: list[str] = []
    prefix = f"{SIDE_WORD[side]} " if side else ""
    synonyms += [prefix + synonym for synonym in CONCEPT_SYNONYMS.get(concept, [])]
    synonyms += STRUCTURE_SYNONYMS.get(sid, [])
    if sid.startswith("vertebrae_"):
        synonyms += _vertebra_synonyms(sid.split("_", 1)[1])
    if um_name and um_name.lower() != name.lower():
        synonyms.append(um_name)
    regions, volume_ml = _priors(sid, concept)
    seen = {name.lower()}
    unique = []
    for synonym in synonyms:
        if synonym.lower() not in seen:
            seen.add(synonym.lower())
            unique.append(synonym)
    return {
        "id": sid,
        "name": name,
        "synonyms": unique,
        "color": list(color),
        "terminology": terminology,
        "universal_model_index": um_index,
        "totalsegmentator_label": ts_label,
        "parts": list(parts),
        "regions": regions,
        "volume_ml": volume_ml,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "Resources" / "vocabulary.json")
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    args = parser.parse_args(argv)
    text = json.dumps(build(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.output} is out of date: run scripts/build_vocabulary.py\n")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
