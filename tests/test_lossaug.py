"""Loss-guided augmentation (train/lossaug.py): the momentum update, the normalisation, harder samples get more
and stronger RandAugment, determinism with a seed, and the trainer/CLI path on digits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.train.lossaug import OPS, LossGuided, apply_ops, randaugment_per_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPE = Path(__file__).resolve().parents[1] / "flows" / "recipes" / "small-images.yaml"


def _images(n=64, seed=0):
    """Fashion-like grey 16 x 16 images: a bright blob off-centre on black, so every op changes something."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 16, 16)
    x[:, :, 3:11, 5:13] = 0.4 + 0.5 * torch.rand(n, 1, 8, 8, generator=g)
    return x


def test_momentum_update_is_bcls_moving_average():
    p = LossGuided(5, beta=0.9)
    p.update([0, 1], torch.tensor([2.0, 4.0]))  # first sight: m = loss
    assert p.m[:2].tolist() == [2.0, 4.0] and p.seen.tolist() == [True, True, False, False, False]
    p.update([0, 3], torch.tensor([1.0, 3.0]))
    assert p.m[0].item() == pytest.approx(0.9 * 2.0 + 0.1 * 1.0) and p.m[3].item() == 3.0
    p.update([0], torch.tensor([1.0]))
    assert p.m[0].item() == pytest.approx(0.9 * 1.9 + 0.1 * 1.0)
    assert p.m[1].item() == 4.0  # untouched samples keep their value


def test_weights_grow_with_the_moving_loss_and_unseen_samples_are_average():
    for norm in ("bcl", "rank"):
        p = LossGuided(6, normalize=norm)
        assert p.new_epoch().tolist() == [0.0] * 6  # epoch 1: no losses yet, no RandAugment (BCL)
        p.update([0, 1, 2, 3, 4], torch.tensor([0.1, 0.5, 0.2, 3.0, 1.0]))
        w = p.new_epoch()
        order = np.argsort([0.1, 0.5, 0.2, 3.0, 1.0])
        assert np.all(np.diff(w[:5].numpy()[order]) > 0)  # strictly increasing with the moving loss
        assert w.min() >= 0 and w.max() == pytest.approx(1.0) and w[5].item() == 0.5
    p = LossGuided(3)  # BCL's normalisation: z / max|z| / 2 + 1/2
    p.update([0, 1, 2], torch.tensor([1.0, 2.0, 6.0]))
    z = (np.array([1.0, 2.0, 6.0]) - 3) / np.std([1.0, 2.0, 6.0], ddof=1)
    np.testing.assert_allclose(p.new_epoch().numpy(), z / np.abs(z).max() / 2 + 0.5, rtol=1e-6)


def test_harder_samples_get_more_and_stronger_operations():
    """Hand-set moving losses: the fraction of changed images and the size of the change grow with the loss."""
    n = 400
    p = LossGuided(3 * n, num_ops=2)
    losses = torch.cat([torch.full((n,), 0.05), torch.full((n,), 0.5), torch.full((n,), 2.0)])
    p.update(np.arange(3 * n), losses)
    w = p.new_epoch()
    assert w[0] < w[n] < w[2 * n]
    x = _images(3 * n)
    out = p.augment(x, np.arange(3 * n), torch.Generator().manual_seed(0))
    diff = (out - x).abs().flatten(1).mean(1)
    changed = [float((diff[k * n:(k + 1) * n] > 1e-6).float().mean()) for k in range(3)]
    size = [float(diff[k * n:(k + 1) * n].mean()) for k in range(3)]
    assert changed[0] < changed[1] < changed[2] and size[0] < size[1] < size[2]
    assert w[0].item() == pytest.approx(0.152, abs=0.01) and w[2 * n].item() == 1.0
    assert changed[0] < 0.3 and changed[2] > 0.7  # w = 1: two ops at probability 1 (identity aside)


def test_every_op_runs_per_sample_and_keeps_range_and_shape():
    for c in (1, 3):
        x = _images(len(OPS) * 2).repeat(1, c, 1, 1) * torch.tensor([1.0, 0.6, 0.3][:c]).view(1, c, 1, 1)
        op = torch.arange(len(OPS)).repeat(2)
        f = torch.full((len(op),), 0.8)
        sign = torch.tensor([1.0, -1.0]).repeat_interleave(len(OPS))
        out = apply_ops(x, op, f, sign)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out[0], x[0])  # identity
        changed = (out - x).abs().flatten(1).amax(1) > 1e-6
        same = {"identity"} | ({"color"} if c == 1 else set())  # colour is a no-op on grey images
        for k, name in enumerate(OPS):
            assert bool(changed[k]) == (name not in same), name
    zero = apply_ops(_images(len(OPS)), torch.arange(len(OPS)), torch.zeros(len(OPS)), torch.ones(len(OPS)))
    assert torch.allclose(zero[:12], _images(len(OPS))[:12], atol=1 / 255)  # magnitude 0: (near) no change


