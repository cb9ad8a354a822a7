"""The templated report of a phantom: what it holds, in fixed or varied wordings."""

from __future__ import annotations

from typing import Any

import numpy as np

# Wordings of each report sentence: the first is the fixed one (`phantom_report` without a generator); the others
# let phantom studies say the same findings in different words. "{lesions}" is e.g. "2 focal hypodense lesions".
REPORT_WORDINGS: dict[str, tuple[str, ...]] = {
    "liver_normal": ("Liver: normal, no focal lesion.", "Liver: unremarkable, without focal lesion.",
                     "The liver is normal in size and attenuation without a focal lesion."),
    "liver_lesion": ("Liver: {lesions}.", "Liver: {lesions} in the right lobe.", "The liver contains {lesions}."),
    "spleen_normal": ("Spleen: normal size.", "Spleen: unremarkable.", "The spleen is normal in size."),
    "spleen_enlarged": ("Spleen: enlarged.", "Spleen: enlarged, extending inferiorly.", "The spleen is enlarged."),
    "kidneys_normal": ("Kidneys: normal.", "Kidneys: unremarkable, no focal lesion.",
                       "Both kidneys are normal without a focal lesion."),
    "kidneys_both": ("Kidneys: left kidney {left}; right kidney {right}.",
                     "Kidneys: {left} in the left kidney and {right} in the right kidney."),
    "kidney_one": ("Kidneys: {side} kidney {lesions}; {other} kidney normal.",
                   "Kidneys: {lesions} in the {side} kidney; the {other} kidney is normal."),
    "impression_normal": ("no focal lesion, spleen normal", "no liver lesion, no kidney lesion, no splenomegaly",
                          "normal study, no focal lesion"),
}


def phantom_report(lesion_counts: dict[str, int], enlarged_spleen: bool,
                   rng: np.random.Generator | None = None) -> str:
    """A templated report of what a phantom holds, e.g. "Liver: 2 focal hypodense lesions. ... Impression: ...".

    Without `rng` every sentence has its fixed wording; with it, each sentence's wording is drawn from
    `REPORT_WORDINGS`, so reports of the same findings differ as real ones do. The impression always names the
    positive findings in the same terms ("liver lesion", "kidney lesion", "splenomegaly"); with `rng` (the study
    reports) it also states the absent ones ("no liver lesion; no kidney lesion; no splenomegaly"), the words the
    zero-shot prompts use.

        phantom_report({"liver": 1}, False)  # 'Liver: 1 focal hypodense lesion. Spleen: normal size. ...'
    """
    def wording(kind: str, **values: Any) -> str:
        options = REPORT_WORDINGS[kind]
        return (options[0] if rng is None else options[int(rng.integers(len(options)))]).format(**values)

    def lesions(count: int, kind: str) -> str:
        return f"{count} focal {kind} lesion{'s' if count > 1 else ''}"

    liver = lesion_counts.get("liver", 0)
    left, right = lesion_counts.get("kidney_left", 0), lesion_counts.get("kidney_right", 0)
    sentences = [wording("liver_lesion", lesions=lesions(liver, "hypodense")) if liver else wording("liver_normal"),
                 wording("spleen_enlarged") if enlarged_spleen else wording("spleen_normal")]
    if left and right:
        sentences.append(wording("kidneys_both", left=lesions(left, "cystic"), right=lesions(right, "cystic")))
    elif left or right:
        side, count, other = ("left", left, "right") if left else ("right", right, "left")
        sentences.append(wording("kidney_one", side=side, other=other, lesions=lesions(count, "cystic")))
    else:
        sentences.append(wording("kidneys_normal"))
    findings = []
    if liver:
        findings.append("liver lesion")
    elif rng is not None:  # study reports state each finding either way, as structured impressions do
        findings.append("no liver lesion")
    if left or right:
        sides = "both sides" if left and right else f"the {'left' if left else 'right'}"
        findings.append(f"kidney lesion on {sides}")
    elif rng is not None:
        findings.append("no kidney lesion")
    if enlarged_spleen:
        findings.append("splenomegaly")
    elif rng is not None:
        findings.append("no splenomegaly")
    sentences.append("Impression: " + ("; ".join(findings) if findings else wording("impression_normal")) + ".")
    return " ".join(sentences)
