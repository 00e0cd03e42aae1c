"""Radiology reports for synthetic CT-RATE: templates with findings, negations and an impression.

Every positive label is stated with the pathology's name (so a model can
tie the name to the image), in varied wording with the details the phantom
really has (side, lobe, size). Each negative label is either negated
explicitly ("No pleural effusion.", "Lung nodule is not present.") or left
unmentioned, as radiologists do. The sentences follow CT-RATE's order:
devices, airways, heart and mediastinum, lungs, pleura, then neutral remarks;
reports are kept short enough that no finding is cut off at 128 tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.data.pathologies import PATHOLOGIES

# Pathologies in report order (region by region, as CT-RATE's findings run).
REPORT_ORDER: tuple[str, ...] = (
    "Medical material",
    "Peribronchial thickening", "Bronchiectasis",
    "Cardiomegaly", "Pericardial effusion", "Arterial wall calcification", "Coronary artery wall calcification",
    "Lymphadenopathy", "Hiatal hernia",
    "Emphysema", "Mosaic attenuation pattern", "Interlobular septal thickening", "Lung opacity", "Consolidation",
    "Atelectasis", "Pulmonary fibrotic sequela", "Lung nodule",
    "Pleural effusion",
)
assert sorted(REPORT_ORDER) == sorted(PATHOLOGIES)

# {name} / {Name}: the pathology's name in lower case / capitalised; other fields come from the phantom.
POSITIVE: dict[str, tuple[str, ...]] = {
    "Medical material": ("{Name} is present: {device} is seen.", "{Name} consistent with {device} is noted.",
                         "{Device} is present; medical material is seen in the thorax."),
    "Arterial wall calcification": ("{Name} is present in the {vessel}.",
                                    "Atherosclerotic {name} is seen in the {vessel}.",
                                    "There are calcified plaques of {name} along the {vessel}."),
    "Cardiomegaly": ("{Name} is present.", "The heart is enlarged, consistent with {name}.",
                     "{Name} is noted with a cardiothoracic ratio of about {ratio}."),
    "Pericardial effusion": ("{Name} is present, measuring {size} mm in thickness.",
                             "A {size} mm {name} is seen around the heart.",
                             "There is {name} surrounding the heart."),
    "Coronary artery wall calcification": ("{Name} is present in the {vessel}.",
                                           "{Name} is seen along the {vessel}.",
                                           "Calcified plaques consistent with {name} are noted in the {vessel}."),
    "Hiatal hernia": ("{Name} is present, with an air-fluid level.",
                      "A {size} mm {name} is seen at the oesophageal hiatus.",
                      "There is a {name} containing air and fluid."),
    "Lymphadenopathy": ("{Name} is present in the {station}, the largest node {size} mm in short axis.",
                        "Enlarged lymph nodes in the {station}, consistent with {name}.",
                        "{Name} is noted: {count} enlarged nodes, up to {size} mm."),
    "Emphysema": ("{Name} is present in both lungs, predominantly in the upper lobes.",
                  "{Type} {name} is seen in the upper lobes.",
                  "Low attenuation areas consistent with {name} are present in both upper lobes."),
    "Atelectasis": ("{Name} is present in the {side} {lobe}.", "Plate-like {name} is seen in the {side} {lobe}.",
                    "A band of subsegmental {name} is noted in the {side} lung."),
    "Lung nodule": ("{Name} is present in the {side} {lobe}, measuring {size} mm.",
                    "A {size} mm partly calcified {name} is seen in the {side} {lobe}.",
                    "{Name} is present ({count} in total), the largest measuring {size} mm in the {side} {lobe}."),
    "Lung opacity": ("{Name} is present in the {side} {lobe}.",
                     "Ground-glass {name} is seen in the {side} {lobe}.",
                     "Patchy ground-glass areas consistent with {name} are noted in the {side} lung."),
    "Pulmonary fibrotic sequela": ("{Name} is present in the {side} {lobe}.",
                                   "Linear fibrotic streaks consistent with {name} are seen in the {side} lung.",
                                   "{Name} with parenchymal bands is noted in the {side} {lobe}."),
    "Pleural effusion": ("{Name} is present {side_phrase}, {size} mm thick.",
                         "A {side_adj} {name} is seen in the dependent pleural space.",
                         "There is {side_adj} {name} measuring {size} mm."),
    "Mosaic attenuation pattern": ("{Name} is present in both lungs.",
                                   "A {name} is seen, with geographic areas of differing attenuation.",
                                   "Both lungs show a {name}."),
    "Peribronchial thickening": ("{Name} is present in both lungs.",
                                 "Bronchial wall thickening consistent with {name} is seen.",
                                 "{Name} is noted around the segmental bronchi."),
    "Consolidation": ("{Name} is present in the {side} {lobe}.",
                      "An area of {name} with air bronchograms is seen in the {side} {lobe}.",
                      "{Name} is noted in the {side} lung."),
    "Bronchiectasis": ("{Name} is present in the {side} {lobe}.", "Cylindrical {name} is seen in the {side} lung.",
                       "Dilated bronchi consistent with {name} are noted in the {side} {lobe}."),
    "Interlobular septal thickening": ("{Name} is present in both lungs, predominantly peripherally.",
                                       "Smooth {name} is seen in the lower zones.",
                                       "{Name} is noted in the lung periphery."),
}

NEGATIVE: tuple[str, ...] = ("No {name} is seen.", "{Name} is not present.", "There is no {name}.",
                             "No evidence of {name}.", "No {name} was detected.")

FILLERS: tuple[str, ...] = (
    "Trachea and both main bronchi are in the midline and patent.",
    "Thyroid gland is normal in size.",
    "Mediastinal vascular structures are in their normal position.",
    "No lytic or destructive lesion is seen in the bones included in the study.",
    "Upper abdominal organs included in the sections are unremarkable.",
    "Both hila are in their normal position.",
    "No pneumothorax is seen.",
)
NORMAL_HEART = "Heart contour and size are normal."
MANY_FINDINGS = "Multiple abnormalities as described above."
NORMAL_IMPRESSIONS = ("No significant pathology in the thorax.", "Thorax CT within normal limits.",
                      "No acute cardiopulmonary abnormality.")
CLINICAL = ("Cough.", "Shortness of breath.", "Chest pain.", "Fever and cough for three days.",
            "Preoperative evaluation.", "Follow-up.", "Screening.", "Dyspnoea on exertion.")


def _fill(template: str, name: str, details: dict[str, Any]) -> str:
    fields = {k: v for k, v in details.items() if isinstance(k, str)}
    fields |= {f"{k[0].upper()}{k[1:]}": (f"{v[0].upper()}{v[1:]}" if isinstance(v, str) and v else v)
               for k, v in fields.items()}
    return template.format(name=name.lower(), Name=name, **fields)


def _usable(template: str, details: dict[str, Any]) -> bool:
    needed = {part.split("}")[0] for part in template.split("{")[1:]}
    have = {k.lower() for k in details} | {"name"}
    return all(field.lower() in have for field in needed)


def positive_sentence(name: str, details: dict[str, Any], rng: np.random.Generator) -> str:
    """One sentence stating ``name`` is present, with the phantom's details.

    Half the time it is the plain "{Name} is present ..." form, the wording of
    the zero-shot prompts; otherwise a varied phrasing.
    """
    options = [t for t in POSITIVE[name] if _usable(t, details)] or ["{Name} is present."]
    template = options[0] if rng.random() < 0.5 else options[rng.integers(len(options))]
    return _fill(template, name, details)


def negative_sentence(name: str, rng: np.random.Generator) -> str:
    """One sentence stating ``name`` is absent ("{Name} is not present." half the time)."""
    template = NEGATIVE[1] if rng.random() < 0.5 else NEGATIVE[rng.integers(len(NEGATIVE))]
    return _fill(template, name, {})


# Findings + Impressions stay within 128 word-piece tokens (model.text_max_length's default): these
# reports run at most 0.3 BERT tokens per character.
CHAR_BUDGET = 420


def _chars(sentences: list[str] | str) -> int:
    return len(" ".join(sentences)) + 1 if isinstance(sentences, list) else len(sentences) + 1


def _impression(positives: list[str], rng: np.random.Generator) -> str:
    if not positives:
        return NORMAL_IMPRESSIONS[rng.integers(len(NORMAL_IMPRESSIONS))]
    names = [p.lower() for p in positives]
    if rng.random() < 0.5:
        return " ".join(f"{n[0].upper()}{n[1:]}." for n in names)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed[0].upper()}{listed[1:]}."


def write_report(labels: dict[str, bool], details: dict[str, dict[str, Any]], rng: np.random.Generator,
                 technique: str) -> dict[str, str]:
    """The four CT-RATE report fields for one scan, agreeing with ``labels``.

    Every positive is stated (``details[name]`` holds what the phantom drew:
    side, lobe, size, ...) and listed again in the impression; then a random
    selection of the negatives is negated explicitly, the rest left out, so
    that Findings + Impressions fit ``CHAR_BUDGET`` characters (no truncation
    at 128 tokens). Detailed phrasings fall back to "{Name} is present." when a
    scan has too many findings to fit, and the impression to a summary line.
    """
    positives = [n for n in REPORT_ORDER if labels[n]]
    negatives = [n for n in REPORT_ORDER if not labels[n]]
    sentences = {n: positive_sentence(n, details.get(n, {}), rng) for n in positives}
    impression = _impression(positives, rng)
    for name in sorted(positives, key=lambda n: -_chars(sentences[n])):
        if _chars(list(sentences.values())) + _chars(impression) <= CHAR_BUDGET:
            break
        sentences[name] = _fill("{Name} is present.", name, {})
    if _chars(list(sentences.values())) + _chars(impression) > CHAR_BUDGET:
        impression = MANY_FINDINGS
    used = _chars(list(sentences.values())) + _chars(impression)
    for index in rng.permutation(len(negatives))[: int(rng.integers(5, 14))]:
        name = negatives[index]
        for sentence in (negative_sentence(name, rng), _fill("No {name}.", name, {})):  # the short form if tight
            if used + _chars(sentence) <= CHAR_BUDGET:
                sentences[name] = sentence
                used += _chars(sentence)
                break
    findings = [sentences[n] for n in REPORT_ORDER if n in sentences]
    for filler in (NORMAL_HEART if not labels["Cardiomegaly"] else None, FILLERS[rng.integers(len(FILLERS))]):
        if filler and rng.random() < 0.5 and used + _chars(filler) <= CHAR_BUDGET:
            findings.append(filler)
            used += _chars(filler)
    return {
        "ClinicalInformation_EN": CLINICAL[rng.integers(len(CLINICAL))],
        "Technique_EN": technique,
        "Findings_EN": " ".join(findings),
        "Impressions_EN": impression,
    }
