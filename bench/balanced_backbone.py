"""Which backbone should the crt recipe freeze, and do synthetic tail IMAGES make it better? VAL split only.

Every arm trains the tiny CNN from scratch for ``--epochs`` at the same number of optimizer steps
(epochs x ceil(n_real / batch); SGD nesterov, cosine, 1 warm-up epoch, basic augmentation), then
re-trains a linear head on its frozen features (cRT: CE, class-balanced sampling, equal steps; best
epoch on val) and is scored on VAL:

  inst  CE with instance sampling: the baseline, the backbone the recipe froze until now
  cb    CE on real + re-sampled real tail images up to the largest class (class-balanced
        re-sampling for the whole training): the real-only control
  warp  CE on real + the same number of ``warp`` images (tailforge.gen.warp: each a deformed real
        image of its class) in place of the re-sampled duplicates: synthetic tail images
  fa    as cb, but from epoch 2 on each re-sampled duplicate's FEATURE gets featcov's variation during
        training (+ ``--fa-scale`` x L z, L L^T = the head classes' mean within-class covariance,
        re-estimated from the current network at each epoch): synthetic tail features end to end,
        so the backbone itself learns from them (feature-space augmentation, cf. Chu et al. 2020)

For warp, cRT runs on real features (``crt``) and on real + synthetic features (``crt_all``, what the
recipe's rebalanced arm does). Results: bench/results/balanced_backbone.md.

    python bench/balanced_backbone.py --run runs/letters-s0 runs/letters-s1 runs/letters-s2 --arms inst cb warp
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_study import crt_head, feats, load, to_x  # noqa: E402
from feature_study import bal_acc, predict, tail3  # noqa: E402

from tailforge.data import RunDir
from tailforge.gen import WarpOptions, warp_images
from tailforge.train.augment import augment
from tailforge.train.models import create_model


def top_up(X, Y, counts, nc, seed, opts=None):
    """Each class up to the largest: re-sampled real images (opts None) or warp images of them."""
    rng = np.random.default_rng(1000 + seed)
    xs, ys = [], []
    for c in range(nc):
        need = int(counts.max() - counts[c])
        if need <= 0:
            continue
        pick = rng.choice(np.flatnonzero(Y.numpy() == c), need)
        x = X[pick]
        if opts is not None:
            seeds = rng.integers(0, 2**62, need)
            x = torch.cat([warp_images(x[i:i + 512], seeds[i:i + 512], opts) for i in range(0, need, 512)])
        xs.append(x)
        ys.append(torch.full((need,), c))
    return torch.cat([X] + xs), torch.cat([Y] + ys)


def head_factor(model, X, Y, counts, norm, rng, per=300):
    """Cholesky factor of the head classes' mean within-class feature covariance under the current network."""
    head = [c for c in range(len(counts)) if counts[c] >= np.median(counts) and counts[c] >= 3]
    was = model.training
    model.eval()
    covs = []
    with torch.no_grad():
        for h in head:
            idx = np.flatnonzero(Y.numpy() == h)
            idx = rng.choice(idx, min(per, len(idx)), replace=False)
            covs.append(np.cov(model.forward_features(norm(X[idx])).double().numpy().T))
    model.train(was)
    cov = np.mean(covs, 0)
    d = len(cov)
    cov += 1e-6 * max(np.trace(cov) / d, 1e-12) * np.eye(d)
    return torch.from_numpy(np.linalg.cholesky(cov).astype(np.float32))