def test_seeded_draws_are_reproducible():
    x = _images(32)
    w = torch.linspace(0, 1, 32)
    a = randaugment_per_sample(x, w, w, 2, torch.Generator().manual_seed(3))
    b = randaugment_per_sample(x, w, w, 2, torch.Generator().manual_seed(3))
    c = randaugment_per_sample(x, w, w, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_refuses_where_no_image_is_augmented(tmp_path):
    with pytest.raises(ValueError, match="stage crt trains a head on cached"):
        train.TrainConfig(stage="crt", base="b", aug_policy="loss_guided")
    with pytest.raises(ValueError, match="clip-stage1 contrastive"):
        train.TrainConfig(model="clip_adapter", aug_policy="loss_guided")
    assert "lossaug" not in train.TrainConfig().identity()  # models trained before the option keep their identity
    assert train.TrainConfig(aug_policy="loss_guided").identity()["lossaug"]["beta"] == 0.95


def test_fit_with_loss_guided_policy_is_deterministic_and_logs_strengths(digits_run_copy):
    run = digits_run_copy
    cfg = train.TrainConfig(model="tiny", width=8, epochs=3, batch_size=64, sampler="class_balanced",
                            aug_policy="loss_guided", lossaug={"num_ops": 2}, hflip=False, device="cpu")
    a = train.fit(run, cfg, "lg-a")
    b = train.fit(run, cfg.model_copy(update={"overwrite": True}), "lg-b")
    log = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert log[0]["lossaug"]["w_mean"] == 0.0  # epoch 1: no moving losses yet
    # BCL's normalisation centres the seen samples at 0.5 (unseen ones are 0.5 too); the largest |z| sits at 0 or 1
    assert log[1]["lossaug"]["w_mean"] == pytest.approx(0.5, abs=1e-3) and 0.5 < log[1]["lossaug"]["w_max"] <= 1
    assert log[-1]["val_balanced_acc"] > 0.3  # it learns (chance: 0.1)
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = train.fit(run, cfg.model_copy(update={"aug_policy": "none"}), "plain")
    wp = load_file(str(plain / "model.safetensors"))
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)  # the policy changed the training


def test_resume_replays_the_moving_losses(digits_run_copy, monkeypatch):
    """Interrupted after epoch 2 and resumed: the same weights as an uninterrupted run (the moving losses are in
    the resumable state)."""
    from safetensors.torch import load_file

    from tailforge.train import trainer

    run = digits_run_copy
    cfg = train.TrainConfig(model="tiny", width=8, epochs=3, batch_size=64, aug_policy="loss_guided", hflip=False,
                            device="cpu")
    full = load_file(str(train.fit(run, cfg, "full") / "model.safetensors"))
    real_save = trainer._save_state
    calls = []

    def crash(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train.fit(run, cfg, "again")
    monkeypatch.setattr(trainer, "_save_state", real_save)
    again = load_file(str(train.fit(run, cfg, "again") / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_cli_train_with_loss_guided_policy_and_one_line_errors(digits_run_copy, capsys):
    from tailforge.flows.cli import main

    run = str(digits_run_copy.root)
    assert main(["train", "--run", run, "--name", "lg", "--epochs", "2", "--width", "8", "--aug-policy", "loss_guided",
                 "--lossaug-num-ops", "2", "--no-hflip", "--device", "cpu"]) == 0
    conf = json.loads((digits_run_copy.model_dir("lg") / "config.json").read_text())
    assert conf["train"]["aug_policy"] == "loss_guided" and conf["train"]["lossaug"]["num_ops"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["train", "--run", run, "--aug-policy", "hard"])
    assert e.value.code == 2
    assert main(["train", "--run", run, "--stage", "crt", "--base", "lg", "--aug-policy", "loss_guided"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stage crt trains a head" in err


def test_recipe_applies_the_policy_to_its_backbone_only():
    from tailforge.flows.config import load_config

    cfg = load_config(RECIPE, {"recipe": {"backbone_aug_policy": "loss_guided"}})
    assert cfg.backbone_train().aug_policy == "loss_guided" and cfg.baseline_train().aug_policy == "none"
    assert cfg.real_only_train().aug_policy == "none" and cfg.rebalanced_train().aug_policy == "none"
    from tailforge.data import TailforgeError

    with pytest.raises(TailforgeError, match="backbone_aug_policy"):
        load_config(RECIPE, {"recipe": {"backbone_aug_policy": "loss_guided", "backbone_sampler": None},
                             "generate": {"feature_model": "baseline"}})
    both = load_config(RECIPE, {"train": {"aug_policy": "loss_guided"}})
    assert both.baseline_train().aug_policy == "loss_guided" and both.real_only_train().aug_policy == "none"


@pytest.mark.slow
def test_two_ddp_processes_share_the_moving_losses(digits_run_copy, monkeypatch):
    """Under DDP (2 CPU processes over gloo) every rank updates the moving losses of the WHOLE global batch: after
    epoch 1 of an instance-sampled epoch all samples of the global steps are seen, not one rank's half (~25 s)."""
    from tailforge.train.ddp import launch_fit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = digits_run_copy
    cfg = train.TrainConfig(model="tiny", width=8, epochs=2, batch_size=64, hflip=False, device="cpu", nproc=2,
                            aug_policy="loss_guided")
    path = launch_fit(run, cfg, "ddp-lg")
    meta = json.loads((path / "config.json").read_text())["meta"]
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert meta["ddp_world_size"] == 2
    assert log[0]["lossaug"]["seen"] == meta["steps_per_epoch"] * 64  # both ranks' samples, a permutation
