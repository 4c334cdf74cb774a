"""Backbone-level study: can synthetic IMAGES from head-to-tail translation (M2m, Kim et al. CVPR 2020)
give cRT a better backbone than real data at the same number of optimizer steps? VAL split only.

Every arm trains the tiny CNN from scratch with the same steps (epochs x ceil(n_train / batch)), SGD
(nesterov, cosine, 1 warm-up epoch), basic augmentation; then a linear head is re-trained on its frozen
features (cRT: CE, class-balanced sampling, equal steps, as the recipe) and scored on VAL:

  inst  CE with instance sampling for every epoch (the recipe's baseline backbone)
  drs   instance sampling for ``--warm`` epochs, then class-balanced re-sampling (real duplicates): the
        deferred re-sampling real-only control
  m2m   as drs, but a sample drawn for class k is replaced, with probability 1 - N_k / N_max, by a head
        image of the same batch translated towards k: ``--iters`` L2 steps on
        CE(g(x), k) + lam * f_seed(x) from a random start, accepted when the run's CE baseline g gives k a
        probability >= gamma (M2m's generation, train.py of alinlab/M2m, re-written here)

    python bench/backbone_study.py --run runs/f100-s0 runs/f100-s1 runs/f100-s2 --arms inst drs m2m \
        --step 0.5 --gamma 0.5

The run folders are tailforge run folders with a trained CE model (``--g``, default ``ce``), as made for
bench/feature_study.py. Results: bench/results/backbone_study.md.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_study import bal_acc, predict, tail3, train_head  # noqa: E402

from tailforge.data import RunDir, load_images, read_manifest
from tailforge.train.augment import augment
from tailforge.train.checkpoint import load_model
from tailforge.train.models import create_model

torch.set_num_threads(1)


def load(run, splits=("train", "val")):
    info = run.dataset_info()
    df = read_manifest(run.real)
    out = {}
    for s in splits:
        d = df[(df["split"] == s) & (df["source"] == "real")]
        out[s] = (load_images(d["uri"], run.root, int(info["channels"]), tuple(info["image_size"])),
                  d["label"].to_numpy())
    return out, info


def to_x(u8):
    """uint8 N x H x W (x C) -> float [0, 1] N x C x H x W."""
    x = torch.from_numpy(u8).float().div(255)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def crt_head(f, y, counts, nc, val):
    """The recipe's cRT head on frozen features: linear, CE, class-balanced sampling, 10 balanced epochs,
    best epoch on ``val`` = (features, labels)."""
    return train_head(f, y, np.ones(len(f)), counts, nc, loss="ce", epochs=10, lr=0.1,
                      sampler="class_balanced", val=val, epoch_n="balanced")


def feats(model, X01, norm, bs=512):
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X01), bs):
            out.append(model.forward_features(norm(X01[i:i + bs])))
    return torch.cat(out).numpy()


def m2m_translate(g, f, norm, x0, y0, tgt, *, gamma=0.9, lam=0.5, step=0.1, iters=10, beta=0.999, gen=None):
    """Translate seed images x0 (labels y0) towards targets tgt; returns images and accept mask."""
    g.eval()
    was = f.training
    f.eval()
    x = x0.clone()
    noise = (torch.rand(x.shape, generator=gen) - 0.5)
    noise = noise.flatten(1).renorm(p=2, dim=0, maxnorm=0.5).view_as(x)
    x = (x + noise).clamp(0, 1)
    for _ in range(iters):
        x = x.detach().requires_grad_(True)
        lg = g(norm(x))
        lf = f(norm(x))
        loss = F.cross_entropy(lg, tgt) + lam * lf.gather(1, y0[:, None]).mean()
        gr, = torch.autograd.grad(loss, [x])
        gn = gr.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = (x - step * gr / (gn + 1e-10)).clamp(0, 1)
    x = x.detach()
    with torch.no_grad():
        p = torch.softmax(g(norm(x)), 1).gather(1, tgt[:, None]).squeeze(1)
    if was:
        f.train()
    return x, p >= gamma


def train_backbone(X, Y, counts, nc, *, arm, epochs, warm, bs=128, lr=0.1, seed=0, g=None, norm=None, mp=None,
                   log=None):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model("tiny", nc, X.shape[1], X.shape[-1])
    decay, no = [], []
    for n_, p in model.named_parameters():
        (no if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no, "weight_decay": 0}], lr=lr,
                          momentum=0.9, nesterov=True)
    n = len(X)
    steps = int(np.ceil(n / bs))
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / steps if t < steps else
                                              0.5 * (1 + np.cos(np.pi * (t - steps) / max(1, total - steps))))
    per = [np.flatnonzero(Y.numpy() == c) for c in range(nc)]
    cnt = torch.tensor(counts, dtype=torch.float)
    stats = {"gen": 0, "acc": 0}
    for ep in range(epochs):
        model.train()
        deferred = arm != "inst" and ep >= warm
        if deferred:
            order = np.concatenate([rng.choice(p, n // nc + 1) for p in per])
            rng.shuffle(order)
            order = order[:n]
        else:
            order = rng.permutation(n)
        for t in range(steps):
            idx = torch.from_numpy(order[t * bs:(t + 1) * bs])
            x, y = X[idx].clone(), Y[idx].clone()
            if deferred and arm.startswith("m2m"):
                # M2m: a sample of class k is (re)generated with prob 1 - N_k / N_max
                gp = cnt[y] / cnt.max()
                gi = (1 - torch.bernoulli(gp, generator=gen)).nonzero().view(-1)
                if len(gi):
                    gt = y[gi]
                    # seed from the batch: p_accept over batch members, 1 - beta^(N_seed - N_target)+
                    delta = F.relu(cnt[y][None, :] - cnt[gt][:, None])
                    pa = 1 - mp["beta"] ** delta
                    ok = pa.sum(1) > 0
                    gi, gt, pa = gi[ok], gt[ok], pa[ok]
                    if len(gi):
                        si = torch.multinomial(pa, 1, replacement=True, generator=gen).view(-1)
                        pacc = pa.gather(1, si[:, None]).view(-1)
                        xs, ys = X[idx][si], Y[idx][si]
                        xg, acc = m2m_translate(g, model, norm, xs, ys, gt, gamma=mp["gamma"], lam=mp["lam"],
                                                step=mp["step"], iters=mp["iters"], gen=gen)
                        acc = acc & torch.bernoulli(pacc, generator=gen).bool()
                        stats["gen"] += len(gi)
                        stats["acc"] += int(acc.sum())
                        x[gi[acc]] = xg[acc]
                        y[gi[acc]] = gt[acc]
            x = augment(x, "basic", True, gen)
            loss = F.cross_entropy(model(norm(x)), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    return model, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train seed per run (default 0, 1, 2, ...)")
    ap.add_argument("--arms", nargs="+", default=["inst", "drs", "m2m"], choices=["inst", "drs", "m2m"])
    ap.add_argument("--g", default="ce", help="the run's trained CE model used as M2m's translator g")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--warm", type=int, default=3, help="epochs before deferred re-sampling / translation")
    ap.add_argument("--beta", type=float, default=0.999)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    runs, arms, epochs, warm = a.run, a.arms, a.epochs, a.warm
    mp = dict(beta=a.beta, gamma=a.gamma, lam=a.lam, step=a.step, iters=a.iters)
    seeds = a.seeds or list(range(len(runs)))
    res = {}
    for r, seed in zip(runs, seeds):
        run = RunDir(r)
        data, info = load(run)
        g, meta = load_model(run.model_dir(a.g))
        mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
        norm = lambda x: (x - mean) / std  # noqa: E731
        for p in g.parameters():
            p.requires_grad_(False)
        Xtr = to_x(data["train"][0])
        Ytr = torch.from_numpy(data["train"][1].astype(np.int64))
        Xva = to_x(data["val"][0])
        yva = data["val"][1]
        nc = int(info["num_classes"]) if "num_classes" in info else int(Ytr.max()) + 1
        counts = np.bincount(Ytr.numpy(), minlength=nc)
        for arm in arms:
            t0 = time.time()
            model, st = train_backbone(Xtr, Ytr, counts, nc, arm=arm, epochs=epochs, warm=warm, g=g, norm=norm,
                                       mp=mp, seed=seed)
            direct = bal_acc(yva, np.concatenate([model(norm(Xva[i:i + 512])).argmax(1).numpy()
                                                   for i in range(0, len(Xva), 512)]))
            ftr = feats(model, Xtr, norm)
            fva = feats(model, Xva, norm)
            head = crt_head(ftr, Ytr.numpy(), counts, nc, (fva, yva))
            pv = predict(head, fva)
            crt = bal_acc(yva, pv)
            r3 = tail3(yva, pv, counts)
            res.setdefault(arm, []).append((direct, crt, r3))
            print(f"{r} {arm}: direct {direct*100:.2f} cRT {crt*100:.2f} rare3 {r3*100:.1f} "
                  f"gen {st['gen']} acc {st['acc']} ({time.time()-t0:.0f}s)", flush=True)
    for arm, v in res.items():
        v = np.array(v) * 100
        print(f"{arm:10s} direct {v[:,0].mean():.2f}±{v[:,0].std():.2f} cRT {v[:,1].mean():.2f}±{v[:,1].std():.2f} "
              f"rare3 {v[:,2].mean():.1f}  {mp}")


if __name__ == "__main__":
    main()
