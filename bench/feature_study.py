"""Feature-space study: which synthetic-feature recipe helps classifier re-training (cRT), on VAL.

This is the study the defaults of ``flows/recipes/small-images.yaml`` were chosen from. It works on
the frozen features of a trained backbone (``models/<backbone>`` of a run folder): every arm
re-trains only the linear head, so one arm costs seconds and many arms fit a CPU budget.
Selection uses the VAL split only; the test split is printed only with ``--report-test``
(for the final table, never for choosing).

    python bench/feature_study.py --run runs/f100-s0 --backbone ce --arms all

Arms: ``real`` (cRT on real features), ``<gen>`` (real + all candidates of a feature generator:
featdict, fdiff), ``<gen>+filter`` (the embedding filter's accepted candidates), ``<gen>+random``
(a random subset of the accepted count), with knobs for the amount, the prior counts and the
synthetic weight.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tailforge.data import RunDir, load_images, read_manifest
from tailforge.train import TrainConfig
from tailforge.train.checkpoint import embed, load_model
from tailforge.train.losses import build_loss


def split_features(run: RunDir, backbone: str):
    """{split: (features, labels)} of the run's real images, cached under <run>/study/."""
    cache = run.root / "study" / f"feats-{backbone}.npz"
    if cache.exists():
        z = np.load(cache)
        return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "val", "test")}
    model, meta = load_model(run.model_dir(backbone))
    info = run.dataset_info()
    df = read_manifest(run.real)
    out = {}
    for s in ("train", "val", "test"):
        d = df[(df["split"] == s) & (df["source"] == "real")]
        imgs = load_images(d["uri"], run.root, int(info["channels"]), tuple(info["image_size"]))
        out[s] = (embed(model, meta, imgs), d["label"].to_numpy())
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, **{f"{s}_{k}": v for s, (x, y) in out.items() for k, v in zip("xy", (x, y))})
    return out


def with_head(run: RunDir, backbone: str, feats: dict) -> dict:
    model, _ = load_model(run.model_dir(backbone))
    feats["head"] = (model.head.weight.detach().numpy(), model.head.bias.detach().numpy())
    return feats


