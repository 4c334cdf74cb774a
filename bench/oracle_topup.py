"""How much could a PERFECT generator give the recipe? Tail classes topped up with unused REAL images.

A generator's best possible output is more real images of the class: what it would draw if it had
learnt the class's true distribution. Datasets made long-tailed by tailforge (Fashion-MNIST, CIFAR,
image folders) leave most train images of the tail classes unused, so the study can draw them. Each arm runs
the recipe's rebalanced path at the real-only budget (epochs x ceil(n_real / batch) steps, the same in
every arm):

1. the tiny CNN from scratch with class-balanced re-sampling (real train + extra rows, every class
   topped up to the largest by re-sampled duplicates), SGD nesterov, cosine, basic augmentation;
2. cRT: a linear head re-trained on its frozen features of real train + extra rows (CE,
   class-balanced sampling, equal steps, best epoch on VAL).

Arms:
  cb          no extra rows: the recipe's real-only arm
  oracle_x2   every class below the largest gets as many unused real images as it has (doubled,
              capped at the largest class and at the unused images there are): a perfect generator
              with a modest quota
  oracle_bal  every class topped up to the largest with unused real images: a perfect generator with
              the plan's default quota (``target: balance``)

VAL and TEST balanced accuracy are both printed. Nothing is selected on either: the arms are fixed
and the cRT head's epoch is chosen on VAL, as in the recipe. Results:
bench/results/oracle_topup.md.

    python bench/oracle_topup.py --run runs/f100-s0 runs/f100-s1 runs/f100-s2
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_study import crt_head, feats, load, to_x  # noqa: E402
from balanced_backbone import top_up, train_backbone  # noqa: E402
from feature_study import bal_acc, predict, tail3  # noqa: E402

from tailforge.data import DataConfig, RunDir, TailforgeError, load_dataset, load_images, read_manifest


def unused_pool(run: RunDir, df, info):
    """(images(idx) -> uint8 N x H x W [x C], labels, free indices): raw images that no split of the run uses.

    Array datasets (Fashion-MNIST, CIFAR): rows of the run's train array outside the train split. Image
    folders: files of the folder in no split (the long-tail construction drops them)."""
    raw = load_dataset(DataConfig(dataset=info["name"], root=info.get("root")))
    real = df[df["source"] == "real"]
    if "all" in raw.splits and raw.splits["all"].files is not None:
        files = [str(Path(f)) for f in raw.splits["all"].files]
        used = set(str(Path(u)) for u in real["uri"])
        free = np.array([i for i, f in enumerate(files) if f not in used])
        size = tuple(info["image_size"])

        def images(idx):
            return load_images([files[i] for i in idx], run.root, int(info["channels"]), size)

        return images, np.asarray(raw.splits["all"].labels), free
    files = real["uri"].str.split("#").str[0]
    train_file = files[real["split"] == "train"].unique()
    if len(train_file) != 1 or not (run.root / train_file[0]).is_file():
        raise TailforgeError(f"{run.root}: train rows are not one array file ({list(train_file)})",
                             "use a Fashion-MNIST, CIFAR, digits or image-folder run folder")
    # every row of that array used by any split (digits draws train, val and test from one array)
    used = real["uri"][files == train_file[0]].str.split("#").str[1].astype(int).to_numpy()
    arr = np.load(run.root / train_file[0], mmap_mode="r")
    labels = raw.splits["train" if "train" in raw.splits else "all"].labels
    if len(arr) != len(labels):
        raise TailforgeError(f"{train_file[0]} has {len(arr)} rows, the raw train split {len(labels)}",
                             "rebuild the run folder")

    def images(idx):
        x = np.asarray(arr[idx])
        return x[..., 0] if x.shape[-1] == 1 else x

    return images, labels, np.setdiff1d(np.arange(len(labels)), used)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train seed per run (default 0, 1, 2, ...)")
    ap.add_argument("--arms", nargs="+", default=["cb", "oracle_x2", "oracle_bal"],
                    choices=["cb", "oracle_x2", "oracle_bal"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the per-run rows here")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {}
    for r, seed in zip(a.run, a.seeds or range(len(a.run))):
        run = RunDir(r)
        data, info = load(run, ("train", "val", "test"))
        df = read_manifest(run.real)
        Xte, yte = to_x(data["test"][0]), data["test"][1]
        images, raw_y, free = unused_pool(run, df, info)
        Xtr, Ytr = to_x(data["train"][0]), torch.from_numpy(data["train"][1].astype(np.int64))
        Xva, yva = to_x(data["val"][0]), data["val"][1]
        nc = int(info["num_classes"]) if "num_classes" in info else int(Ytr.max()) + 1
        counts = np.bincount(Ytr.numpy(), minlength=nc)
        mean, std = Xtr.mean(), Xtr.std()
        norm = lambda x: (x - mean) / std  # noqa: E731
        steps = int(np.ceil(len(Xtr) / 128))
        rng = np.random.default_rng(100 + seed)
        for arm in a.arms:
            t0 = time.time()
            Xc, Yc = Xtr, Ytr
            if arm != "cb":
                extra = []
                for c in range(nc):
                    k = int(counts.max() - counts[c])
                    pool = free[raw_y[free] == c]
                    if arm == "oracle_x2":  # up to double: as many as the class has, or as the pool holds
                        k = min(k, int(counts[c]), len(pool))
                    if k > len(pool):
                        raise TailforgeError(f"class {c} has {len(pool)} unused images, {k} wanted", "use oracle_x2")
                    if k > 0:
                        extra.append(rng.choice(pool, k, replace=False))
                extra = np.sort(np.concatenate(extra))
                Xc = torch.cat([Xtr, to_x(images(extra))])
                Yc = torch.cat([Ytr, torch.from_numpy(raw_y[extra].astype(np.int64))])
            X, Y = top_up(Xc, Yc, np.bincount(Yc.numpy(), minlength=nc), nc, seed, None)
            model = train_backbone(X, Y, nc, steps, a.epochs, seed, norm)
            fva, fte, f = feats(model, Xva, norm), feats(model, Xte, norm), feats(model, Xc, norm)
            head = crt_head(f, Yc.numpy(), counts, nc, (fva, yva))
            pv, pt = predict(head, fva), predict(head, fte)
            row = {"val": bal_acc(yva, pv), "val_rare3": tail3(yva, pv, counts), "test": bal_acc(yte, pt),
                   "test_rare3": tail3(yte, pt, counts), "n_extra": int(len(Xc) - len(Xtr)), "run": r, "seed": seed}
            res.setdefault(arm, []).append(row)
            print(f"{r} seed {seed} {arm}: +{row['n_extra']} real images; "
                  + " ".join(f"{k} {row[k] * 100:.2f}" for k in ("val", "val_rare3", "test", "test_rare3"))
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    print(f"balanced accuracy in %, mean ± std over {len(a.run)} run(s)")
    for arm, rows in res.items():
        print(f"{arm:10s} " + "  ".join(f"{k} {np.mean([r[k] for r in rows]) * 100:.2f}±"
                                        f"{np.std([r[k] for r in rows]) * 100:.2f}"
                                        for k in ("val", "val_rare3", "test", "test_rare3")))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    try:
        main()
    except TailforgeError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        sys.exit(e.exit_code)
