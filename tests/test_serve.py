"""The classify page's API (flows/serve.py) on a digits run with a real tiny model trained by train.fit."""
from __future__ import annotations

import io
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tailforge.flows.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served_run(digits_run, tmp_path_factory):
    """A copy of ``digits_run`` with one tiny model trained for 2 epochs (``baseline``) and a byte copy
    of it (``copy``): two checkpoints, so "compare all" has something to compare."""
    from tailforge import train
    from tailforge.data import RunDir

    run = RunDir(tmp_path_factory.mktemp("serve") / "digits-lt")
    shutil.copytree(digits_run.root, run.root)
    cfg = train.TrainConfig(model="tiny", width=8, epochs=2, batch_size=64, lr=0.05, hflip=False, device="cpu")
    train.fit(run, cfg, "baseline")
    shutil.copytree(run.model_dir("baseline"), run.model_dir("copy"))
    return run


@pytest.fixture(scope="module")
def client(served_run):
    return TestClient(create_app(served_run.root), raise_server_exceptions=False)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def first_test_sample(run):
    """First test row of the manifest: (sample_id, label, uint8 8x8x1 image)."""
    from tailforge.data import load_images, read_manifest

    df = read_manifest(run.real)
    row = df[df["split"] == "test"].iloc[0]
    img = load_images([row["uri"]], run.root, 1, (8, 8))[0]
    return row["sample_id"], int(row["label"]), img


def assert_error(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "hint"} and body["error"], body
    assert "Traceback" not in resp.text
    for w in words:
        assert w in (body["error"] + " " + (body["hint"] or "")), body
    return body


def test_models_listing_only_safetensors_folders_inside_the_run(served_run, client, tmp_path):
    (served_run.root / "models" / "half").mkdir()  # config but no weights: not a model
    (served_run.root / "models" / "half" / "config.json").write_text("{}")
    outside = tmp_path / "elsewhere"  # a checkpoint outside the run, linked in: refused
    shutil.copytree(served_run.model_dir("baseline"), outside)
    (served_run.root / "models" / "linked").symlink_to(outside, target_is_directory=True)
    try:
        models = client.get("/api/models").json()
        assert [m["name"] for m in models] == ["baseline", "copy"]
        assert models[0]["arch"] == "tiny" and models[0]["num_classes"] == 10
        assert models[0]["details"]["loss"] == "ce" and models[0]["details"]["best_split"] == "val"
        assert_error(client.post("/api/predict", data={"sample_id": first_test_sample(served_run)[0],
                                                       "model": "linked"}), 404, "unknown model 'linked'")
    finally:
        (served_run.root / "models" / "linked").unlink()
        shutil.rmtree(served_run.root / "models" / "half")


def test_predict_sample_matches_predict_proba(served_run, client):
    from tailforge import train

    sid, label, img = first_test_sample(served_run)
    r = client.post("/api/predict", data={"sample_id": sid, "model": "baseline"})
    assert r.status_code == 200, r.text
    body = r.json()
    model, meta = train.load_model(served_run.model_dir("baseline"))
    probs = train.predict_proba(model, meta, img[None])[0]
    res = body["results"][0]
    assert res["model"] == "baseline"
    order = np.argsort(-probs, kind="stable")[:5]
    assert [c["label"] for c in res["top"]] == order.tolist()
    np.testing.assert_allclose([c["prob"] for c in res["top"]], probs[order], atol=1e-5)
    groups = __import__("json").loads(served_run.counts.read_text())["groups"]
    assert [c["group"] for c in res["top"]] == [groups[i] for i in order]
    inp = body["input"]
    assert (inp["kind"], inp["sample_id"], inp["true_label"], inp["true_group"]) == ("sample", sid, label, groups[label])
    assert res["correct"] == (order[0] == label)
    assert res["true_rank"] == int(np.nonzero(np.argsort(-probs, kind="stable") == label)[0][0]) + 1
    assert res["true_prob"] == pytest.approx(float(probs[label]), abs=1e-5)


def test_predict_upload_is_preprocessed_like_training(served_run, client):
    sid, _, img = first_test_sample(served_run)
    by_id = client.post("/api/predict", data={"sample_id": sid, "model": "baseline"}).json()["results"][0]
    # the same pixels uploaded as an 8x8 grayscale PNG give the same answer
    r = client.post("/api/predict", files={"file": ("d.png", png(img[..., 0]), "image/png")}, data={"model": "baseline"})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["input"]["kind"] == "upload" and up["input"]["true_label"] is None
    assert up["results"][0]["top"] == by_id["top"] and up["results"][0]["correct"] is None
    # a large RGB upload is converted to 1 channel and resized to 8x8 by data.images.to_array
    from tailforge.data.images import to_array

    big = np.asarray(Image.fromarray(img[..., 0]).convert("RGB").resize((64, 48), Image.NEAREST))
    r = client.post("/api/predict", files={"file": ("big.jpg", png(big, "JPEG"), "image/jpeg")})
    assert r.status_code == 200, r.text
    inp = r.json()["input"]
    assert inp["original_size"] == [48, 64]
    seen = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(inp["model_input_png"].split(",")[1]))))
    expect = to_array(Image.open(io.BytesIO(png(big, "JPEG"))), 1, (8, 8))[..., 0]
    np.testing.assert_array_equal(seen, expect)


