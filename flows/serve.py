"""The classify page: try a run's trained models on one image, side by side.

``create_app(run_dir)`` builds a small FastAPI app over one run folder:

- ``GET /`` the page (``flows/static/``: plain HTML + JS + CSS, no build step, nothing fetched
  from the network);
- ``GET /api/info`` the run: dataset, classes and their many/medium/few group, upload limits;
- ``GET /api/models`` the checkpoints of the run (``models/<name>/model.safetensors``);
- ``GET /api/samples`` a few TEST images per class, tail classes first; ``GET
  /api/samples/{id}/image`` one of them as PNG;
- ``POST /api/predict`` top-k classes of an uploaded image or of a test sample, for one model or
  for all of them; documented in ``/openapi.json``.

Safety, because the page accepts files from a browser: the request body is capped
(``max_upload_bytes``), an upload must be an image Pillow can ``verify`` and then fully decode
(truncated files are refused) within ``max_pixels``; uploads are read in memory and never written
anywhere but Starlette's spool (memory, then the temp folder); checkpoints are only looked up by
name among ``<run>/models/*`` folders that resolve inside the run and hold ``model.safetensors``
(``tailforge.train.load_model`` reads safetensors, never pickles); every error is a JSON body
``{"error", "hint"}`` with a 4xx status, and an unexpected failure is a 500 with the exception's
type only, never a traceback.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.run import RunDir

log = logging.getLogger("tailforge.serve")

STATIC_DIR = Path(__file__).parent / "static"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "config.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Formats a browser can produce or a user is likely to have; everything else is refused before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
GROUP_NAMES = {"many": "head", "medium": "medium", "few": "tail"}
MULTIPART_SLACK = 64 * 1024  # room for the multipart headers and the small form fields


class ServeConfig(BaseModel):
    """Options of ``tailforge serve``."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind; loopback unless you mean to share the page")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: str = Field("cpu", description="torch device the models run on (cpu, cuda, cuda:1, mps)")
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
                                  description="largest accepted upload, in bytes")
    max_pixels: int = Field(16_000_000, ge=64, le=40_000_000,
                            description="largest accepted upload, in pixels (width x height)")
    samples_per_class: int = Field(3, ge=1, le=100, description="test images per class shown in the strip")


class ServeError(Exception):
    """A bad request: answered as ``{"error": problem, "hint": hint}`` with ``status``."""

    def __init__(self, status: int, problem: str, hint: str | None = None):
        super().__init__(problem)
        self.status, self.problem, self.hint = status, problem, hint


# ---------------------------------------------------------------- API schema (shown in /openapi.json)


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong")
    hint: str | None = Field(None, description="how to fix it")


class ModelInfo(BaseModel):
    name: str = Field(description="checkpoint folder name under <run>/models/")
    arch: str | None = Field(None, description="network architecture, from config.json")
    num_classes: int | None = None
    loaded: bool = Field(description="already in memory (the first prediction of a model loads it)")
    details: dict[str, Any] = Field(default_factory=dict, description="selected fields of config.json / best.json")


class Sample(BaseModel):
    sample_id: str
    label: int
    class_name: str
    group: str | None = Field(None, description="many / medium / few (head / medium / tail) from counts.json")
    image_url: str


class SampleList(BaseModel):
    split: Literal["test"] = "test"
    total: int = Field(description="test images in the run")
    samples: list[Sample]


class ClassScore(BaseModel):
    label: int
    class_name: str
    prob: float
    group: str | None = None


class ModelResult(BaseModel):
    model: str
    top: list[ClassScore] = Field(description="top-k classes, most probable first")
    predicted: ClassScore
    correct: bool | None = Field(None, description="top-1 equals the true class (test samples only)")
    true_prob: float | None = Field(None, description="probability given to the true class")
    true_rank: int | None = Field(None, description="1-based rank of the true class")


class InputInfo(BaseModel):
    kind: Literal["upload", "sample"]
    sample_id: str | None = None
    filename: str | None = None
    original_size: list[int] | None = Field(None, description="[height, width] before preprocessing")
    true_label: int | None = None
    true_class: str | None = None
    true_group: str | None = None
    model_input_png: str = Field(description="the preprocessed image the models see, as a data: URL")


class PredictResponse(BaseModel):
    input: InputInfo
    results: list[ModelResult]


class RunInfo(BaseModel):
    run: str
    dataset: str
    num_classes: int
    class_names: list[str]
    groups: list[str] | None
    channels: int
    image_size: list[int]
    max_upload_bytes: int
    max_pixels: int


