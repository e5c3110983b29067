"""Evaluation report: ``report.json`` and PNG plots (and the sweep plot). Pure (numpy + matplotlib), no Ray."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


# The headline figures of a report.json, as the demo's summary and the endpoint's /metadata show them.
SUMMARY_KEYS = ("split", "count", "accuracy", "balanced_accuracy", "auc")


def summary(report: dict) -> dict:
    return {key: report.get(key) for key in SUMMARY_KEYS}


def plot_sweep(rows: list[dict], metric: str = "val_accuracy") -> bytes:
    """PNG bytes of a sweep: best ``metric`` against lr, one colour per unfreeze depth."""
    import io

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    column = f"best_{metric}"  # the summary rows' name for a trial's best value of the sweep's metric
    depths = sorted({r["config/unfreeze_depth"] for r in rows if column in r})
    for depth in depths:
        points = [(r["config/lr"], r[column]) for r in rows if r.get("config/unfreeze_depth") == depth and column in r]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=f"unfreeze depth {depth}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {metric}")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center")
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_subgroups(subgroups: dict, path: Path) -> None:
    plt = _pyplot()
    names = [n for n, e in subgroups.items() if e["present"]["accuracy"] is not None]
    present = [subgroups[n]["present"]["accuracy"] for n in names]
    absent = [subgroups[n]["absent"]["accuracy"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(8, max(4, 0.22 * len(names))))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], present, height=0.4, label="attribute present")
    ax.barh([i - 0.2 for i in y], absent, height=0.4, label="attribute absent")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xlabel("accuracy")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    loss_ax.set_title("loss")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    acc_ax.set_title("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(before: list[dict], after: list[dict], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", linewidth=1, label="perfectly calibrated")
    for rows, style, name in ((before, "o-", "before"), (after, "s-", "after (temperature)")):
        points = [(r["confidence"], r["accuracy"]) for r in rows if r["count"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    ax.set_xlabel("confidence max(p, 1 - p)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_robustness(block: dict, path: Path) -> None:
    """Accuracy against severity, one line per corruption, the clean accuracy as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    severities = block["severities"]
    for name, entry in block["corruptions"].items():
        ax.plot(severities, entry["accuracy"], marker="o", label=name)
    ax.axhline(block["clean"]["accuracy"], color="black", linestyle="--", label="clean")
    ax.set_xticks(severities)
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy under photo corruptions")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(directory: Path, report: dict, labels: list[str], history: Optional[list[dict]] = None) -> list[str]:
    """Write ``report.json``, the plots and (for a checkpoint's evaluation) ``MODEL_CARD.md`` into a local folder;
    returns the file names."""
    directory.mkdir(parents=True, exist_ok=True)
    files = ["report.json", "confusion_matrix.png"]
    plot_confusion(report["confusion_matrix"], labels, directory / "confusion_matrix.png")
    if report.get("calibration", {}).get("reliability_before"):
        plot_reliability(report["calibration"]["reliability_before"], report["calibration"]["reliability_after"],
                         directory / "reliability_diagram.png")
        files.append("reliability_diagram.png")
    if report.get("model") is not None:
        from genderid.model_card import model_card

        (directory / "MODEL_CARD.md").write_text(model_card(report))
        files.append("MODEL_CARD.md")
    if report.get("subgroups"):
        plot_subgroups(report["subgroups"], directory / "subgroup_accuracy.png")
        files.append("subgroup_accuracy.png")
    if report.get("robustness"):
        plot_robustness(report["robustness"], directory / "robustness.png")
        files.append("robustness.png")
    if history:
        plot_history(history, directory / "training_curves.png")
        files.append("training_curves.png")
    report = {**report, "files": files}
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    return files
