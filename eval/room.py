"""Room and capture: how much a perfect generator could add to the recipe, and how much synthetic data took.

Three numbers lead every benchmark report (balanced accuracy on the evaluated split, in points):

* ``room = oracle - real-only``: the ``oracle`` arm is the recipe on real + the long tail's held-back real
  train images (gen/oracle.py), a perfect generator at the same plan, filter, recipe and budget;
* ``gain = rebalanced - real-only``: what the run's generator added;
* ``captured = gain / room``.

Each difference is decided by an interval, not by its sign: a **paired, class-stratified bootstrap over
the evaluated images** (the images of each class are re-drawn with replacement, the same draw for every
arm, ``B`` times; the interval is the percentile interval at ``confidence``). A gain whose interval
excludes 0 "helped" (or "hurt"); otherwise it is "within noise". One seed's interval says nothing of
the seed-to-seed spread of training: bench/room_table.py reports that over seeds.

Where nothing was held back (a user's own long-tailed folder, ``profile: none``), ``estimate_room`` gives
the room from the run's real train and val splits alone: the recipe is re-run with the topped-up classes
thinned to fractions f < 1 of their real images (``train.tail_fraction``, same steps), and the learning
curve of their val error is extrapolated to the plan's quota. The model (``fit``):

* ``power``: each topped-up class's val error follows ``e_c(n) = e_c(n_c) (n / n_c)^(-b)`` with one
  exponent ``b`` shared by the classes (least squares of log error ratios over the thinned points, the
  error smoothed by half an image); topping class c up by ``m_c = (n_c + need_c) / n_c`` gains
  ``e_c (1 - m_c^-b)`` (scaling laws: Hestness et al. 2017, Rosenfeld et al. 2020; learning-curve
  estimates of data needs: Mahmood et al., CVPR 2022);
* ``log``: each class's accuracy grows by ``beta`` per e-fold of its data (at most its error):
  ``min(e_c, beta ln m_c)``, ``beta`` fitted the same way;
* ``scale``: the learning curve's log-log slope as a function of the ABSOLUTE class size,
  ``d ln e / d ln n = s0 + s1 ln n`` (s1 >= 0: flatter as classes grow). Every topped-up class and fraction
  gives one chord slope between ``f n_c`` and ``n_c``, placed at its middle, so small classes measure the
  slope at small sizes and large classes at large ones; a class topped up from ``n_c`` to ``m_c n_c`` gains
  ``e_c (1 - exp(integral of min(0, s) from ln n_c to ln m_c n_c)))``: it borrows the slope that bigger
  classes showed over the range it is topped up through, and no gain where that slope has reached 0;
* ``quad``: the log error as a quadratic in the log of the data, ``ln e(f) - ln e(1) = b ln f + c (ln f)^2``
  (shared b < 0, c >= 0 by least squares over the thinned points): the log-log slope flattens as data grows,
  as learning curves at a fixed budget do; a class's gain is taken at the curve's lowest point up to ``m_c``;
* ``power-span`` / ``log-span``: the same curves, extrapolated no further above the class's data than the
  thinning reached below it (``m_c`` capped at ``1 / min(f)``): the curve is only trusted over the span it was
  measured on (extrapolation error grows with the distance: Mahmood et al. 2022).

The interval re-fits the curve on ``B`` class-stratified bootstrap draws of the val images (paired across
the curve's models). That holds the noise of the val images only; the exact room also moves with the
training seed and with how far the curve is extrapolated. So the reported interval is calibrated across
datasets (``calibration``: ± spread × the bootstrap se, spread a split-conformal quantile of the
studentized errors over other datasets' runs, and optionally a scale factor as Mahmood et al. fit one).

The default, ``scale`` on the half-data point alone, with no scale factor and a spread of 4.85, was chosen
on VAL against the exact oracle room, leave one dataset out, over fifteen datasets × seeds of two recipes
(bench/results/room_study.md; choosing the fit per recipe did not do better there, nested leave one out).
The earlier default, ``power-span``, leaned up where the tail was large enough and under-shot by 3.7 and 8.2
points where it was tiny (digits IF 50 / 100: its span cap stops at doubling a class of 2 images); ``scale``
errs both ways, by 1.09 points on average against the VAL room.
"""
from __future__ import annotations

