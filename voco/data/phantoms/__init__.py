"""Synthetic abdominal CT phantoms: volumes in HU with a label map, a templated report and facts per scan.

A phantom is an elliptic-cylinder trunk (skin, subcutaneous fat, muscle wall, air of -1000 HU outside)
holding organ-like structures at anatomically consistent relative positions: liver right-upper, spleen
left-upper-posterior, stomach left-upper-anterior, two kidneys posterior-lateral (the right one lower), spine
posterior-midline with discs and posterior elements, aorta in front of the spine and left of the inferior vena
cava, psoas muscles beside the lower spine, hip bones and bladder inferior. Each structure is an ellipsoid
(or a tube) whose surface is deformed by a smooth random field, so shapes differ between phantoms while the
layout stays the same: where a structure lies tells where in the body a crop was taken.

The anatomy is built in RAS voxel order (index grows towards the patient's Right, Anterior, Superior; this
is the RAS+ world of NIfTI, nibabel and MONAI) and then stored in a random orientation: the axis flips (and
optionally permutations) are encoded in the affine, so after MONAI ``Orientationd(axcodes="RAS")`` every
phantom looks the same way up. Anatomy, geometry and noise draw from separate random streams of one seed:
the same seed in another orientation, shape or spacing gives the same anatomy.

    phantom = make_phantom(7)                       # one phantom in memory
    manifest = synthesize("runs/phantoms", n=20)    # NIfTI files + a voco manifest, written atomically
    manifest = ensure_phantoms("runs/phantoms", 8)  # the same, but reuses a complete set (smoke configs)
    study = make_phantom_study(7)                   # one body seen by 1-4 series, with a report and findings
    manifest = ensure_phantom_studies("runs/phantom_studies", 8)  # a set of them (language-image pretraining)

The modules: `anatomy` (one phantom), `reports` (its templated report), `studies` (one body seen by several
series), `sets` (sets on disk with their manifest).
"""

from voco.data.phantoms.anatomy import (ALL_ORIENTATIONS, CLASS_INDEX, DEFAULT_ORIENTATIONS, DEFAULT_SHAPE_RANGE,
                                         LESION_ORGANS, PHANTOM_CLASSES, Phantom, make_phantom)
from voco.data.phantoms.reports import REPORT_WORDINGS, phantom_report
from voco.data.phantoms.sets import (STAMP_NAME, ensure_phantom_studies, ensure_phantoms, synthesize,
                                      synthesize_studies)
from voco.data.phantoms.studies import (PHANTOM_SERIES, STUDY_FINDINGS, PhantomSeries, PhantomStudy,
                                         make_phantom_study, study_findings)

__all__ = ["ALL_ORIENTATIONS", "CLASS_INDEX", "DEFAULT_ORIENTATIONS", "DEFAULT_SHAPE_RANGE", "LESION_ORGANS",
           "PHANTOM_CLASSES", "PHANTOM_SERIES", "REPORT_WORDINGS", "STAMP_NAME", "STUDY_FINDINGS", "Phantom",
           "PhantomSeries", "PhantomStudy", "ensure_phantom_studies", "ensure_phantoms", "make_phantom",
           "make_phantom_study", "phantom_report", "study_findings", "synthesize", "synthesize_studies"]
