"""SNOMED CT codes of a label for a DICOM Segmentation's segment (category, property type, modifier, region).

Anatomy: category "Anatomical Structure" (91723000), property type the organ's concept (``liver`` ->
Liver 10200004); a left or right organ is the organ's concept with a laterality modifier (Left 7771000,
Right 24028007) in SegmentedPropertyTypeModifierCodeSequence, as dcmqi writes it, unless SNOMED has the
sided concept itself (``left heart atrium`` -> Left atrium 82471001). Findings: category
"Morphologically Abnormal Structure" (49755003), property type the morphology (``liver tumor`` ->
Neoplasm 108369006) and, as its anatomic region, the organ it lies in (Liver). The tables name
``pydicom.sr.codedict.codes.SCT`` keywords, so every code value and meaning comes from pydicom's
dictionary. A label not in them keeps the generic codes: "Anatomical Structure", or for a name that
reads as a lesion (``tumor``, ``cyst``, ...) "Morphologically Abnormal Structure" with type Lesion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# label (without "left"/"right") -> SCT keyword of its property type; the SAT-49 labels SNOMED names
ANATOMY = {
    "adrenal gland": "AdrenalGland", "amygdala": "Amygdala", "aorta": "Aorta", "bone": "Bone",
    "brain": "Brain", "brain ventricle": "BrainVentricle", "brainstem": "BrainStem",
    "buccal mucosa": "BuccalMucosa", "carotid artery": "CarotidArtery", "caudate lobe": "StructureOfCaudateLobeOfLiver",
    "caudate nucleus": "CaudateNucleus", "cerebellum": "Cerebellum", "cervical vertebrae": "CervicalSpine",
    "clavicle": "Clavicle", "colon": "Colon", "corpus callosum": "CorpusCallosum", "duodenum": "Duodenum",
    "esophagus": "Esophagus", "eyeball": "Eyeball", "femur": "Femur", "femur bone": "Femur",
    "frontal lobe": "FrontalLobe", "gallbladder": "Gallbladder", "grey matter": "GrayMatter",
    "head of femur": "HeadOfFemur", "heart": "Heart", "heart ascending aorta": "AscendingAorta",
    "heart atrium": "Atrium", "hippocampus": "Hippocampus", "humerus": "Humerus", "iliac artery": "IliacArtery",
    "iliac vena": "IliacVein", "inferior vena cava": "InferiorVenaCava", "insula": "Insula",
    "internal auditory canal": "InternalAuditoryCanal", "kidney": "Kidney", "lacrimal gland": "LacrimalGland",
    "larynx": "Larynx", "larynx glottis": "Glottis", "larynx supraglottis": "Supraglottis",
    "lateral ventricle": "LateralVentricle", "lens": "Lens", "lips": "Lip", "liver": "Liver",
    "lumbar vertebrae": "LumbarSpine", "lung": "Lung", "lung lower lobe": "LowerLobeOfLung",
    "lung middle lobe": "StructureOfMiddleLobeOfLung", "lung upper lobe": "UpperLobeOfLung",
    "mandible": "Mandible", "middle ear": "MiddleEar", "nucleus accumbens": "NucleusAccumbens",
    "occipital lobe": "OccipitalLobe", "optic chiasm": "OpticChiasm", "optic nerve": "OpticNerve",
    "optic radiation": "OpticRadiation", "oral cavity": "OralCavity", "pallidum": "GlobusPallidus",
    "pancreas": "Pancreas", "parietal lobe": "ParietalLobe", "parotid gland": "ParotidGland",
    "pituitary gland": "Pituitary", "prostate": "Prostate",
    "pulmonary artery": "PulmonaryArtery", "putamen": "Putamen", "rectum": "Rectum", "renal artery": "RenalArtery",
    "renal vein": "RenalVein", "rib": "Rib", "sacrum": "Sacrum", "scapula": "Scapula",
    "small bowel": "SmallIntestine", "spinal cord": "SpinalCord", "spleen": "Spleen", "stomach": "Stomach",
    "submandibular gland": "SubmandibularGland", "substantia nigra": "SubstantiaNigra",
    "temporal lobe": "TemporalLobe", "temporomandibular joint": "TemporomandibularJoint", "thalamus": "Thalamus",
    "third ventricle": "ThirdVentricle", "thoracic cavity": "ThoracicCavityStructure",
    "thoracic vertebrae": "ThoracicSpine", "thyroid": "Thyroid", "tibia bone": "Tibia", "trachea": "Trachea",
    "urinary bladder": "Bladder", "white matter": "WhiteMatter",
    # sided concepts of their own: no modifier
    "left heart atrium": "LeftAtrium", "right heart atrium": "RightAtrium",
    "left heart ventricle": "LeftVentricle", "right heart ventricle": "RightVentricle",
}  # fmt: skip
# lesion label -> (SCT keyword of its morphology, SCT keyword of the anatomic region it lies in)
FINDINGS = {
    "intracranial hemorrhage": ("Hemorrhage", "CranialCavity"),
    "kidney cyst": ("Cyst", "Kidney"),
    "kidney tumor": ("Neoplasm", "Kidney"),
    "left heart atrium scar": ("Scar", "LeftAtrium"),
    "liver tumor": ("Neoplasm", "Liver"),
    "lung effusion": ("Effusion", "Pleura"),
    "lung nodule": ("Nodule", "Lung"),
    "myocardial edema": ("Edema", "Heart"),
    "myocardial scar": ("Scar", "Heart"),
    "nasopharyngeal tumor": ("Neoplasm", "Nasopharynx"),
    "pulmonary embolism": ("Embolus", "PulmonaryArtery"),
    "vestibular schwannoma": ("Neoplasm", "VestibulocochlearNerve"),
}
_NUMBERED = re.compile(r"^(?:rib (\d+)|(?:cervical|thoracic|lumbar) vertebrae \d+ \(([ctl]\d+)\))$")
_SIDE = re.compile(r"\b(left|right)\b ?")
_ABNORMAL_WORDS = (
    "tumor", "tumour", "lesion", "cancer", "metasta", "nodule", "cyst", "neoplasm", "carcinoma", "stroke",
    "hemorrhage", "haemorrhage", "edema", "oedema", "scar", "embolism", "effusion", "hyperintensit", "schwannoma",
)  # fmt: skip


@dataclass(frozen=True)
class SegmentCodes:
    """The coded concepts of one segment (pydicom ``Code`` objects)."""

    category: Any
    property_type: Any
    modifier: Any = None  # laterality of the property type
    region: Any = None  # where a finding lies


def _numbered(label: str) -> str | None:
    """``rib 5`` -> Rib; ``thoracic vertebrae 10 (t10)`` -> T10Vertebra (SNOMED has C1-C7, T1-T12, L1-L5)."""
    match = _NUMBERED.match(label)
    if match is None:
        return None
    return "Rib" if match.group(1) else f"{match.group(2).upper()}Vertebra"


def _sct(keyword: str | None) -> Any:
    """pydicom's SNOMED CT code of ``keyword``, or None (no keyword, or one pydicom lacks, e.g. L6)."""
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, keyword, None) if keyword else None


def segment_codes(label: str) -> SegmentCodes:
    """The SNOMED CT codes of ``label`` (see the module docstring)."""
    name = " ".join(label.lower().split())
    anatomical, abnormal = _sct("AnatomicalStructure"), _sct("MorphologicallyAbnormalStructure")
    if name in FINDINGS:
        morphology, region = FINDINGS[name]
        return SegmentCodes(abnormal, _sct(morphology), region=_sct(region))
    found = _sct(ANATOMY.get(name) or _numbered(name))
    if found is not None:
        return SegmentCodes(anatomical, found)
    side = _SIDE.search(name)
    if side is not None:
        plain = _SIDE.sub("", name, count=1).strip()
        found = _sct(ANATOMY.get(plain) or _numbered(plain))
        if found is not None:
            return SegmentCodes(anatomical, found, modifier=_sct(side.group(1).capitalize()))
    if any(word in name for word in _ABNORMAL_WORDS):
        return SegmentCodes(abnormal, _sct("Lesion"))
    return SegmentCodes(anatomical, anatomical)