import numpy as np

from tailforge.data.measure import GROUPS  # one definition of the groups


def class_sets(counts, groups=None, rare: int = 3) -> dict[str, np.ndarray]:
    """Named sets of class ids: ``balanced`` (all), each many/medium/few group present, ``rarest`` (the ``rare``
    classes with the fewest real train images)."""
    counts = np.asarray(counts)
    out = {"balanced": np.arange(len(counts))}
    if groups is not None:
        for g in GROUPS:
            idx = np.array([i for i, x in enumerate(groups) if x == g], dtype=np.int64)
            if len(idx):
                out[g] = idx
    if len(counts) > rare:
        out["rarest"] = np.argsort(counts, kind="stable")[:rare]
    return out


def _class_index(y: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(y == c) for c in range(num_classes)]


def bootstrap_class_acc(y: np.ndarray, correct: dict[str, np.ndarray], num_classes: int, b: int,
                        seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-class accuracy of each model on the data (C,) and on ``b`` paired draws (b, C): the images of each
    class re-drawn with replacement, the same draw for every model. Classes without images: NaN."""
    rng = np.random.default_rng(seed)
    point = {m: np.full(num_classes, np.nan) for m in correct}
    boot = {m: np.full((b, num_classes), np.nan) for m in correct}
    for c, idx in enumerate(_class_index(y, num_classes)):
        if not len(idx):
            continue
        draw = idx[rng.integers(0, len(idx), size=(b, len(idx)))]
        for m, ok in correct.items():
            point[m][c] = ok[idx].mean()
            boot[m][:, c] = ok[draw].mean(1)
    return point, boot


def interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "within noise"


def room_and_capture(y: np.ndarray, preds: dict[str, np.ndarray], control: str, treated: str | None,
                     oracle: str | None, sets: dict[str, np.ndarray], num_classes: int, b: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Gain, room and captured share per class set, with paired bootstrap intervals (in points of accuracy).

    ``preds``: model -> predicted labels of the same images ``y``. Returns ``{set: {"gain": {...}, "room":
    {...}, "captured": {...}}}``; each entry holds ``value``, ``low``, ``high`` (and ``verdict`` for gain and
    room). ``captured`` is left out (None) where the room's interval does not exclude 0."""
    correct = {m: (np.asarray(p) == y).astype(np.float64) for m, p in preds.items()}
    point, boot = bootstrap_class_acc(y, correct, num_classes, b, seed)
    out = {}
    for name, idx in sets.items():
        def acc(m, boot_=False):
            a = boot[m][:, idx] if boot_ else point[m][idx]
            return np.nanmean(a, axis=-1)

        row, base, base_b = {}, acc(control), acc(control, True)
        for key, m in (("gain", treated), ("room", oracle)):
            if m is None or m not in correct:
                continue
            v, s = 100 * (acc(m) - base), 100 * (acc(m, True) - base_b)
            lo, hi = interval(s, confidence)
            row[key] = {"value": float(v), "low": lo, "high": hi, "verdict": verdict(lo, hi), "samples": s}
        if "gain" in row and "room" in row:
            room = row["room"]
            if room["low"] > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = row["gain"]["samples"] / row["room"]["samples"]
                lo, hi = interval(ratio[row["room"]["samples"] > 0], confidence)
                row["captured"] = {"value": float(row["gain"]["value"] / room["value"]), "low": lo, "high": hi}
            else:
                row["captured"] = None
        for v in row.values():
            if isinstance(v, dict):
                v.pop("samples", None)
        out[name] = row
    return out


# --------------------------------------------------------------------------- headroom: the estimated room

FITS = ("scale", "power", "log", "power-span", "log-span", "quad")


def _smoothed_error(acc: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Per-class error with half an image of smoothing: a perfect class still has a finite log error."""
    return ((1 - acc) * support + 0.5) / (support + 1)


def fit_exponent(errors: dict[float, np.ndarray], topped: np.ndarray, support: np.ndarray, fit: str,
                 signed: bool = False) -> float:
    """Shared learning-curve parameter of the topped-up classes from their val error at each fraction.

    ``errors``: fraction -> per-class val error (1.0: the full real set). ``power``: the exponent b of
    ``e(f) = e(1) f^-b``; ``log``: the accuracy per e-fold of data, beta, of ``acc(f) = acc(1) + beta ln f``.
    Least squares through the origin over the (class, fraction) points; never negative unless ``signed`` (then a
    curve whose error rose with the data predicts a loss, and noise around a flat curve averages out instead of
    leaning up)."""
    full = errors[1.0][topped]
    xs, ys = [], []
    for f, e in errors.items():
        if f >= 1:
            continue
        x = np.log(f)
        if fit == "power":
            d = np.log(_smoothed_error(1 - e[topped], support[topped])) - \
                np.log(_smoothed_error(1 - full, support[topped]))
            ys.append(-d)  # log e(f) - log e(1) = -b ln f
        else:
            ys.append(-(e[topped] - full))  # acc(f) - acc(1) = beta ln f  ->  -(e(f) - e(1))
        xs.append(np.full(len(topped), x))
    x, y = np.concatenate(xs), np.concatenate(ys)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if not len(x):
        return 0.0
    b = float((x * y).sum() / (x * x).sum())
    return b if signed else max(0.0, b)


def fit_scale(errors: dict[float, np.ndarray], topped: np.ndarray, support: np.ndarray,
              counts: np.ndarray) -> tuple[float, float]:
    """(s0, s1) of the log-log slope ``s(u) = s0 + s1 u`` at ``u = ln n`` from the thinned classes' chords."""
    full = np.log(_smoothed_error(1 - errors[1.0][topped], support[topped]))
    us, ss = [], []
    for f, e in errors.items():
        if f < 1:
            part = np.log(_smoothed_error(1 - e[topped], support[topped]))
            ss.append((full - part) / -np.log(f))
            us.append(np.log(np.maximum(counts[topped], 1)) + np.log(f) / 2)
    u, s = np.concatenate(us), np.concatenate(ss)
    if len(u) >= 3 and np.ptp(u) > 0:
        s1, s0 = np.polyfit(u, s, 1)
        if s1 >= 0:
            return float(s0), float(s1)
    return float(min(0.0, s.mean())), 0.0


def _integral_slope(s0: float, s1: float, u0: np.ndarray, u1: np.ndarray, steps: int = 64) -> np.ndarray:
    """Integral of min(0, s0 + s1 u) du from u0 to u1 (per class)."""
    t = np.linspace(0, 1, steps)[None, :]
    u = u0[:, None] + (u1 - u0)[:, None] * t
    return np.trapezoid(np.minimum(0.0, s0 + s1 * u), u, axis=1)


def fit_quad(errors: dict[float, np.ndarray], topped: np.ndarray, support: np.ndarray) -> tuple[float, float]:
    """(b, c) of ``ln e(f) - ln e(1) = b ln f + c (ln f)^2`` over the topped-up classes' thinned points, c >= 0
    (a log-log curve that steepens with more data is not a learning curve: then c = 0, a power law)."""
    full = np.log(_smoothed_error(1 - errors[1.0][topped], support[topped]))
    xs, ys = [], []
    for f, e in errors.items():
        if f < 1:
            xs.append(np.full(len(topped), np.log(f)))
            ys.append(np.log(_smoothed_error(1 - e[topped], support[topped])) - full)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(set(np.round(x, 9))) >= 2:
        (b, c), *_ = np.linalg.lstsq(np.stack([x, x * x], 1), y, rcond=None)
        if c >= 0:
            return min(0.0, float(b)), float(c)
    return min(0.0, float((x * y).sum() / (x * x).sum())), 0.0


def class_gains(err_full: np.ndarray, topped: np.ndarray, mult: np.ndarray, param, fit: str,
                support: np.ndarray) -> np.ndarray:
    """Predicted accuracy gain of every class (0 for classes not topped up) for data multipliers ``mult``. A
    negative power exponent or log slope (``signed`` fits) predicts a loss, at most the class's accuracy."""
    gain = np.zeros(len(err_full))
    e = err_full[topped]
    if fit in ("power", "log") and param < 0:
        m = np.maximum(mult[topped], 1.0)
        es = _smoothed_error(1 - e, support[topped])
        loss = es * (1 - m ** (-param)) if fit == "power" else param * np.log(m)
        gain[topped] = np.maximum(loss, -(1 - e))
        return gain
    m = np.maximum(mult[topped], 1.0)
    if fit == "scale":
        s0, s1, n = param
        u0 = np.log(np.maximum(n[topped], 1))
        es = _smoothed_error(1 - e, support[topped])
        gain[topped] = np.clip(es * (1 - np.exp(_integral_slope(s0, s1, u0, u0 + np.log(m)))), 0, e)
    elif fit == "quad":
        b, c = param
        x = np.log(m)
        if c > 0:
            x = np.minimum(x, -b / (2 * c))  # the curve's lowest point
        es = _smoothed_error(1 - e, support[topped])
        gain[topped] = np.clip(es * (1 - np.exp(b * x + c * x * x)), 0, e)
    elif fit == "power":
        es = _smoothed_error(1 - e, support[topped])
        gain[topped] = np.clip(es * (1 - m ** (-param)), 0, e)
    else:
        gain[topped] = np.minimum(e, param * np.log(m))
    return gain


def estimate_room(y: np.ndarray, preds: dict[float, np.ndarray], train_counts, need, groups=None,
                  fit: str = "power", b: int = 300, confidence: float = 0.9, seed: int = 0,
                  curve=None, names=None, signed: bool = False,
                  calibration: tuple[float, float] | None = None) -> dict:
    """The room a perfect top-up to the plan's quota would give, from the val predictions of the recipe
    trained on the full real set (``preds[1.0]``) and with the topped-up classes thinned (``preds[f]``).

    ``train_counts``: real train images per class; ``need``: the plan's images to add per class; ``curve``: the
    classes the thinned models thinned (default: those with need > 0), whose learning curve the fit is made on.
    ``calibration``: (scale, spread) fitted across datasets (bench/room_study.py): the room becomes scale x the
    raw estimate, its interval ± spread x the raw estimate's bootstrap se (the raw numbers stay under ``raw``).
    Returns points of balanced accuracy: ``room``, ``low``, ``high``, ``groups`` (per group and the rarest
    classes), ``classes`` (each class's estimated gain with its interval, and what ``curve_gains`` needs to
    price other quotas), ``param`` (the fitted exponent or slope), the curve's balanced accuracy at each
    fraction, and the inputs."""
    if fit not in FITS:
        raise ValueError(f"unknown headroom fit '{fit}' (use {', '.join(FITS)})")
    fit_name = fit
    if 1.0 not in preds or len(preds) < 2:
        raise ValueError("estimate_room needs the full model (fraction 1.0) and at least one thinned one")
    counts = np.asarray(train_counts, dtype=float)
    need = np.asarray(need, dtype=float)
    nc = len(counts)
    topped = np.flatnonzero(need > 0)
    thinned = topped if curve is None else np.asarray(sorted(set(int(c) for c in curve)), dtype=np.int64)
    mult = (counts + need) / np.maximum(counts, 1)
    correct = {f: (np.asarray(p) == y).astype(np.float64) for f, p in preds.items()}
    point, boot = bootstrap_class_acc(y, correct, nc, b, seed)
    support = np.bincount(y, minlength=nc).astype(float)
    sets = class_sets(counts, groups)

    def one(acc: dict[float, np.ndarray]) -> tuple[float, np.ndarray]:
        err = {f: 1 - np.nan_to_num(a, nan=1.0) for f, a in acc.items()}
        if fit == "scale":
            param = (*fit_scale(err, thinned, support, counts), counts)
        elif fit == "quad":
            param = fit_quad(err, thinned, support)
        else:
            param = fit_exponent(err, thinned, support, fit, signed)
        return param, class_gains(err[1.0], topped, mult, param, fit, support)

    if fit.endswith("-span"):
        mult = np.minimum(mult, 1 / min(preds))
        fit = fit[: -len("-span")]
    param, gains = one(point)
    boots = np.stack([one({f: boot[f][i] for f in boot})[1] for i in range(b)])
    present = support > 0
    out = {"fit": fit_name, "signed": signed,
           "param": [float(x) for x in param[:2]] if isinstance(param, tuple) else param, "confidence": confidence, "fractions": sorted(preds, reverse=True),
           "curve_balanced_acc": {str(f): float(100 * np.nanmean(point[f])) for f in sorted(preds, reverse=True)},
           "topped_classes": topped.tolist(), "multiplier": mult.round(4).tolist(), "groups": {}}
    z = 1.6449  # the se behind a calibrated interval: the raw 90 % bootstrap interval's width / (2 z)

    def calibrated(v: float, lo: float, hi: float) -> dict:
        if calibration is None:
            return {"room": float(v), "low": lo, "high": hi}
        k, q = calibration
        se = (hi - lo) / (2 * z)
        return {"room": float(k * v), "low": float(k * v - q * se), "high": float(k * v + q * se),
                "raw": {"room": float(v), "low": lo, "high": hi}}

    if calibration is not None:
        out["calibration"] = {"scale": calibration[0], "spread": calibration[1]}
    for name, idx in sets.items():
        idx = idx[present[idx]]
        v = 100 * gains[idx].mean() if len(idx) else float("nan")
        lo, hi = interval(100 * boots[:, idx].mean(1), confidence) if len(idx) else (float("nan"),) * 2
        entry = calibrated(v, lo, hi)
        if name == "balanced":
            out.update(entry)
        else:
            out["groups"][name] = entry
    err_full = 1 - np.nan_to_num(point[1.0], nan=1.0)
    names = names or [str(c) for c in range(nc)]
    out["classes"] = []
    for c in range(nc):
        lo, hi = interval(100 * boots[:, c], confidence) if present[c] else (float("nan"),) * 2
        cal = calibrated(100 * gains[c], lo, hi)
        out["classes"].append({"label": c, "name": str(names[c]), "have": int(counts[c]), "need": int(need[c]),
                               "curve": bool(c in set(thinned.tolist())), "val_images": int(support[c]),
                               "val_error": float(err_full[c]), "gain": cal["room"], "low": cal["low"],
                               "high": cal["high"]})
    return out


def curve_gains(headroom: dict, add) -> np.ndarray:
    """Estimated accuracy gain of each class (a fraction, not points) if ``add[c]`` images were added to it, from
    a headroom result (``estimate_room`` / eval/headroom.json): its fit, fitted parameter and each class's val
    error on the full real set (smoothed by half an image, as the fit is). Classes off the learning curve gain 0.
    The span cap of the ``-span`` fits is NOT applied: pricing a quota is extrapolation by definition, and the
    planner caps quotas itself."""
    cls = headroom["classes"]
    add = np.asarray(add, dtype=float)
    counts = np.array([c["have"] for c in cls], dtype=float)
    support = np.array([c["val_images"] for c in cls], dtype=float)
    # a class with no val error out of a few dozen images is not error-free: price it at its smoothed error
    err = _smoothed_error(1 - np.array([c["val_error"] for c in cls], dtype=float), support)
    support = np.full(len(cls), 1e12)  # already smoothed
    on = np.array([c["curve"] for c in cls], dtype=bool) & (add > 0)
    fit = headroom["fit"].removesuffix("-span")
    param = headroom["param"]
    if fit == "scale":
        param = (param[0], param[1], counts)
    elif fit == "quad":
        param = tuple(param)
    mult = (counts + add) / np.maximum(counts, 1)
    return class_gains(err, np.flatnonzero(on), mult, param, fit, support)


# --------------------------------------------------------------------------- the report's leading section

def _pt(v: float | None, signed: bool = True) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _iv(e: dict | None) -> str:
    if not e:
        return "–"
    return f"{e['value']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]"


def _cap(e: dict | None) -> str:
    if not e:
        return "–"
    return f"{100 * e['value']:.0f} % [{100 * e['low']:.0f}, {100 * e['high']:.0f}]"


def room_report(run, split: str, control: str, treated: str | None, oracle: str | None,
                why_no_oracle: str | None = None, b: int = 1000, confidence: float = 0.95) -> dict:
    """The report's leading section: room, gain and captured share on ``split``, with intervals and a plain
    verdict, plus the estimated room of eval/headroom.json when there is one. Returns a dict with
    ``markdown`` (and the numbers); arms without a prediction file are left out."""
    from tailforge.data.atomic import read_json

    from .evaluate import eval_path, load_pred

    ev = {m: read_json(eval_path(run, m, split)) for m in (control, treated, oracle)
          if m and eval_path(run, m, split).exists()}
    preds = {}
    for m in ev:
        got = load_pred(run, m, split)
        if got is not None:
            y, preds[m] = got
    lines = [f"## Room and capture ({split} split, balanced accuracy in points)", ""]
    res: dict = {"split": split, "control": control, "treated": treated, "oracle": oracle, "confidence": confidence}
    if control not in preds:
        lines.append(f"(no predictions of `{control}` on the {split} split: evaluate it again to get this section)")
        res["markdown"] = "\n".join(lines) + "\n"
        return res
    c = ev[control]
    counts = c.get("real_train_counts") or c.get("train_counts")
    sets = class_sets(counts, c.get("groups"))
    names = c.get("class_names") or [str(i) for i in range(len(counts))]
    t = treated if treated in preds else None
    o = oracle if oracle in preds else None
    rc = room_and_capture(y, preds, control, t, o, sets, len(counts), b, confidence)
    res["sets"] = rc
    bal = rc["balanced"]
    level = f"{100 * confidence:.0f} %"
    gain, room = bal.get("gain"), bal.get("room")
    if room:
        head = (f"**Room:** a perfect generator (the long tail's held-back real train images, arm `{o}`) adds "
                f"**{_iv(room)}** points to the real-only recipe `{control}` ({level} interval, paired bootstrap "
                f"over the {split} images: {room['verdict']}).")
        lines += [head, ""]
    elif why_no_oracle:
        lines += [f"**No oracle arm:** {why_no_oracle}.", ""]
    if gain:
        word = {"helped": "helped", "hurt": "did not help, it hurt",
                "within noise": "did not help (the difference is within noise)"}[gain["verdict"]]
        cap = bal.get("captured")
        capture = (f"; it captured **{_cap(cap)}** of the room" if cap else
                   (f"; the room's interval does not exclude 0 (perfect data {room['verdict']}), so no share is "
                    "given" if room else ""))
        lines += [f"**Synthetic data {word}:** `{t}` is **{_iv(gain)}** points against `{control}`{capture}.", ""]
        lines += _against_reference(run, split, y, preds, t, sets, len(counts), b, confidence, res)
    rows = [("balanced accuracy", "balanced")] + [(f"{g}-shot classes", g) for g in GROUPS if g in rc]
    if "rarest" in rc:
        rows.append((f"{len(sets['rarest'])} rarest classes ({', '.join(str(names[i]) for i in sets['rarest'])})",
                     "rarest"))
    hdr = f"| {split} split | {control} |" + (f" {t} |" if t else "") + (f" {o} |" if o else "")
    hdr += (" gain |" if t else "") + (" room |" if o else "") + (" captured |" if t and o else "")
    lines += [hdr, "|---|" + "---:|" * (hdr.count("|") - 2)]
    for label, key in rows:
        idx = sets[key]

        def acc(m):
            pc = np.array([x if x is not None else np.nan for x in ev[m]["per_class"]], dtype=float)
            return 100 * np.nanmean(pc[idx])

        r = rc[key]
        cells = [_pt(acc(control), False)] + ([_pt(acc(t), False)] if t else []) + ([_pt(acc(o), False)] if o else [])
        cells += ([_iv(r.get("gain"))] if t else []) + ([_iv(r.get("room"))] if o else [])
        cells += ([_cap(r.get("captured"))] if t and o else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    hr_path = run.eval_dir / "headroom.json"
    if hr_path.exists():
        hr = read_json(hr_path)
        res["headroom"] = {k: hr.get(k) for k in ("room", "low", "high", "fit", "split")}
        lines += ["", f"**Estimated room** from the real train and val splits alone (`tailforge headroom`, "
                  f"{hr.get('fit')} fit of the {hr.get('split', 'val')} learning curve, "
                  f"{100 * hr.get('confidence', 0.9):.0f} % interval): **{hr['room']:+.1f} "
                  f"[{hr['low']:+.1f}, {hr['high']:+.1f}]** points"
                  + (f" (exact: {room['value']:+.1f})." if room else ".")
                  + " Checked against the exact room on twelve datasets × seeds (bench/results/room_study.md), "
                  "the default estimate erred by about 1.1 points on average, as often low as high, and up to "
                  "3.6 (over) where a from-scratch recipe could not use the extra images at its fixed budget; "
                  "its interval, widened by a spread fitted across datasets, held the exact room on 33 of 36 "
                  "runs there: read it, not the point, before spending GPU hours."]
        per = per_class_lines(hr, ev[control], ev[o] if o else None, split)
        lines += per["lines"]
        res["per_class"] = {k: v for k, v in per.items() if k != "lines"}
    lines += ["", f"_Intervals: {b} paired bootstrap draws of the {split} images within each class. They hold the "
              "sampling noise of the evaluated images, not the seed-to-seed spread of training "
              "(bench/room_table.py reports that over seeds)._"]
    res["markdown"] = "\n".join(lines) + "\n"
    return res


def _against_reference(run, split: str, y, preds: dict, treated: str | None, sets: dict, num_classes: int, b: int,
                       confidence: float, res: dict) -> list[str]:
    """Where the frozen base network's own head beat every re-trained real-only head on VAL
    (eval/candidates.json ``reference.above``), ``treated`` measured against it too: the strongest real-only
    model, not only the same head on real data. Lines for the report (none otherwise); fills ``res``."""
    from tailforge.data.atomic import read_json

    from .evaluate import load_pred

    f = run.eval_dir / "candidates.json"
    c = read_json(f) if f.is_file() else {}
    ref = c.get("reference")
    if not treated or treated not in preds or not ref or not ref.get("above"):
        return []
    m = ref["model"]
    got = preds.get(m)
    if got is None:
        got = (load_pred(run, m, split) or (None, None))[1]
    head = (f"**Against the strongest real-only model on VAL:** the frozen base network's own head `{m}` beat every "
            f"re-trained head on the val split ({100 * ref['val_balanced_acc']:.2f} against "
            f"{100 * c['scores'][c['chosen']]:.2f} for `{c['chosen']}`)")
    if got is None:
        return [head + f"; evaluate `{m}` on the {split} split to measure `{treated}` against it.", ""]
    g = room_and_capture(y, {**preds, m: got}, m, treated, None, {"balanced": sets["balanced"]}, num_classes, b,
                         confidence)["balanced"]["gain"]
    res["against_reference"] = {"model": m, **g}
    return [head + f"; `{treated}` is **{_iv(g)}** points against it ({g['verdict']}).", ""]


def per_class_rank(hr: dict, control_eval: dict, oracle_eval: dict) -> dict:
    """Estimated per-class gains (headroom, VAL) against the oracle arm's per-class gains on the evaluated split,
    over the classes the plan tops up: Spearman's rank correlation and the number of classes."""
    import pandas as pd

    cls = [c for c in hr.get("classes", []) if c["need"] > 0]
    pc = lambda e: np.array([np.nan if x is None else x for x in e["per_class"]], dtype=float)  # noqa: E731
    exact = 100 * (pc(oracle_eval) - pc(control_eval))
    est = np.array([c["gain"] for c in cls])
    ex = np.array([exact[c["label"]] for c in cls])
    ok = np.isfinite(ex) & np.isfinite(est)
    rho = float(pd.Series(est[ok]).corr(pd.Series(ex[ok]), method="spearman")) \
        if ok.sum() >= 3 and np.ptp(est[ok]) > 0 and np.ptp(ex[ok]) > 0 else float("nan")
    return {"spearman": rho, "classes": int(ok.sum()), "estimated": est.tolist(), "exact": ex.tolist(),
            "labels": [c["label"] for c in cls]}


def per_class_lines(hr: dict, control_eval: dict, oracle_eval: dict | None, split: str, k: int = 3) -> dict:
    """The report's per-class room: the classes with the most and the least estimated room (headroom's per-class
    gains, VAL) and, with an oracle arm, how well they rank the exact per-class gains on ``split``."""
    cls = [c for c in hr.get("classes", []) if c["need"] > 0]
    if not cls:
        return {"lines": []}
    order = sorted(cls, key=lambda c: -c["gain"])
    fmt = lambda c: f"{c['name']} {c['gain']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"  # noqa: E731
    lines = ["", f"**Estimated room per class** ({len(cls)} topped-up classes, points of the class's own accuracy, "
             f"eval/headroom.json): most in {'; '.join(fmt(c) for c in order[:k])}; least in "
             f"{'; '.join(fmt(c) for c in order[::-1][:k])}."]
    out = {}
    if oracle_eval is not None:
        out = per_class_rank(hr, control_eval, oracle_eval)
        if np.isfinite(out["spearman"]):
            lines[-1] += (f" Against the oracle arm's per-class gains on the {split} split: Spearman "
                          f"{out['spearman']:+.2f} over {out['classes']} classes.")
    out["lines"] = lines
    return out


def write_headroom(run, points: dict[float, str], fit: str = "power", b: int = 300, confidence: float = 0.9,
                   signed: bool = False, calibration: tuple[float, float] | None = None) -> dict:
    """``tailforge headroom``'s output: ``estimate_room`` on the VAL predictions of ``points`` (fraction -> model
    name, 1.0 the real-only recipe), the plan's need and the real train counts; written to eval/headroom.json."""
    from tailforge.data import ClassStats, TailforgeError
    from tailforge.data.atomic import read_json, write_json

    from .evaluate import load_pred

    stats = ClassStats.load(run)
    plan = read_json(run.require(run.plan, "plan"))
    counts = np.asarray(stats.counts["train"], dtype=float)
    need = np.zeros(len(counts))
    for q in plan["classes"]:
        need[int(q["label"])] = int(q["need"])
    preds, y = {}, None
    for f, name in points.items():
        got = load_pred(run, name, "val")
        if got is None:
            raise TailforgeError(f"model '{name}' has no predictions on the val split",
                                 f"evaluate it: `tailforge eval --run {run.root} --model-name {name} --split val`")
        y, preds[f] = got
    if not (need > 0).any():
        raise TailforgeError("the plan tops up no class, so there is no room to estimate",
                             "plan a top-up first (`tailforge plan --run RUN --target balance`)")
    res = estimate_room(y, preds, counts, need, stats.groups, fit=fit, b=b, confidence=confidence,
                        curve=plan.get("curve_classes"), names=stats.class_names, signed=signed,
                        calibration=calibration)
    res.update({"split": "val", "models": {str(f): n for f, n in points.items()},
                "note": "estimated from the real train and val splits alone: no held-back image is used"})
    write_json(run.eval_dir / "headroom.json", res)
    return res
