"""Facts about public models that several tests check against, written out once."""

# The CLIP-Driven Universal Model's 32 output channels in order (ORGAN_NAME in its public
# utils/utils.py), as this project's structure ids.
UNIVERSAL_MODEL_CLASSES = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "duodenum", "hepatic_vessel", "lung_right", "lung_left", "colon", "intestine",
    "rectum", "urinary_bladder", "prostate", "head_of_femur_left", "head_of_femur_right", "celiac_trunk",
    "kidney_tumor", "liver_tumor", "pancreas_tumor", "hepatic_vessel_tumor", "lung_tumor", "colon_tumor",
    "kidney_cyst",
]  # fmt: skip
