"""Two-phase transfer learning (train.transfer) from local pretrained weights: a tiny timm model saved as a
safetensors file (and as a timm folder: config.json + model.safetensors) and loaded through --pretrained, on
long-tailed digits with the long-tail toolbox (weighted sampler, balanced softmax). Phase 1 leaves every
backbone tensor as loaded (weights and BatchNorm statistics); phase 2 trains it at the lower learning rate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import TailforgeError
from tailforge.train.models import create_model, load_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "test_resnet"  # timm's own test-sized ResNet (BatchNorm included), 0.37M parameters


def save_backbone(path, seed: int = 0):
    """An RGB timm backbone (no head) as a local weights file, the layout of a downloaded ImageNet checkpoint."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_backbone(tmp_path_factory.mktemp("weights") / f"{ARCH}.safetensors")


def config(weights, **kw) -> train.TrainConfig:
    base = dict(model=ARCH, pretrained=weights, input_size=32, epochs=4, batch_size=64, lr=0.05, hflip=False,
                device="cpu", sampler="weighted", loss="balanced_softmax",
                transfer={"freeze_epochs": 2, "backbone_lr_mult": 0.1})
    return train.TrainConfig(**{**base, **kw})


def loaded_backbone(weights) -> dict:
    """The backbone tensors right after loading the pretrained file (grey digits: the RGB stem summed)."""
    model = create_model(ARCH, 10, 1, 8, input_size=32, head="linear")
    load_pretrained(model, weights)
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_phase_one_keeps_the_backbone_phase_two_trains_it(digits_run_copy, weights):
    run, cfg = digits_run_copy, config(weights)
    ref = loaded_backbone(weights)

    def stop_after(epoch):
        def progress(done, total, info):
            if info.get("event") == "epoch" and info["epoch"] == epoch:
                raise KeyboardInterrupt  # after the epoch's state was saved
        return progress

    def saved_net() -> dict:
        return torch.load(run.root / "models" / ".work-tl" / "state.pt", weights_only=False)["net"]

    with pytest.raises(KeyboardInterrupt):
        train.fit(run, cfg, "tl", progress=stop_after(2))  # the end of phase 1
    net = saved_net()
    for k, v in ref.items():  # every backbone weight and BatchNorm buffer, exactly as loaded
        assert torch.equal(net[f"backbone.{k}"], v), k
    torch.manual_seed(cfg.seed)
    head0 = create_model(ARCH, 10, 1, 8, input_size=32, head="linear").head  # the head moved in phase 1
    assert not torch.equal(net["head.weight"], head0.weight)

    with pytest.raises(KeyboardInterrupt):
        train.fit(run, cfg, "tl", progress=stop_after(4))  # resumes at epoch 3: phase 2 to the end
    net = saved_net()
    changed = [k for k, v in ref.items() if not torch.equal(net[f"backbone.{k}"], v)]
    assert any(k.endswith("conv.weight") or k.endswith("conv1.weight") for k in changed), changed
    assert any(k.endswith("running_mean") for k in changed), changed

    path = train.fit(run, cfg, "tl")  # every epoch is done: writes the val-selected model
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 1, 2, 2]
    assert all(r["backbone_lr"] == 0 for r in log[:2])
    assert log[2]["backbone_lr"] == pytest.approx(0.1 * log[2]["lr"])  # phase 2: lr x backbone_lr_mult
    model, meta = train.load_model(path)
    assert meta["pretrained"]["missing"] == 0 and meta["pretrained"]["loaded"] > 0
    assert json.loads((path / "config.json").read_text())["train"]["transfer"] == {"freeze_epochs": 2,
                                                                                   "backbone_lr_mult": 0.1}


def test_defaults_keep_one_phase_and_the_old_identity(weights):
    plain = train.TrainConfig(model=ARCH, pretrained=weights)
    assert not plain.transfer.active and "transfer" not in plain.identity() and "clip" not in plain.identity()
    assert config(weights).identity()["transfer"]["freeze_epochs"] == 2
    with pytest.raises(ValueError, match="needs pretrained weights"):
        train.TrainConfig(model=ARCH, transfer={"freeze_epochs": 1})
    with pytest.raises(ValueError, match="more than the epochs"):
        config(weights, epochs=1)
    with pytest.raises(ValueError, match="already keep their backbone frozen"):
        train.TrainConfig(stage="crt", base="b", transfer={"freeze_epochs": 1}, pretrained=weights)


def test_cli_two_phase_recipe_from_a_timm_folder_and_clear_errors(digits_run_copy, weights, tmp_path, capsys):
    from tailforge.flows.cli import main

    folder = tmp_path / ARCH  # timm's hub layout: config.json (architecture) + model.safetensors
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights.read_bytes())
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 0, "pretrained_cfg": {
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}}))
    run = str(digits_run_copy.root)
    args = ["train", "--run", run, "--model", ARCH, "--pretrained", str(folder), "--input-size", "32", "--epochs", "2",
            "--batch-size", "64", "--no-hflip", "--device", "cpu", "--sampler", "class_balanced", "--loss",
            "logit_adjust", "--transfer-freeze-epochs", "1", "--transfer-backbone-lr-mult", "0.1"]
    assert main(args) == 0
    name = f"{ARCH}-logit_adjust-class_balanced-s0"
    log = [json.loads(x) for x in (digits_run_copy.model_dir(name) / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 2]
    # inputs are normalised as the weights were pretrained (the folder's pretrained_cfg; grey: channel mean)
    meta = json.loads((digits_run_copy.model_dir(name) / "config.json").read_text())["meta"]
    assert np.allclose(meta["mean"], [0.4]) and np.allclose(meta["std"], [0.3])
    assert main(["eval", "--run", run, "--model-name", name, "--no-plots"]) == 0
    capsys.readouterr()

    missing = tmp_path / "resnet50.safetensors"
    assert main(["train", "--run", run, "--model", ARCH, "--pretrained", str(missing)]) == 2
    assert main(["train", "--run", run, "--model", "resnet18", "--pretrained", str(folder)]) == 2
    assert main(["train", "--run", run, "--model", ARCH, "--transfer-freeze-epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and not any("Traceback" in line for line in err)
    assert str(missing) in err[0] and "never downloads" in err[0]
    assert f"are a '{ARCH}'" in err[1] and "--model is 'resnet18'" in err[1] and f"pass --model {ARCH}" in err[1]
    assert "--pretrained" in err[2]
    with pytest.raises(TailforgeError, match="holds no weights"):
        train.fit(digits_run_copy, config(tmp_path), "x")
