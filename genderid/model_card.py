"""``MODEL_CARD.md`` from an evaluation report (Mitchell et al.'s model cards, briefly). Pure: text from a dict."""
from __future__ import annotations


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(report: dict) -> str:
    """The model card of the model a ``report.json`` evaluated: data, metrics with counts, calibration, subgroups,
    intended use and limits."""
    model = report.get("model") or {}
    architecture = model.get("architecture") or {}
    dataset = report.get("dataset") or {}
    calibration = report.get("calibration") or {}
    counts = dataset.get("counts") or {}
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    lines = [
        f"# Model card: genderid {report.get('model_version')}",
        "",
        "Written by `genderid evaluate` from its `report.json`; every figure below is measured, on the split named.",
        "",
        "## Model",
        f"- VGG16 (width {architecture.get('width')}, BatchNorm {architecture.get('batch_norm')}, "
        f"pretrained weights: {architecture.get('weights', 'n/a')}), input {model.get('input_size')} (height, width), "
        f"two outputs (female, male) from CelebA's binary `Male` attribute.",
        f"- Checkpoint `{report.get('checkpoint')}`, epoch {model.get('epoch')}, written {model.get('created')}.",
        "- Training: " + (", ".join(f"{k} {v}" for k, v in sorted((model.get("train") or {}).items())) or "n/a") + ".",
        "",
        "## Data",
        f"- Evaluated on `{report.get('data')}`, split **{report.get('split')}** ({report.get('count')} images).",
        "- Splits of that data set: " + ", ".join(f"{name} {c.get('total')} ({c.get('male')} male)"
                                                 for name, c in counts.items()) + ".",
        f"- How the split was made: {dataset.get('split_recipe')}.",
    ]
    if dataset.get("aligned"):
        lines.append(f"- Faces detected and aligned (`prepare --align`); no face found in "
                     f"{dataset['aligned']['no_face']['count']} images, left out.")
    lines += [
        "",
        "## Metrics",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {_num(report.get('accuracy'))} |",
        f"| balanced accuracy | {_num(report.get('balanced_accuracy'))} |",
        f"| ROC AUC | {_num(report.get('auc'))} |",
        f"| images | {report.get('count')} (true female: {tn + fp}, true male: {fn + tp}) |",
        f"| confusion (rows true female/male; columns predicted) | [[{tn}, {fp}], [{fn}, {tp}]] |",
        "",
        "Validation metrics at training time: " + (", ".join(f"{k} {_num(v)}" for k, v in
                                                         (model.get("val_metrics") or {}).items()
                                                         if isinstance(v, float)) or "n/a") + ".",
        "",
        "## Calibration",
        f"`p_male` is divided by a temperature fitted on the {calibration.get('fitted_on') or 'n/a'} split "
        f"(T = {_num(calibration.get('temperature'), 3)}). Expected calibration error on this split: "
        f"{_num(calibration.get('ece_before'))} before, {_num(calibration.get('ece_after'))} after "
        "(`reliability_diagram.png`)." + (
            " This is the split the temperature and band were fitted on, so these figures are in-sample; "
            "evaluate another split for out-of-sample ones." if calibration.get("fitted_on") == report.get("split")
            else ""),
        "",
        f"Predictions with `p_male` inside {[round(v, 4) for v in calibration.get('uncertain_band', [0.5, 0.5])]} are "
        f"flagged `uncertain`: the band was chosen on val so that the others reach "
        f"{_pct(calibration.get('target_accuracy'))} accuracy. On this split "
        f"{_pct(calibration.get('uncertain_share'))} "
        f"are flagged, and the others are {_pct(calibration.get('accuracy_confident'))} correct.",
        "",
        "## Subgroups",
        "Accuracy where a CelebA attribute is present and where it is absent; the largest gaps:",
        "",
        "| attribute | present | absent | gap |",
        "| --- | --- | --- | --- |",
    ]
    for row in report.get("largest_gaps") or []:
        entry = report["subgroups"][row["attribute"]]
        lines.append(f"| {row['attribute']} | {_num(row['present'])} ({entry['present']['count']}) | "
                     f"{_num(row['absent'])} ({entry['absent']['count']}) | {_num(row['gap'])} |")
    robustness = report.get("robustness")
    if robustness:
        lines += ["", "## Robustness",
                  f"Accuracy on this split under common photo corruptions, severities 1-3 (clean: "
                  f"{_num(robustness['clean']['accuracy'])}; `robustness.png`). The largest drops:", "",
                  "| corruption | what the severities are | " + " | ".join(f"severity {s}" for s in
                                                                         robustness["severities"]) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in robustness["severities"]) + " |"]
        for row in robustness["worst"]:
            entry = robustness["corruptions"][row["corruption"]]
            lines.append(f"| {row['corruption']} | {entry['parameter']}: {', '.join(f'{v:g}' for v in entry['levels'])}"
                         f" | " + " | ".join(_num(a) for a in entry["accuracy"]) + " |")
    lines += [
        "",
        "## Intended use",
        "- Research, teaching and demonstrating a distributed training and serving pipeline on Ray.",
        "- It predicts CelebA's annotated binary `Male` attribute from a face's appearance. That is not a person's "
        "gender identity, which cannot be read from a photo.",
        "",
        "## Limits",
        "- Not for decisions about people (access, hiring, policing, moderation of individuals) and not for "
        "identifying anyone.",
        "- Trained on CelebA: mostly young, light-skinned celebrities, frontal, well lit. Expect lower accuracy on "
        "other ages, skin tones, poses, lighting and image quality; the subgroup gaps above are measured only over "
        "CelebA's own attributes.",
        "- Photos go through a frontal face detector (dlib HOG, faces from about 40 px): profiles and strongly "
        "tilted faces are often not found. `uncertain: true` answers should be treated as \"don't know\".",
        "- CelebA is licensed for non-commercial research only.",
        "",
    ]
    return "\n".join(lines)
