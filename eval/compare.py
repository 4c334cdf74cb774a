"""``compare``: evaluated models side by side, mean +- std over seeds, deltas against a baseline.

Models are grouped into methods by name with the seed suffix removed (``resnet32-ce-s0``,
``resnet32-ce-s1`` -> ``resnet32-ce``); when several run folders are compared, the method label
is prefixed with the run folder's name (``fmnist-lt/resnet32-ce`` vs ``fmnist-lt-sd/resnet32-ce``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tailforge.data.atomic import read_json, write_json, write_text
from tailforge.data.classtable import short_name
from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.run import RunDir

from .config import CompareConfig
from .track import curves_line

SEED_SUFFIX = re.compile(r"[-_](s|seed)\d+$")


def method_of(model_name: str) -> str:
    return SEED_SUFFIX.sub("", model_name)


def _collect(items, split: str) -> list[dict]:
    """Eval JSONs from run folders (all models evaluated on ``split``), RUN:MODEL specs or JSON paths."""
    found = []
    for item in items:
        item = str(item)
        p = Path(item)
        if p.is_file() and p.suffix == ".json":
            found.append(read_json(p))
        elif ":" in item and not p.exists():
            r, model = item.rsplit(":", 1)
            run = RunDir(r)
            path = run.eval_dir / f"{model}-{split}.json"
            if not path.exists():
                from .evaluate import evaluate

                found.append(evaluate(run, model, split))
            else:  # the folder it was read from, not the one it was evaluated in (a moved or copied run)
                found.append({**read_json(path), "run": str(run.root)})
        elif p.is_dir():
            jsons = sorted((p / "eval").glob(f"*-{split}.json"))
            if not jsons:
                raise TailforgeError(f"run {p} has no evaluations on {split}",
                                     f"run `tailforge eval --run {p} --model-name M --split {split}` first")
            found += [{**read_json(j), "run": str(RunDir(p).root)} for j in jsons]
        else:
            raise TailforgeError(f"'{item}' is neither a run folder, RUN:MODEL nor an eval JSON", "check the path")
    found = [d for d in found if d.get("split") == split and "top1" in d]
    if not found:
        raise TailforgeError(f"nothing evaluated on {split} to compare", "evaluate the models first")
    return found


def compare(items, names=None, *, baseline: str | None = None, split: str | None = None,
            cfg: CompareConfig | None = None, out_dir=None, lead: tuple[str, str] | None = None,
            oracle: str | None = None, why_no_oracle: str | None = None) -> dict:
    """Compare evaluations; writes ``compare.json`` and ``report.md`` into ``out_dir``
    (default: the first run's ``eval/``) and returns the JSON dict (with ``markdown``).

    ``items``: a run folder / ``RunDir`` or a list of run folders, ``RUN:MODEL`` specs and eval JSON
    paths. With ``names``, ``items`` is one run and only those models are compared (evaluated first
    when their JSON is missing). ``lead=(control, treatment)`` opens the report with room and capture
    (``tailforge.eval.room.room_report``: the treatment's gain over the control with a paired bootstrap
    interval, and with ``oracle`` the room a perfect generator gives and the share captured; else
    ``why_no_oracle`` in one line), falling back to the sign-based ``synthetic_verdict`` when the arms
    have no prediction files.
    """
    cfg = cfg or CompareConfig()
    upd = {k: v for k, v in (("baseline", baseline), ("split", split)) if v is not None}
    cfg = cfg.model_copy(update=upd) if upd else cfg
    if isinstance(items, (RunDir, str, Path)):
        items = [items]
    items = [str(i.root) if isinstance(i, RunDir) else str(i) for i in items]
    if names:
        if len(items) != 1:
            raise TailforgeError("model names can only be given with one run folder", "pass RUN:MODEL specs instead")
        items = [f"{items[0]}:{n}" for n in names]
    evals = _collect(items, cfg.split)
    known = {k for e in evals for k, v in e.items()
             if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    for m in cfg.metrics:
        if m not in known:
            raise unknown_name("metric", m, known)
    runs = sorted({Path(e["run"]).name for e in evals})
    methods: dict[str, list[dict]] = {}
    for e in evals:
        label = method_of(e["model"])
        if len(runs) > 1:
            label = f"{Path(e['run']).name}/{label}"
        methods.setdefault(label, []).append(e)
    baseline = _pick_baseline(cfg.baseline, list(methods))
    rows = {}
    for label, es in methods.items():
        row = {"n_seeds": len(es), "models": [e["model"] for e in es]}
        for m in cfg.metrics:
            vals = [e.get(m) for e in es if e.get(m) is not None]
            row[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                      "values": vals} if vals else None
        rows[label] = row
    for label, row in rows.items():
        row["delta"] = {m: (row[m]["mean"] - rows[baseline][m]["mean"]) if row[m] and rows[baseline][m] else None
                        for m in cfg.metrics}
    result = {"split": cfg.split, "baseline": baseline, "metrics": cfg.metrics, "methods": rows}
    result["markdown"] = to_markdown(result)
    if lead is not None:
        by_model = {e["model"]: e for e in evals}
        if lead[0] in by_model and lead[1] in by_model:
            v = synthetic_verdict(by_model[lead[0]], by_model[lead[1]])
            room = None
            if len(runs) == 1:
                from .room import room_report

                room = room_report(RunDir(evals[0]["run"]), cfg.split, lead[0], lead[1],
                                   oracle if oracle in by_model else None, why_no_oracle, cfg.bootstrap,
                                   cfg.confidence)
            if room and "sets" in room:
                gain = room["sets"]["balanced"].get("gain") or {}
                v = {**{k: v[k] for k in ("rarest", "rarest_control", "rarest_treated")},
                     "helped": gain.get("verdict") == "helped", "decision": gain.get("verdict"),
                     "delta_balanced_acc": v["delta_balanced_acc"], "markdown": room["markdown"]}
                result["room"] = {k: room[k] for k in room if k != "markdown"}
            result["verdict"] = v
            result["markdown"] = v["markdown"] + "\n" + result["markdown"]
    out = Path(out_dir) if out_dir else Path(evals[0]["run"]) / "eval"
    if len(runs) == 1:  # the real-only control chosen on VAL among candidate heads (recipe.candidates)
        result["markdown"] += control_line(Path(evals[0]["run"]) / "eval" / "candidates.json")
    result["markdown"] += curves_line(out)  # where the training curves are (eval/tracking.json), when known
    write_json(out / "compare.json", result)
    write_text(out / "report.md", result["markdown"])
    result["written"] = [str(out / "compare.json"), str(out / "report.md")]
    return result


HEAD_NAMES = {"crt": "cRT: class-balanced CE", "la": "logit-adjusted CE", "taunorm": "tau-normalised CE"}


def control_line(path: Path) -> str:
    """One paragraph naming the real-only control chosen on VAL and every candidate's VAL score, or ``""``."""
    if not Path(path).is_file():
        return ""
    c = read_json(path)
    scores = ", ".join(f"{h} {100 * v:.2f}" for h, v in c["scores"].items())
    ref = c.get("reference")
    ref = (f" The frozen network's own head (`{ref['model']}`) scored {100 * ref['val_balanced_acc']:.2f} there, "
           + ("above every re-trained head: the room section also measures `rebalanced` against it." if ref["above"]
              else "not above the chosen head.")) if ref else ""
    return (f"\n**Real-only control:** the head `{c['chosen']}` ({HEAD_NAMES.get(c['chosen'], c['chosen'])}) on the "
            f"frozen backbone, the best of the candidates on the {c['split']} split (balanced accuracy, {scores}; "
            f"eval/candidates.json); `rebalanced` and `oracle` train the same head.{ref}\n")


def _pick_baseline(name: str | None, labels: list[str]) -> str:
    if name is None:
        return labels[0]
    if name in labels:
        return name
    hits = [lab for lab in labels if lab.endswith(name) or method_of(name) == lab]
    if len(hits) == 1:
        return hits[0]
    raise TailforgeError(f"baseline '{name}' is not among the compared methods",
                         "use one of: " + ", ".join(labels))


def to_markdown(result: dict) -> str:
    ms = result["metrics"]
    head = f"## Comparison on the {result['split']} split (mean ± std over seeds; one seed: no std)\n\n"
    lines = ["| method | seeds | " + " | ".join(ms) + " |", "|---|---:|" + "---:|" * len(ms)]

    def cell(v: dict | None) -> str:
        if not v:
            return "–"
        return f"{v['mean']:.4f}" if v["std"] is None else f"{v['mean']:.4f} ± {v['std']:.4f}"

    for label, row in result["methods"].items():
        cells = [cell(row[m]) for m in ms]
        lines.append(f"| {label} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    delta = [f"\n### Deltas against the baseline `{result['baseline']}` (difference of means)\n",
             "| method | " + " | ".join(ms) + " |", "|---|" + "---:|" * len(ms)]
    for label, row in result["methods"].items():
        if label == result["baseline"]:
            continue
        cells = [f"{row['delta'][m]:+.4f}" if row["delta"][m] is not None else "–" for m in ms]
        delta.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(result["methods"]) == 1:  # an empty delta table would read as "no difference"
        delta = ["\n(one method only: no deltas; pass another model, run or eval JSON to compare against)"]
    note = ("\n(ece: lower is better; many/medium/few: mean per-class accuracy of the group's classes; "
            "every number comes from the split named above.)\n")
    return head + "\n".join(lines) + "\n" + "\n".join(delta) + "\n" + note


def synthetic_verdict(control: dict, treated: dict, rare: int = 3, margin: float = 0.005) -> dict:
    """Did synthetic data help? ``treated`` (the recipe on real + synthetic) against ``control`` (the same
    recipe on real data only), on the split both were evaluated on: balanced accuracy, each group, and
    the ``rare`` classes with the fewest REAL train images. A gain below ``margin`` is "no gain"."""
    if control.get("split") != treated.get("split"):
        raise TailforgeError(f"cannot compare {control.get('split')} with {treated.get('split')} evaluations",
                             "evaluate both models on the same split")
    counts = np.asarray(control.get("real_train_counts") or control.get("train_counts") or [], dtype=float)
    pc_c, pc_t = control.get("per_class") or [], treated.get("per_class") or []
    rarest = [int(i) for i in np.argsort(counts, kind="stable")[:rare]] if len(counts) else []
    names = control.get("class_names") or [str(i) for i in range(len(pc_c))]

    def mean(pc, idx):
        vals = [pc[i] for i in idx if i < len(pc) and pc[i] is not None]
        return float(np.mean(vals)) if vals else None

    d_bal = treated["balanced_acc"] - control["balanced_acc"]
    rc, rt = mean(pc_c, rarest), mean(pc_t, rarest)
    helped = d_bal >= margin and (rc is None or rt is None or rt >= rc - margin)
    split = treated.get("split")
    c, t = control.get("model"), treated.get("model")
    if helped:
        head = (f"**Synthetic data helped**: `{t}` beats `{c}` (the same recipe on real data only) by "
                f"{100 * d_bal:+.1f} points of balanced accuracy on the {split} split.")
    elif d_bal >= margin:
        head = (f"**Synthetic data did not help the rarest classes**: `{t}` gains {100 * d_bal:+.1f} points of "
                f"balanced accuracy over `{c}` on the {split} split, but its {rare} rarest classes lose.")
    else:
        head = (f"**Synthetic data did not help**: `{t}` is {100 * d_bal:+.1f} points of balanced accuracy against "
                f"`{c}` (the same recipe on real data only) on the {split} split. Keep the real-only recipe.")
    rows = [("balanced accuracy", control["balanced_acc"], treated["balanced_acc"])]
    for g in ("many", "medium", "few"):
        if isinstance(control.get(g), (int, float)) and isinstance(treated.get(g), (int, float)):
            rows.append((f"{g}-shot classes", control[g], treated[g]))
    if rc is not None and rt is not None:
        rows.append((f"{rare} rarest classes ({', '.join(short_name(names[i], 40) for i in rarest)})", rc, rt))
    lines = [f"## Synthetic data: `{t}` vs `{c}`", "", head, "",
             f"| {split} split | {c} | {t} | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {a:.4f} | {b:.4f} | {100 * (b - a):+.1f} pt |" for k, a, b in rows]
    return {"helped": bool(helped), "delta_balanced_acc": float(d_bal), "rarest": rarest,
            "rarest_control": rc, "rarest_treated": rt, "markdown": "\n".join(lines) + "\n"}
