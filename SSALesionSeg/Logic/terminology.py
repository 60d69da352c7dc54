"""Standard terminology (SNOMED CT) of the segments the engine writes.

Sources of the codes (looked up, not invented):
- 1217294009 "Ground glass opacity": tx.fhir.org expansion (SNOMED CT International) in
  the HL7 Lithuania lung IG, ValueSet pulmonary-nodule-type
  (build.fhir.org/ig/HL7LT/ig-lt-lung/en/ValueSet-pulmonary-nodule-type.html).
- 9656002 "Consolidation" (morphologic abnormality): FHIR core example
  BodyStructure/right-lung-consolidation (build.fhir.org/bodystructure-example-right-
  lung-consolidation.json), there with 39607008 "Lung structure" and 24028007 "Right".
- 52988006 "Lesion" (for binary infection models): the usual DICOM SEG segment type
  with category 49755003, e.g. in highdicom/pydicom-based SEG writers.
- 39607008 Lung, 24028007 Right, 7771000 Left, 123037004 Anatomical Structure and
  49755003 Morphologically Altered Structure: the DICOM/Slicer anatomy and category codes
  as used by Slicer's own terminology strings (e.g. SlicerLungCTAnalyzer's right/left
  lung entries; Slicer's seg.nrrd header example).
"""
from __future__ import annotations

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
LUNG = ("SCT", "39607008", "Lung")
RIGHT = ("SCT", "24028007", "Right")
LEFT = ("SCT", "7771000", "Left")
GGO = ("SCT", "1217294009", "Ground glass opacity")
CONSOLIDATION = ("SCT", "9656002", "Consolidation")
LESION = ("SCT", "52988006", "Lesion")

CONTEXT = "Segmentation category and type - SSALesionSeg"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
NONE = ("", "", "")

# name -> (category, type, type modifier, anatomic region, region modifier, RGB 0..1)
SEGMENTS = {
    "Ground-glass opacity": (ALTERED_STRUCTURE, GGO, NONE, LUNG, NONE, (0.90, 0.10, 0.10)),
    "Consolidation": (ALTERED_STRUCTURE, CONSOLIDATION, NONE, LUNG, NONE, (0.10, 0.80, 0.10)),
    # binary infection models: any lesion of the lung
    "Infection": (ALTERED_STRUCTURE, LESION, NONE, LUNG, NONE, (0.90, 0.10, 0.10)),
    "Right lung": (ANATOMICAL_STRUCTURE, LUNG, RIGHT, NONE, NONE, (0.50, 0.68, 0.85)),
    "Left lung": (ANATOMICAL_STRUCTURE, LUNG, LEFT, NONE, NONE, (0.85, 0.70, 0.45)),
}


def _code(c):
    return "^".join(c)


def terminology_entry(name: str) -> str:
    """Slicer terminology entry string (the ``TerminologyEntry`` tag of a seg.nrrd segment)."""
    cat, typ, mod, region, region_mod, _ = SEGMENTS[name]
    return "~".join([CONTEXT, _code(cat), _code(typ), _code(mod), ANATOMIC_CONTEXT, _code(region), _code(region_mod)])


def color(name: str) -> tuple:
    return SEGMENTS[name][5]
