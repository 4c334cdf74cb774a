"""The filter's report under ``<run>/filter/``: a per-class table (JSON, CSV and markdown; past a few
hundred classes the markdown shows the classes that need the most and the worst accepted, the CSV all),
a histogram of the scores with their thresholds, and for the tail classes (at most ``MAX_GRIDS``, those
with the largest quota) a grid of accepted vs rejected images.

Every figure here comes from the real TRAIN split (calibration) and the candidates; no val/test data.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from tailforge.data.atomic import atomic_path, write_json, write_text
from tailforge.data.classtable import select_rows, short_name, write_csv
from tailforge.data.images import load_images
from tailforge.data.manifest import is_feature
from tailforge.data.log import grouped, log
from tailforge.data.run import RunDir

REJECT_REASONS = ("wrong_class", "low_fidelity", "near_copy", "duplicate", "over_quota")
MAX_GRIDS = 24  # tail classes with an accepted-vs-rejected grid, at most (those with the largest quota)
COLUMNS = ("label", "class_name", "group", "need", "generated", "accepted", "rate", "mean_score",
           "mean_score_accepted")  # of the class table, then one count column per reject reason


def reasons(rows) -> list[str]:
    """The built-in reject reasons, then those of extra rules (``score.RULES``) that occur, in name order:
    ``rows`` is the candidates frame or rows of the class table."""
    seen = set(rows["reason"]) if isinstance(rows, pd.DataFrame) else {k for r in rows for k in r} - set(COLUMNS)
    return list(REJECT_REASONS) + sorted(seen - set(REJECT_REASONS) - {""})


def class_groups(run: RunDir, num_classes: int) -> list[str]:
    """many/medium/few per class from counts.json, or "?" when the run was not measured."""
    from tailforge.data.measure import ClassStats

    if not run.counts.exists():
        return ["?"] * num_classes
    return list(ClassStats.load(run).groups)


def class_table(out: pd.DataFrame, quotas: dict[int, int], info: dict, groups: list[str]) -> list[dict]:
    """One row per class with candidates or a quota: generated / accepted / rate / mean score / reasons.
    One pass over the candidates (group-bys), not one scan per class."""
    extra = reasons(out)[len(REJECT_REASONS):]
    labels = sorted(set(out["label"].astype(int)) | {c for c, n in quotas.items() if n > 0})
    lab = out["label"].astype(int)
    acc = out["accepted"].astype(bool)
    by = out.assign(_lab=lab, _acc=acc, _sacc=out["score"].where(acc)).groupby("_lab")
    gen, n_acc = by.size(), by["_acc"].sum()
    mean, mean_acc = by["score"].mean(), by["_sacc"].mean()
    per_reason = pd.crosstab(lab, out["reason"]) if len(out) else pd.DataFrame()
    rows = []
    for c in labels:
        n, a = int(gen.get(c, 0)), int(n_acc.get(c, 0))
        ms, ma = mean.get(c), mean_acc.get(c)
        row = {
            "label": c,
            "class_name": info["class_names"][c],
            "group": groups[c],
            "need": int(quotas.get(c, 0)),
            "generated": n,
            "accepted": a,
            "rate": round(a / n, 4) if n else 0.0,
            "mean_score": round(float(ms), 4) if n and pd.notna(ms) else None,
            "mean_score_accepted": round(float(ma), 4) if a and pd.notna(ma) else None,
        }
        for r in [*REJECT_REASONS, *extra]:
            row[r] = int(per_reason.at[c, r]) if r in per_reason.columns and c in per_reason.index else 0
        rows.append(row)
    return rows


def class_warnings(table: list[dict]) -> list[str]:
    out = []
    for r in table:
        if r["need"] > 0 and r["generated"] == 0:
            out.append(f"class {r['label']} ({r['class_name']}) needs {r['need']} samples but has no candidates")
        elif r["need"] > 0 and r["accepted"] == 0:
            why = ", ".join(f"{k} {r[k]}" for k in reasons([r]) if r[k])
            out.append(f"class {r['label']} ({r['class_name']}): no candidate accepted of {r['generated']} ({why})")
    return out


def warning_lines(table: list[dict]) -> list[str]:
    """The per-class warnings as one line per kind, for the log:
    ``no candidate accepted for 8 classes: bird (371 wrong_class), ...``."""
    def name(r: dict) -> str:
        return r["class_name"] if str(r["class_name"]) != str(r["label"]) else f"class {r['label']}"

    empty = [f"{name(r)} (needs {r['need']})" for r in table if r["need"] > 0 and r["generated"] == 0]
    rejected = [f"{name(r)} (" + ", ".join(f"{r[k]} {k}" for k in reasons([r]) if r[k]) + ")"
                for r in table if r["need"] > 0 and r["generated"] > 0 and r["accepted"] == 0]
    out = [grouped("no candidates generated", empty)] if empty else []
    return out + ([grouped("no candidate accepted", rejected)] if rejected else [])


def markdown(table: list[dict], warns: list[str], calibrations: dict, backend: str, split_note: str) -> str:
    cols = [*COLUMNS, *reasons(table)]
    lines = ["# Filter report", "", split_note, "", f"Search backend: {backend}.", ""]
    for name, cal in calibrations.items():
        lines.append(f"- space `{name}`: near-copy ceiling {cal.novelty_ceiling:.4f}, duplicate threshold "
                     f"{cal.duplicate_threshold:.4f}" + (f"; {'; '.join(cal.notes)}" if cal.notes else ""))
    shown, note = select_rows(table, "need", "rate", most=True)
    if note:  # thousands of classes: those that need the most and those worst served; all in classes.csv
        lines += ["", f"{note}; every class: `classes.csv`."]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in shown:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    total_gen, total_acc = sum(r["generated"] for r in table), sum(r["accepted"] for r in table)
    lines += ["", f"Total: {total_acc} of {total_gen} candidates accepted.", ""]
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    lines += ["Figures: `scores.png` (scores with thresholds), `grid_<label>_<class>.png` (accepted vs rejected, tail classes)."]
    return "\n".join(lines) + "\n"


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_scores(out: pd.DataFrame, calibrations: dict, path) -> None:
    """Four histograms (accepted vs rejected) with the thresholds the rules used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = out["accepted"].to_numpy()
    panels = [
        ("score_consistency", "consistency (target share of kNN vote)", []),
        ("fidelity_margin", "fidelity - class threshold (cosine)", [("class threshold", 0.0)]),
        ("max_real_sim", "max cosine to a real train image", [(f"near-copy ceiling {n}", c.novelty_ceiling)
                                                              for n, c in calibrations.items()]),
        ("score_duplicate", "max cosine to another candidate of the class",
         [(f"duplicate threshold {n}", c.duplicate_threshold) for n, c in calibrations.items()]),
    ]
    data = out.assign(fidelity_margin=out["score_fidelity"] - out["fidelity_threshold"],
                      max_real_sim=1 - out["score_novelty"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (col, title, lines) in zip(axes.ravel(), panels):
        x = data[col].to_numpy(dtype=float)
        bins = np.histogram_bin_edges(x[np.isfinite(x)], bins=40) if np.isfinite(x).any() else 10
        ax.hist(x[acc], bins=bins, alpha=0.7, color="#2ca02c", label=f"accepted ({acc.sum()})")
        ax.hist(x[~acc], bins=bins, alpha=0.5, color="#7f7f7f", label=f"rejected ({(~acc).sum()})")
        for k, (name, v) in enumerate(lines):
            ax.axvline(v, color="#d62728", ls=["--", ":", "-."][k % 3], label=name)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"Filter scores of {len(out)} candidates (calibrated on the real train split only)")
    fig.tight_layout()
    _save(fig, path)


def plot_grid(run: RunDir, out: pd.DataFrame, label: int, info: dict, n: int, path) -> bool:
    """Accepted (top row, best first) vs rejected (bottom row, with reasons) images of one class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = out[(out["label"] == label) & ~is_feature(out)].sort_values("score", ascending=False)
    if part.empty:
        return False
    rows = [part[part["accepted"]].head(n), part[~part["accepted"]].head(n)]
    size = tuple(info["image_size"])
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.2), squeeze=False)
    for r, (sel, what) in enumerate(zip(rows, ("accepted", "rejected"))):
        imgs = load_images(sel["uri"].tolist(), run.root, info["channels"], size) if len(sel) else []
        for j in range(n):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(sel):
                img = imgs[j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
                tag = "ok" if what == "accepted" else sel["reason"].iloc[j]
                ax.set_title(f"{tag}\n{sel['score'].iloc[j]:.2f}", fontsize=7)
        axes[r, 0].text(-0.15, 0.5, what, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(f"class {label} ({short_name(info['class_names'][label], 40)}): accepted vs rejected (score)", fontsize=9)
    _save(fig, path)
    return True


def write_report(run: RunDir, out: pd.DataFrame, quotas: dict[int, int], calibrations: dict, cfg,
                 backend: str) -> dict:
    """Write classes.json, classes.md, scores.png and the tail-class grids; return the JSON report."""
    info = run.dataset_info()
    groups = class_groups(run, len(info["class_names"]))
    table = class_table(out, quotas, info, groups)
    warns = class_warnings(table)
    for line in warning_lines(table):
        log.warning("filter: %s", line)
    note = ("Thresholds and prototypes come from the real TRAIN split only; val and test were not used.")
    d = run.side / "filter"
    report = {"split": "train (real) for calibration", "backend": backend, "classes": table, "warnings": warns,
              "calibration": {n: c.to_dict() for n, c in calibrations.items()},
              "accepted": int(out["accepted"].sum()), "candidates": len(out)}
    write_json(d / "classes.json", report, compact=True)
    write_csv(d / "classes.csv", table, [*COLUMNS, *reasons(table)])
    write_text(d / "classes.md", markdown(table, warns, calibrations, backend, note))
    plot_scores(out, calibrations, d / "scores.png")
    tail = [c for c in sorted(set(out["label"].astype(int))) if groups[c] == "few"]
    if not any(g in ("many", "medium", "few") for g in groups):
        tail = [c for c in sorted(set(out["label"].astype(int))) if quotas.get(c, 0) > 0]
    if len(tail) > MAX_GRIDS:  # thousands of tail classes: the grids of those that need the most
        tail = sorted(sorted(tail, key=lambda c: -quotas.get(c, 0))[:MAX_GRIDS])
    if is_feature(out).all():
        tail = []  # feature candidates: nothing to picture
    grids = []
    for c in tail:
        safe = re.sub(r"[^A-Za-z0-9_-]+", "-", info["class_names"][c])[:40]
        p = d / f"grid_{c}_{safe}.png"
        if plot_grid(run, out, c, info, cfg.grid_samples, p):
            grids.append(p.name)
    report["grids"] = grids
    write_json(d / "classes.json", report, compact=True)
    return report