def test_compare_all_returns_every_model(served_run, client):
    sid, _, _ = first_test_sample(served_run)
    body = client.post("/api/predict", data={"sample_id": sid, "model": "all", "top_k": "3"}).json()
    assert [r["model"] for r in body["results"]] == ["baseline", "copy"]
    assert all(len(r["top"]) == 3 for r in body["results"])
    assert body["results"][0]["top"] == body["results"][1]["top"]  # same weights, same probabilities


def test_samples_strip_lists_test_images_tail_first(served_run, client):
    from tailforge.data import read_manifest

    df = read_manifest(served_run.real)
    test_ids = set(df.loc[df["split"] == "test", "sample_id"])
    data = client.get("/api/samples", params={"per_class": 2}).json()
    assert data["total"] == len(test_ids)
    ids = [s["sample_id"] for s in data["samples"]]
    assert set(ids) <= test_ids and len(ids) == 20
    groups = [s["group"] for s in data["samples"]]
    assert groups == sorted(groups, key=["few", "medium", "many"].index)
    img = client.get(data["samples"][0]["image_url"])
    assert img.headers["content-type"] == "image/png" and Image.open(io.BytesIO(img.content)).size == (8, 8)
    train_id = df.loc[df["split"] == "train", "sample_id"].iloc[0]
    assert_error(client.get(f"/api/samples/{train_id}/image"), 404, "unknown test sample")


def test_bad_uploads_are_clear_4xx(served_run):
    small = TestClient(create_app(served_run.root, ServeConfig(max_upload_bytes=4096, max_pixels=100 * 100)),
                       raise_server_exceptions=False)
    noise = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    good = png(noise)
    assert 4096 < len(good) and 60 * 60 < 100 * 100
    post = lambda blob, name="x.png": small.post("/api/predict", files={"file": (name, blob, "image/png")})  # noqa: E731
    assert_error(post(b"%PDF-1.4 definitely not an image", "x.pdf"), 415, "not a readable image")
    assert_error(post(good), 413, "larger than")
    assert_error(post(png(np.zeros((120, 120), np.uint8))), 413, "pixels")
    assert_error(post(png(noise[:30, :30])[:700]), 400, "truncated")
    assert_error(post(b""), 400, "empty")
    trunc_jpeg = png(noise[:30, :30], "JPEG")
    assert_error(post(trunc_jpeg[: len(trunc_jpeg) // 2], "x.jpg"), 400, "truncated")


def test_unknown_model_sample_and_bad_fields(served_run, client):
    sid, _, _ = first_test_sample(served_run)
    assert_error(client.post("/api/predict", data={"sample_id": sid, "model": "basline"}), 404,
                 "unknown model 'basline'", "did you mean 'baseline'")
    assert_error(client.post("/api/predict", data={"sample_id": "nope"}), 404, "unknown test sample 'nope'")
    assert_error(client.post("/api/predict", data={"model": "baseline"}), 422, "exactly one")
    assert_error(client.post("/api/predict", data={"sample_id": sid, "top_k": "many"}), 422, "top_k")
    assert_error(client.get("/api/nothing"), 404, "no such page")


def test_unexpected_error_is_a_json_500_without_traceback(served_run, monkeypatch):
    app = create_app(served_run.root)

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.state.run, "predict", boom)
    r = TestClient(app, raise_server_exceptions=False).post("/api/predict",
                                                            data={"sample_id": first_test_sample(served_run)[0]})
    body = assert_error(r, 500, "internal error (RuntimeError)")
    assert "secret" not in r.text and body["hint"] == "see the server log"


def test_openapi_and_offline_page(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/api/predict"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = spec["components"]["schemas"][form["$ref"].split("/")[-1]]["properties"] if "$ref" in form else form["properties"]
    assert {"file", "sample_id", "model", "top_k"} <= set(props)
    assert {"200", "404", "413", "415", "422"} <= set(post["responses"])
    assert {"/api/models", "/api/samples", "/api/info"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset


def test_cli_refuses_a_busy_port_and_defaults_to_loopback(served_run, capsys):
    from tailforge.flows.cli import main, make_parser
    from tailforge.flows.cliutil import given

    args = make_parser().parse_args(["serve", "--run", str(served_run.root)])
    assert ServeConfig(**given(args, ServeConfig)).host == "127.0.0.1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--run", str(served_run.root), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