def train_backbone(X, Y, nc, steps_epoch, epochs, seed, norm, bs=128, lr=0.1, fa=None):
    """``fa``: (dup mask over X, real X, real Y, real counts, scale) for the feature-augmented arm."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model("tiny", nc, X.shape[1], X.shape[-1])
    decay = [p for p in model.parameters() if p.ndim > 1]
    no = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no, "weight_decay": 0}], lr=lr,
                          momentum=0.9, nesterov=True)
    total = epochs * steps_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / steps_epoch if t < steps_epoch else
                                              0.5 * (1 + np.cos(np.pi * (t - steps_epoch) / max(1, total - steps_epoch))))
    order = np.array([], dtype=np.int64)
    model.train()
    L = None
    for t in range(total):
        if fa is not None and t % steps_epoch == 0 and t >= steps_epoch:
            L = head_factor(model, fa[1], fa[2], fa[3], norm, rng)
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(len(X))])
        idx, order = torch.from_numpy(order[:bs]), order[bs:]
        f = model.forward_features(norm(augment(X[idx], "basic", False, gen)))
        if L is not None:
            z = torch.randn(f.shape, generator=gen) @ L.T
            f = torch.relu(f + fa[4] * fa[0][idx][:, None].float() * z)
        loss = F.cross_entropy(model.forward_head(f), Y[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train seed per run (default 0, 1, 2, ...)")
    ap.add_argument("--arms", nargs="+", default=["inst", "cb", "warp"], choices=["inst", "cb", "warp", "fa"])
    ap.add_argument("--epochs", type=int, default=20)
    for k, f in WarpOptions.model_fields.items():
        if f.annotation is float:
            ap.add_argument("--" + k.replace("_", "-"), type=float, default=f.default)
    ap.add_argument("--fa-scale", type=float, default=0.5, help="fa: scale of the borrowed feature variation")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    opts = WarpOptions(**{k: getattr(a, k) for k in WarpOptions.model_fields if hasattr(a, k)})
    res = {}
    for r, seed in zip(a.run, a.seeds or range(len(a.run))):
        data, info = load(RunDir(r))
        Xtr, Ytr = to_x(data["train"][0]), torch.from_numpy(data["train"][1].astype(np.int64))
        Xva, yva = to_x(data["val"][0]), data["val"][1]
        nc = int(Ytr.max()) + 1
        counts = np.bincount(Ytr.numpy(), minlength=nc)
        mean, std = Xtr.mean(), Xtr.std()
        norm = lambda x: (x - mean) / std  # noqa: E731
        steps = int(np.ceil(len(Xtr) / 128))
        for arm in a.arms:
            t0 = time.time()
            X, Y = (Xtr, Ytr) if arm == "inst" else top_up(Xtr, Ytr, counts, nc, seed, opts if arm == "warp" else None)
            fa = None
            if arm == "fa":
                dup = torch.zeros(len(X), dtype=torch.bool)
                dup[len(Xtr):] = True
                fa = (dup, Xtr, Ytr, counts, a.fa_scale)
            model = train_backbone(X, Y, nc, steps, a.epochs, seed, norm, fa=fa)
            with torch.no_grad():
                direct = bal_acc(yva, model(norm(Xva)).argmax(1).numpy())
            fva = feats(model, Xva, norm)
            row = {"direct": direct}
            for name, (XX, YY) in {"crt": (Xtr, Ytr), "crt_all": (X, Y)}.items():
                if name == "crt_all" and arm != "warp":
                    continue
                f = feats(model, XX, norm)
                head = crt_head(f, YY.numpy(), counts, nc, (fva, yva))
                pv = predict(head, fva)
                row[name], row[name + "_rare3"] = bal_acc(yva, pv), tail3(yva, pv, counts)
            res.setdefault(arm, []).append(row)
            print(f"{r} seed {seed} {arm}: " + " ".join(f"{k} {v * 100:.2f}" for k, v in row.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    print(f"VAL balanced accuracy, mean ± std over {len(a.run)} run(s); warp options {opts.model_dump()}")
    for arm, rows in res.items():
        print(f"{arm:5s} " + "  ".join(f"{k} {np.mean([r[k] for r in rows]) * 100:.2f}±"
                                       f"{np.std([r[k] for r in rows]) * 100:.2f}" for k in rows[0]))


if __name__ == "__main__":
    main()