ERRORS = {s: {"model": ErrorBody} for s in (400, 404, 413, 415, 422, 503)}


# ---------------------------------------------------------------- image input


def decode_upload(blob: bytes, channels: int, size: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, list[int]]:
    """Check that ``blob`` is an image and preprocess it like training data.

    Pillow reads only the header first (format and pixel count are checked before any pixel is
    decoded), then ``verify()`` checks the file's structure, then a fresh ``load()`` decodes it
    (``verify`` alone misses truncated pixel data). The result goes through ``tailforge.data.images.to_array``,
    the function ``tailforge.data.load_images`` uses for image files: same channels, same bicubic resize.
    Returns (uint8 H x W x C, [original height, width]).
    """
    from PIL import Image, UnidentifiedImageError

    from tailforge.data.images import to_array

    if not blob:
        raise ServeError(400, "the uploaded file is empty", "choose an image file (PNG, JPEG, ...)")
    formats = ", ".join(IMAGE_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ServeError(413, f"the image has {w}x{h} = {w * h:,} pixels, more than the limit "
                                     f"{max_pixels:,}", "upload a smaller image")
                im.verify()
            with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as im:
                im.load()
                arr = to_array(im, channels, size)
    except ServeError:
        raise
    except UnidentifiedImageError:
        raise ServeError(415, "the uploaded file is not a readable image (unknown format, or cut off in its header)",
                         f"upload a {formats} image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServeError(413, "the image is too large to decode safely (decompression bomb)",
                         "upload a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ServeError(400, f"the uploaded image is corrupt or truncated ({exc})",
                         "upload the complete file again, or another image") from None
    return arr, [h, w]


def png_data_url(arr: np.ndarray) -> str:
    """uint8 H x W x C -> ``data:image/png;base64,...`` (what the page shows as 'model input')."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(arr)).decode("ascii")


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the run: classes, samples, models


class RunState:
    """What the app knows about one run folder; models are loaded lazily and cached."""

    def __init__(self, run: RunDir, cfg: ServeConfig):
        from tailforge.data.manifest import read_manifest
        from tailforge.data.measure import ClassStats

        self.run, self.cfg = run, cfg
        self.root = run.root.resolve()
        info = run.dataset_info()
        self.dataset = info["name"]
        self.class_names: list[str] = list(info["class_names"])
        self.channels = int(info["channels"])
        self.size = (int(info["image_size"][0]), int(info["image_size"][1]))
        self.groups: list[str] | None = ClassStats.load(run).groups if run.counts.exists() else None
        df = read_manifest(run.require(run.real, "measure"))
        test = df[(df["split"] == "test") & (df["source"] == "real")]
        self.test = {sid: (uri, int(lab)) for sid, uri, lab in zip(test["sample_id"], test["uri"], test["label"])}
        self._models: dict[str, tuple[float, Any, dict]] = {}
        self._lock = threading.Lock()

    # classes -------------------------------------------------------
    def group(self, label: int) -> str | None:
        return self.groups[label] if self.groups and 0 <= label < len(self.groups) else None

    def class_name(self, label: int, names: list[str] | None = None) -> str:
        names = names or self.class_names
        return names[label] if 0 <= label < len(names) else str(label)

    # samples -------------------------------------------------------
    def samples(self, per_class: int, group: str | None = None) -> list[Sample]:
        """Up to ``per_class`` test images per class (manifest order), few-shot classes first."""
        taken: dict[int, int] = {}
        rows = []
        for sid, (_, label) in self.test.items():
            if taken.get(label, 0) >= per_class or (group and self.group(label) != group):
                continue
            taken[label] = taken.get(label, 0) + 1
            rows.append((sid, label))
        order = {"few": 0, "medium": 1, "many": 2}
        rows.sort(key=lambda r: (order.get(self.group(r[1]) or "", 3), r[1]))
        return [Sample(sample_id=sid, label=label, class_name=self.class_name(label), group=self.group(label),
                       image_url=f"/api/samples/{sid}/image") for sid, label in rows]

    def sample_image(self, sample_id: str) -> tuple[np.ndarray, int]:
        from tailforge.data.images import load_images

        if sample_id not in self.test:
            raise ServeError(404, f"unknown test sample '{sample_id}'",
                             "pick one listed by GET /api/samples (only TEST images are served)")
        uri, label = self.test[sample_id]
        return load_images([uri], self.run.root, self.channels, self.size)[0], label

    # models --------------------------------------------------------
    def model_names(self) -> list[str]:
        """Checkpoint folders that hold safetensors weights and resolve inside the run folder."""
        names = []
        for name in self.run.models():
            d = self.run.model_dir(name)
            if not NAME_RE.match(name) or not (d / MODEL_FILE).is_file() or not (d / MODEL_CONFIG).is_file():
                continue
            if not (d / MODEL_FILE).resolve().is_relative_to(self.root):
                log.warning("skipping model %s: its weights resolve outside the run folder", name)
                continue
            names.append(name)
        return names

    def resolve_models(self, name: str) -> list[str]:
        names = self.model_names()
        if not names:
            raise ServeError(404, f"run {self.run.root.name} has no trained model yet",
                             f"run `tailforge train --run {self.run.root}` first")
        if name == "all":
            return names
        if name not in names:
            err = unknown_name("model", name, names + ["all"])
            raise ServeError(404, err.problem, err.hint)
        return [name]

    def model_info(self, name: str) -> ModelInfo:
        d = self.run.model_dir(name)
        cfg = _read_json(d / MODEL_CONFIG)
        meta = cfg.get("meta", cfg) if isinstance(cfg.get("meta"), dict) else cfg
        tcfg = cfg.get("train", cfg.get("config", {}))
        details: dict[str, Any] = {}
        if isinstance(tcfg, dict):
            details.update({k: tcfg[k] for k in ("loss", "sampler", "epochs", "steps", "synthetic_weight")
                            if k in tcfg and isinstance(tcfg[k], (str, int, float, bool))})
            if isinstance(tcfg.get("teacher"), str):  # a distilled student: shown next to its teacher
                details.update(teacher=tcfg["teacher"], kd=tcfg.get("kd") or "hinton")
        best = _read_json(d / "best.json")
        details.update({f"best_{k}": v for k, v in best.items() if isinstance(v, (int, float, str)) and
                        not isinstance(v, bool)})
        return ModelInfo(name=name, arch=meta.get("arch"), num_classes=meta.get("num_classes"),
                         loaded=name in self._models, details=details)

    def load(self, name: str):
        """(model, meta) of checkpoint ``name``, cached until its weights file changes."""
        from tailforge import train

        path = self.run.model_dir(name) / MODEL_FILE
        mtime = path.stat().st_mtime
        hit = self._models.get(name)
        if hit and hit[0] == mtime:
            return hit[1], hit[2]
        try:
            model, meta = train.load_model(self.run.model_dir(name), device=self.cfg.device)
        except TailforgeError as exc:
            raise ServeError(503, f"model '{name}' could not be loaded: {exc.problem}", exc.hint) from None
        model.eval()
        self._models[name] = (mtime, model, meta)
        return model, meta

    def predict(self, image: np.ndarray, names: list[str], top_k: int, true_label: int | None) -> list[ModelResult]:
        from tailforge import train

        results = []
        image = np.array(image, dtype=np.uint8, copy=True)  # writable: torch warns on read-only (decoded) arrays
        with self._lock:  # one prediction at a time: models are shared and CPU threads are few
            for name in names:
                model, meta = self.load(name)
                probs = np.asarray(train.predict_proba(model, meta, image[None], device=self.cfg.device))[0]
                results.append(self._result(name, probs, list(meta.get("class_names") or []), top_k, true_label))
        return results

    def _result(self, name: str, probs: np.ndarray, names: list[str], top_k: int,
                true_label: int | None) -> ModelResult:
        order = np.argsort(-probs, kind="stable")
        score = [ClassScore(label=int(i), class_name=self.class_name(int(i), names), prob=round(float(probs[i]), 6),
                            group=self.group(int(i))) for i in order[:top_k]]
        res = ModelResult(model=name, top=score, predicted=score[0])
        if true_label is not None and 0 <= true_label < len(probs):
            res.correct = bool(order[0] == true_label)
            res.true_prob = round(float(probs[true_label]), 6)
            res.true_rank = int(np.nonzero(order == true_label)[0][0]) + 1
        return res


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with a JSON 413.

    A declared ``Content-Length`` is checked before anything is read; a chunked body is counted
    as it streams, so an oversized upload is cut off instead of being spooled to disk whole.
    """

    class TooLarge(StarletteHTTPException):
        """An HTTPException, so FastAPI's body parsing re-raises it instead of turning it into a 400."""

        def __init__(self):
            super().__init__(413, "request body too large")

    def __init__(self, app, max_bytes: int, error):
        self.app, self.max_bytes, self.error = app, max_bytes, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyLimit.TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = self.error(413, f"the request is larger than {self.max_bytes - MULTIPART_SLACK:,} bytes",
                              "upload a smaller image")
        await response(scope, receive, send)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------- the app


def create_app(run_dir, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving the classify page and its JSON API for ``run_dir``.

    Raises ``TailforgeError`` when the run folder has no manifest yet (nothing to serve).
    """
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    cfg = cfg or ServeConfig()
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise TailforgeError(f"run folder {run.root} does not exist", "pass the --run folder of a measured run")
    state = RunState(run, cfg)

    app = FastAPI(
        title="tailforge classify",
        version="1",
        description=f"Try the models of run `{run.root.name}` on an image. Errors are JSON `{{error, hint}}`.",
        docs_url=None, redoc_url=None,  # Swagger UI would load scripts from a CDN; the schema is /openapi.json
    )
    app.state.run = state

    # ---- errors: always JSON, never a traceback
    def error(status: int, problem: str, hint: str | None = None) -> JSONResponse:
        return JSONResponse(ErrorBody(error=problem, hint=hint).model_dump(), status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error(exc.status, exc.problem, exc.hint)

    @app.exception_handler(TailforgeError)
    async def _tf_error(request: Request, exc: TailforgeError):
        return error(400, exc.problem, exc.hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return error(413, f"the request is larger than {cfg.max_upload_bytes:,} bytes",
                         "upload a smaller image")
        if exc.status_code == 404:
            return error(404, f"no such page: {request.url.path}", "the API lives under /api (see /openapi.json)")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return error(422, f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid value')}{more}",
                     "see /openapi.json for the expected fields")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__})", "see the server log")

    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes + MULTIPART_SLACK, error=error)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; frame-ancestors 'none'")
        return response

    # ---- page
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    # ---- API
    @app.get("/api/info", response_model=RunInfo, summary="The run: dataset, classes, groups, limits")
    def info() -> RunInfo:
        return RunInfo(run=run.root.name, dataset=state.dataset, num_classes=len(state.class_names),
                       class_names=state.class_names, groups=state.groups, channels=state.channels,
                       image_size=list(state.size), max_upload_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels)

    @app.get("/api/models", response_model=list[ModelInfo], summary="Checkpoints of the run")
    def models() -> list[ModelInfo]:
        return [state.model_info(n) for n in state.model_names()]

    @app.get("/api/samples", response_model=SampleList, summary="Test images to try, few-shot classes first",
             responses=ERRORS)
    def samples(per_class: int = Query(cfg.samples_per_class, ge=1, le=100, description="images per class"),
                group: Literal["many", "medium", "few"] | None = Query(None, description="only this group")):
        return SampleList(total=len(state.test), samples=state.samples(per_class, group))

    @app.get("/api/samples/{sample_id}/image", summary="One test image as PNG (dataset size)",
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}})
    def sample_image(sample_id: str):
        img, _ = state.sample_image(sample_id)
        return Response(png_bytes(img), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Top-k classes of an image, per model",
              description="Send exactly one of `file` (multipart upload) or `sample_id` (a test image from "
                          "/api/samples). `model` is a checkpoint name from /api/models or `all`.")
    def predict(file: UploadFile | None = File(None, description="image to classify (PNG, JPEG, ...)"),
                sample_id: str | None = Form(None, description="id of a TEST sample instead of an upload"),
                model: str = Form("all", description="checkpoint name, or 'all' to compare every model"),
                top_k: int = Form(5, ge=1, le=100, description="classes to return per model")):
        upload = file is not None and (file.filename or file.size)
        if bool(upload) == bool(sample_id):
            raise ServeError(422, "send exactly one of 'file' (an upload) or 'sample_id' (a test image)",
                             "pick a test image or upload a file, not both")
        true_label = None
        if upload:
            blob = file.file.read(cfg.max_upload_bytes + 1)
            if len(blob) > cfg.max_upload_bytes:
                raise ServeError(413, f"the upload is larger than {cfg.max_upload_bytes:,} bytes", "upload a smaller image")
            image, orig = decode_upload(blob, state.channels, state.size, cfg.max_pixels)
            inp = InputInfo(kind="upload", filename=(file.filename or "")[:200], original_size=orig,
                            model_input_png=png_data_url(image))
        else:
            image, true_label = state.sample_image(sample_id)
            inp = InputInfo(kind="sample", sample_id=sample_id, original_size=list(image.shape[:2]),
                            true_label=true_label, true_class=state.class_name(true_label),
                            true_group=state.group(true_label), model_input_png=png_data_url(image))
        names = state.resolve_models(model)
        return PredictResponse(input=inp, results=state.predict(image, names, min(top_k, len(state.class_names)),
                                                                true_label))

    return app