def train_head(x, y, w, counts, nc, *, loss="balanced_softmax", epochs=4, lr=0.1, bs=128, seed=0,
               sampler="instance", val=None, epoch_n="data"):
    """Linear head, SGD (momentum .9, nesterov, wd 5e-4 on weights), cosine, warmup 1 epoch; best epoch on val."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    head = torch.nn.Linear(x.shape[1], nc)
    cfg = TrainConfig(loss=loss, epochs=epochs)
    lf = build_loss(cfg, counts)
    opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": 5e-4}, {"params": [head.bias], "weight_decay": 0}],
                          lr=lr, momentum=0.9, nesterov=True)
    X, Y, W = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(w.astype(np.float32))
    n_epoch = nc * int(np.bincount(y[w == 1.0] if (w == 1.0).any() else y, minlength=nc).max()) \
        if epoch_n == "balanced" else len(x)
    steps = max(1, n_epoch // bs)
    total, warm = epochs * steps, steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warm if t < warm else
                                              0.5 * (1 + np.cos(np.pi * (t - warm) / max(1, total - warm))))
    best, best_state = -1, None
    for ep in range(epochs):
        if sampler == "class_balanced":
            per = [np.flatnonzero(y == c) for c in range(nc)]
            order = np.concatenate([g.choice(p, n_epoch // nc) for p in per if len(p)])
            g.shuffle(order)
        else:
            order = g.permutation(len(x))
        for t in range(steps):
            i = torch.from_numpy(order[t * bs:(t + 1) * bs])
            per_s = lf(head(X[i]), Y[i], ep)
            l = (W[i] * per_s).sum() / W[i].sum()
            opt.zero_grad()
            l.backward()
            opt.step()
            sched.step()
        if val is not None:
            acc = bal_acc(val[1], predict(head, val[0]))
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    return head


@torch.no_grad()
def predict(head, x):
    return head(torch.from_numpy(x.astype(np.float32))).argmax(1).numpy()


def bal_acc(y, p):
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def tail3(y, p, counts):
    rare = np.argsort(counts, kind="stable")[:3]
    return float(np.mean([(p[y == c] == c).mean() for c in rare]))


def featdict_candidates(x, y, nc, need, seed=0, atoms=32, k=5, variation=0.5):
    from tailforge.gen import FeatureDictOversampler
    from tailforge.gen.shards import sample_seed

    fd = FeatureDictOversampler(n_atoms=atoms, k_neighbors=k, variation=variation).fit(x, y)
    xs, ys = [], []
    for c in range(nc):
        if need[c] > 0:
            xs.append(fd.sample(c, [sample_seed(seed, c, i) for i in range(need[c])]))
            ys.append(np.full(need[c], c))
    return (np.concatenate(xs), np.concatenate(ys)) if xs else (np.zeros((0, x.shape[1]), np.float32), np.zeros(0, int))


def covariance_candidates(x, y, nc, need, seed=0, scale=1.0, k_head=0, shrink=0.0, tukey=False):
    """Tail anchor + Gaussian noise with the within-class covariance of the head (borrowed variation)."""
    counts = np.bincount(y, minlength=nc)
    nonneg = x.min() >= 0
    z = np.sqrt(x) if tukey else x
    mu = np.stack([z[y == c].mean(0) for c in range(nc)])
    head = [c for c in range(nc) if counts[c] >= np.median(counts)]
    covs = {c: np.cov(z[y == c].T) for c in head}
    xs, ys = [], []
    rng0 = np.random.default_rng(seed)
    for c in range(nc):
        if need[c] <= 0:
            continue
        if k_head:
            near = sorted(head, key=lambda h: ((mu[h] - mu[c]) ** 2).sum())[:k_head]
        else:
            near = head
        cov = np.mean([covs[h] for h in near], 0)
        if shrink:
            cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov))
        L = np.linalg.cholesky(cov + 1e-6 * np.eye(len(cov)))
        zc = z[y == c]
        rng = np.random.default_rng([seed, c])
        a = zc[rng.integers(len(zc), size=need[c])]
        out = a + scale * rng.standard_normal((need[c], z.shape[1])) @ L.T
        if tukey:
            out = np.maximum(out, 0) ** 2
        elif nonneg:
            out = np.maximum(out, 0)
        xs.append(out.astype(np.float32))
        ys.append(np.full(need[c], c))
    return np.concatenate(xs), np.concatenate(ys)


def featcov_candidates(x, y, nc, need, seed=0, **kw):
    """The shipped featcov generator (gen/featcov.py), seeded per sample like a generation shard."""
    from tailforge.gen import FeatureCovOversampler
    from tailforge.gen.shards import sample_seed

    o = FeatureCovOversampler(**kw).fit(x, y)
    xs = [o.sample(c, [sample_seed(seed, c, i) for i in range(need[c])]) for c in range(nc) if need[c] > 0]
    ys = [np.full(need[c], c) for c in range(nc) if need[c] > 0]
    return np.concatenate(xs), np.concatenate(ys)


def fdiff_candidates(x, y, nc, need, seed=0, **kw):
    """The shipped fdiff generator (gen/fdiff.py)."""
    from tailforge.gen import FeatureDiffusion
    from tailforge.gen.shards import sample_seed

    t0 = time.time()
    m = FeatureDiffusion(seed=seed, **kw).fit(x, y)
    xs = [m.sample(c, [sample_seed(seed, c, i) for i in range(need[c])]) for c in range(nc) if need[c] > 0]
    print(f"  fdiff fit+sample {time.time() - t0:.0f} s", flush=True)
    ys = [np.full(need[c], c) for c in range(nc) if need[c] > 0]
    return np.concatenate(xs), np.concatenate(ys)


GENERATORS = {"featdict": featdict_candidates, "cov": covariance_candidates, "featcov": featcov_candidates,
              "fdiff": fdiff_candidates}


def quotas(counts, target="balance", overgen=1.0):
    top = counts.max()
    if target == "balance":
        t = np.full_like(counts, top)
    elif target == "sqrt":
        t = np.ceil(np.sqrt(counts * top)).astype(int)
    need = np.maximum(t - counts, 0)
    return need, np.ceil(need * overgen).astype(int)


def unit_and_nearest_real(cand, real):
    """Unit-normalised candidates and each one's cosine similarity to its nearest real feature."""
    z = cand / (np.linalg.norm(cand, axis=1, keepdims=True) + 1e-12)
    r = real / (np.linalg.norm(real, axis=1, keepdims=True) + 1e-12)
    return z, (z @ r.T).max(1)


