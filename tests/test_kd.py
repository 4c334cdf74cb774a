"""Distillation for the long tail (train/kd.py): BKD and DKD against hand-computed values, patch distillation
reaches the student only, group weights per true class, the CLI's errors, and `tailforge train --kd dkd` on digits."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir
from tailforge.data.measure import ClassStats
from tailforge.flows.cli import main
from tailforge.train.kd import KD_LOSSES, PatchKD, build_kd, group_alpha, kd_warmup_epochs, mix_kd
from tailforge.train.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(model="tiny", width=8, epochs=1, batch_size=64, lr=0.05, hflip=False, eval_batch_size=512)


def softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]  # student logits, two samples
T = [[2.0, 0.0, 0.5], [0.0, 1.0, 3.0]]  # teacher logits
Y = [0, 2]  # true classes


def _cfg(**kw):
    return train.TrainConfig(teacher="t", **kw)


def test_bkd_matches_hand_computed_values():
    counts, beta, temp = [100, 10, 1], 0.9, 2.0
    w = [(1 - beta) / (1 - beta ** n) for n in counts]
    w = [x / sum(w) * 3 for x in w]  # Cui et al.'s weights, summing to C
    expected = []
    for s, t in zip(S, T):
        pt = softmax(t, temp)
        q = [a * b for a, b in zip(w, pt)]
        q = [a / sum(q) for a in q]
        expected.append(temp ** 2 * kl(q, softmax(s, temp)))
    fn = build_kd(_cfg(kd="bkd", cb_beta=beta, kd_temperature=temp), counts)
    got = fn(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the tail class (w largest) gets more of the teacher's mass than plain KD gives it
    plain = build_kd(_cfg(kd="hinton", kd_temperature=temp), counts)(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    assert not np.allclose(plain.numpy(), got.numpy())


def test_dkd_matches_hand_computed_values():
    alpha, beta, temp = 1.5, 8.0, 3.0
    expected = []
    for s, t, y in zip(S, T, Y):
        ps, pt = softmax(s, temp), softmax(t, temp)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        ns = [p / (1 - ps[y]) for k, p in enumerate(ps) if k != y]
        nt = [p / (1 - pt[y]) for k, p in enumerate(pt) if k != y]
        expected.append(temp ** 2 * (alpha * tckd + beta * kl(nt, ns)))
    fn = build_kd(_cfg(kd="dkd", kd_dkd_alpha=alpha, kd_dkd_beta=beta, kd_temperature=temp), [5, 5, 5])
    student = torch.tensor(S, requires_grad=True)
    got = fn(student, torch.tensor(T), torch.tensor(Y))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5)
    got.sum().backward()  # the masked target class leaves no NaN in the gradient
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # DKD's decomposition: KD = TCKD + (1 - p_t,y) NCKD, so alpha 1, beta 1 - p_t,y gives Hinton's KD back
    pty = softmax(T[0], temp)[Y[0]]
    one = build_kd(_cfg(kd="dkd", kd_dkd_alpha=1.0, kd_dkd_beta=1 - pty, kd_temperature=temp), [5, 5, 5])
    hinton = build_kd(_cfg(kd="hinton", kd_temperature=temp), [5, 5, 5])
    args = torch.tensor(S[:1]), torch.tensor(T[:1]), torch.tensor(Y[:1])
    np.testing.assert_allclose(one(*args).numpy(), hinton(*args).numpy(), rtol=1e-5)
    # mdistiller's warm-up: 20 of 240 epochs for dkd, none for the others unless asked
    assert kd_warmup_epochs(_cfg(kd="dkd", epochs=24)) == 2
    assert kd_warmup_epochs(_cfg(kd="bkd", epochs=24)) == 0
    assert kd_warmup_epochs(_cfg(kd="hinton", kd_warmup=3)) == 3


def test_group_weights_apply_per_true_class(digits_run):
    groups = ClassStats.load(digits_run).groups
    assert {"many", "medium"} <= set(groups)
    cfg = _cfg(kd_group_weights={"many": 0.2, "medium": 0.9}, kd_alpha=0.5)
    a = group_alpha(cfg, groups)
    for c, g in enumerate(groups):
        assert a[c].item() == pytest.approx({"many": 0.2, "medium": 0.9}.get(g, 0.5))
    task, kd = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0])
    y = torch.tensor([groups.index("many"), groups.index("medium"), groups.index("many")])
    per = mix_kd(task, kd, a, y, y)
    np.testing.assert_allclose(per.numpy(), [0.8 + 0.6, 0.1 + 2.7, 0.8 + 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="did you mean 'medium'"):
        _cfg(kd_group_weights={"meduim": 0.5})


def test_patch_distillation_reaches_the_student_only():
    torch.manual_seed(0)
    student, teacher = create_model("tiny", 3, 1, 8, width=4), create_model("tiny", 3, 1, 8, width=8).eval()
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    protos = torch.rand(3, 32)
    patch = PatchKD(16, 32, protos, torch.tensor([0, 0, 1]), count=5, size=2)  # student 16 ch -> teacher 32 ch
    opt = torch.optim.SGD(list(student.parameters()) + list(patch.parameters()), lr=0.5)
    for _ in range(3):
        with torch.no_grad():
            t_map = teacher.feature_map(x)
        loss = patch(student.feature_map(x), t_map, y).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert student.backbone.body[0][0].weight.grad.abs().sum() > 0  # the first conv learns
        assert patch.proj.weight.grad.abs().sum() > 0
        assert student.head.weight.grad is None  # the patch term does not touch the classifier
        opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_patch_weights_lower_patches_that_look_like_the_other_group():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # class 0, 1 head (group 0); class 2 tail
    patch = PatchKD(2, 2, protos, torch.tensor([0, 0, 1]))
    mu = protos.mean(0)
    # two locations of a head sample (class 0): one like the tail prototype, one like the head prototypes
    t_vec = torch.stack([protos[2], protos[0]])[None] + 0 * mu
    w = patch.location_weights(t_vec, torch.tensor([0]))
    assert w[0, 0] < w[0, 1]
    # one group only: every weight is 1
    same = PatchKD(2, 2, protos, torch.tensor([0, 0, 0]))
    assert torch.equal(same.location_weights(t_vec, torch.tensor([0])), torch.ones(1, 2))


@pytest.fixture(scope="module")
def taught(digits_run, tmp_path_factory):
    """A copy of the digits run with a width-16 teacher trained (5 epochs)."""
    root = tmp_path_factory.mktemp("kd") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    train.fit(run, train.TrainConfig(**{**FAST, "width": 16, "epochs": 5, "lr": 0.1}), "teacher")
    return run


def test_cli_errors(taught, capsys):
    run = str(taught.root)
    assert main(["train", "--run", run, "--teacher", "teacher", "--kd", "hintn", "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown kd 'hintn'" in err and "did you mean 'hinton'" in err
    for opts in (["--kd", "dkd"], ["--kd-patch", "1"], ["--kd-group-weights", "{few: 0.9}"]):
        assert main(["train", "--run", run, "--name", "x", *opts]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no teacher is given" in err and "--teacher" in err
    assert not taught.model_dir("x").exists()


def test_cli_trains_a_smaller_dkd_student(taught, capsys):
    """`tailforge train --teacher ... --kd dkd` end to end: a width-8 student of the width-16 teacher."""
    run = str(taught.root)
    assert main(["train", "--run", run, "--name", "dkd", "--teacher", "teacher", "--kd", "dkd", "--epochs", "2",
                 "--width", "8", "--batch-size", "32", "--no-hflip", "--lr", "0.1"]) == 0
    path = taught.model_dir("dkd")
    conf = json.loads((path / "config.json").read_text())
    assert conf["train"]["kd"] == "dkd" and conf["identity"]["kd"] == "dkd"
    model, meta = train.load_model(path)
    assert meta["width"] == 8 and meta["feature_dim"] == 32
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and np.isfinite([r["train_loss"] for r in log]).all()
    assert json.loads((path / "best.json").read_text())["val_balanced_acc"] > 0.3  # 10 classes: chance is 0.1
    # the classify page's "compare all" shows the teacher and its student side by side, the student labelled
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tailforge.data import read_manifest
    from tailforge.flows.serve import create_app

    client = TestClient(create_app(taught.root))
    info = {m["name"]: m["details"] for m in client.get("/api/models").json()}
    assert info["dkd"]["teacher"] == "teacher" and info["dkd"]["kd"] == "dkd" and "teacher" not in info["teacher"]
    df = read_manifest(taught.real)
    sample = df[df["split"] == "test"].iloc[0]["sample_id"]
    res = client.post("/api/predict", data={"sample_id": sample, "model": "all"}).json()["results"]
    assert {"teacher", "dkd"} <= {r["model"] for r in res}


def test_fit_with_patch_and_group_weights_leaves_the_teacher_alone(taught):
    before = (taught.model_dir("teacher") / "model.safetensors").read_bytes()
    cfg = train.TrainConfig(**{**FAST, "teacher": "teacher", "kd": "bkd", "kd_patch": 1.0, "kd_patch_count": 4,
                               "kd_group_weights": {"many": 0.3, "medium": 0.8}})
    path = train.fit(taught, cfg, "patch")
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[0]["train_loss"])
    assert (taught.model_dir("teacher") / "model.safetensors").read_bytes() == before
    # the projector is a training aid: the saved student is the plain model
    model, _ = train.load_model(path)
    assert not any("proj" in k for k in model.state_dict())


def test_identity_of_models_without_distillation_is_unchanged():
    """Models trained before the KD options existed keep their identity (resume and skip compare it)."""
    ident = train.TrainConfig(**FAST).identity()
    assert not any(k.startswith("kd_") and k not in ("kd_temperature", "kd_alpha") for k in ident)
    assert "kd" not in ident
    assert sorted(KD_LOSSES) == ["bkd", "dkd", "hinton"]