def run_arm(feats, nc, arm, seed):
    """One arm -> metrics on val (and test). ``arm``: dict of knobs."""
    xtr, ytr = feats["train"]
    counts = np.bincount(ytr, minlength=nc)
    x, y, src = xtr, ytr, np.zeros(len(ytr), bool)
    info = {}
    gen = arm.get("gen", "none")
    if gen != "none":
        need, make = quotas(counts, arm.get("target", "balance"), arm.get("overgen", 1.0))
        cx, cy = GENERATORS[gen](xtr, ytr, nc, make, seed=seed, **arm.get("gen_kw", {}))
        sel = arm.get("select", "all")
        if sel in ("entropy", "margin"):
            W, b = feats["head"]
            logits = cx @ W.T + b - np.log(counts / counts.sum())  # logit-adjusted (balanced) posterior
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            if sel == "entropy":
                score = -(p * np.log(p + 1e-12)).sum(1)
            else:  # small margin of the target over the best other class = near the boundary
                t = p[np.arange(len(cy)), cy]
                q = p.copy()
                q[np.arange(len(cy)), cy] = -1
                score = -np.abs(t - q.max(1))
            keep = np.zeros(len(cy), bool)
            for c in range(nc):
                idx = np.flatnonzero(cy == c)
                keep[idx[np.argsort(-score[idx], kind="stable")[:need[c]]]] = True
            cx, cy = cx[keep], cy[keep]
        elif sel.startswith("ptarget"):  # reject candidates the balanced posterior puts in another class, then random
            tau = float(sel.split(":")[1])
            W, b = feats["head"]
            logits = cx @ W.T + b - np.log(counts / counts.sum())
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            ok = p[np.arange(len(cy)), cy] >= tau
            info["rejected"] = int((~ok).sum())
            rng = np.random.default_rng(seed + 99)
            keep = np.zeros(len(cy), bool)
            for c in range(nc):
                idx = np.flatnonzero((cy == c) & ok)
                keep[rng.choice(idx, min(need[c], len(idx)), replace=False)] = True
            cx, cy = cx[keep], cy[keep]
        elif sel == "kcenter":  # farthest-point selection per class: coverage
            keep = np.zeros(len(cy), bool)
            for c in range(nc):
                idx = np.flatnonzero(cy == c)
                if need[c] <= 0 or not len(idx):
                    continue
                z, sim = unit_and_nearest_real(cx[idx], xtr[ytr == c])
                d = 1 - sim
                chosen = []
                for _ in range(min(need[c], len(idx))):
                    j = int(np.argmax(d))
                    chosen.append(j)
                    d = np.minimum(d, 1 - z @ z[j])
                    d[j] = -1
                keep[idx[chosen]] = True
            cx, cy = cx[keep], cy[keep]
        elif sel in ("novel", "typical"):  # rank by distance to the class's real features
            keep = np.zeros(len(cy), bool)
            for c in range(nc):
                idx = np.flatnonzero(cy == c)
                if need[c] <= 0 or not len(idx):
                    continue
                _, sim = unit_and_nearest_real(cx[idx], xtr[ytr == c])
                order = np.argsort(sim if sel == "novel" else -sim, kind="stable")
                keep[idx[order[:need[c]]]] = True
            cx, cy = cx[keep], cy[keep]
        elif sel.startswith("guard"):  # the filter's guard rules (+ optional knn-share-0 wrong_class), random quota
            from tailforge.eval.filter import FilterConfig
            from tailforge.eval.filter.score import score_arrays

            fcfg = FilterConfig(**arm.get("filter_kw", {}))
            frame, _ = score_arrays(xtr, ytr, cx, cy, {c: int(need[c]) for c in range(nc)}, fcfg, num_classes=nc,
                                    guard=True)
            acc = frame["accepted"].to_numpy()
            info["reasons"] = frame.loc[~acc, "reason"].value_counts().to_dict()
            cx, cy = cx[acc], cy[acc]
        elif sel == "random-need":
            rng = np.random.default_rng(seed + 99)
            keep = np.zeros(len(cy), bool)
            for c in range(nc):
                idx = np.flatnonzero(cy == c)
                keep[rng.choice(idx, min(need[c], len(idx)), replace=False)] = True
            cx, cy = cx[keep], cy[keep]
        elif sel != "all":
            from tailforge.eval.filter import FilterConfig, score_arrays

            fcfg = FilterConfig(**arm.get("filter_kw", {}))
            frame, _ = score_arrays(xtr, ytr, cx, cy, {c: int(need[c]) for c in range(nc)}, fcfg, num_classes=nc)
            acc = frame["accepted"].to_numpy()
            info["reasons"] = frame.loc[~acc, "reason"].value_counts().to_dict()
            if sel == "random":
                rng = np.random.default_rng(seed + 99)
                keep = np.zeros(len(cy), bool)
                for c in range(nc):
                    idx = np.flatnonzero(cy == c)
                    n = int(acc[idx].sum())
                    keep[rng.choice(idx, n, replace=False)] = True
                acc = keep
            cx, cy = cx[acc], cy[acc]
        info["n_syn"] = int(len(cy))
        x, y = np.concatenate([xtr, cx]), np.concatenate([ytr, cy])
        src = np.r_[src, np.ones(len(cy), bool)]
    w = np.where(src, arm.get("weight", 1.0), 1.0)
    prior = counts if arm.get("prior", "real") == "real" else np.bincount(y, minlength=nc)
    head = train_head(x, y, w, prior, nc, loss=arm.get("loss", "balanced_softmax"), epochs=arm.get("epochs", 4),
                      lr=arm.get("lr", 0.1), seed=seed, sampler=arm.get("sampler", "instance"), val=feats["val"],
                      epoch_n=arm.get("epoch_n", "data"))
    out = {}
    for s in ("val", "test"):
        xs, ys = feats[s]
        p = predict(head, xs)
        out[s] = {"bal": bal_acc(ys, p), "tail3": tail3(ys, p, counts)}
    return out, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", required=True, help="run folders (one per seed/dataset)")
    ap.add_argument("--backbone", default="ce")
    ap.add_argument("--arms", required=True, help="JSON list of arm dicts")
    ap.add_argument("--report-test", action="store_true", help="also print test numbers (final table only)")
    ap.add_argument("--md", default=None, help="append the mean table (val) to this markdown file")
    ap.add_argument("--title", default="", help="heading of the markdown table")
    a = ap.parse_args(argv)
    arms = json.loads(a.arms)
    res = {}
    for r in a.run:
        run = RunDir(r)
        feats = with_head(run, a.backbone, split_features(run, a.backbone))
        nc = int(run.dataset_info()["num_classes"])
        seed = int(run.dataset_info().get("fingerprint", {}).get("seed", 0))
        for j, arm in enumerate(arms):
            t0 = time.time()
            out, info = run_arm(feats, nc, arm, seed)
            res.setdefault(j, []).append(out)
            print(f"{r} arm{j} {json.dumps(arm)} val {out['val']['bal']*100:.2f} tail3 {out['val']['tail3']*100:.1f}"
                  + (f" | test {out['test']['bal']*100:.2f}" if a.report_test else "") + f" {info} {time.time()-t0:.1f}s",
                  flush=True)
    if a.md:
        lines = [f"### {a.title or ', '.join(a.run)}", "",
                 f"`python bench/feature_study.py --run {' '.join(a.run)} --backbone {a.backbone} --arms ...` "
                 f"(VAL split, balanced accuracy %, mean ± std over {len(a.run)} run(s); rare3 = the three classes "
                 "with the fewest real train images)", "",
                 "| arm | val bal. acc | Δ vs first arm | val rare3 |", "|---|---:|---:|---:|"]
        ref = np.array([o["val"]["bal"] for o in res[0]]) * 100
        for j, arm in enumerate(arms):
            v = np.array([o["val"]["bal"] for o in res[j]]) * 100
            t = np.array([o["val"]["tail3"] for o in res[j]]) * 100
            lines.append(f"| {arm.get('label', json.dumps({k: x for k, x in arm.items() if k != 'label'}))} | "
                         f"{v.mean():.2f} ± {v.std():.2f} | {(v - ref).mean():+.2f} | {t.mean():.1f} |")
        with open(a.md, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    print("\nmean over runs (val balanced acc, tail3):")
    for j, arm in enumerate(arms):
        v = np.array([o["val"]["bal"] for o in res[j]]) * 100
        t = np.array([o["val"]["tail3"] for o in res[j]]) * 100
        extra = ""
        if a.report_test:
            te = np.array([o["test"]["bal"] for o in res[j]]) * 100
            extra = f" | test {te.mean():.2f} +- {te.std():.2f}"
        print(f"  {v.mean():6.2f} +- {v.std():.2f}  tail3 {t.mean():5.1f}  {json.dumps(arm)}{extra}")


if __name__ == "__main__":
    main()
