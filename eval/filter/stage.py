"""The filter stage: score every synthetic candidate against the real TRAIN split, keep the useful ones.

``filter_candidates(run, FilterConfig, progress)`` reads ``candidates.parquet``, ``real.parquet``
(train rows only: val and test are never read into the filter) and ``plan.json`` (per-class quota
``need``), embeds images with the configured embedder (feature-dictionary candidates are already
features of the classifier named in ``feature_model`` and are scored against the real features of
that same classifier), applies the rules of ``tailforge.eval.filter.score`` and writes ``filtered.parquet``
(candidates + ``score_*`` + ``accepted`` + ``reason``) and a report under ``<run>/filter/``.

A finished filter with the same inputs is not redone; embeddings are cached, so an interrupted
run resumes without re-embedding what it already embedded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailforge.data.atomic import read_json, write_json
from tailforge.data.errors import TailforgeError, did_you_mean
from tailforge.data.images import load_images, load_npy
from tailforge.data.manifest import is_feature, read_manifest, write_manifest
from tailforge.data.run import RunDir

Progress = Optional[Callable[[int, int, dict], None]]


class FilterConfig(BaseModel):
    """How candidates are embedded, scored and kept."""

    model_config = ConfigDict(extra="forbid")

    embedder: str = Field(
        "classifier", description="embedding model: classifier (penultimate features of a classifier trained on "
        "the run's real train split), clip (transformers CLIP vision encoder), timm (a timm backbone), or any "
        "name registered in tailforge.eval.filter.EMBEDDERS")
    model: Union[str, None] = Field(None, description="classifier embedder: the model folder models/<name> "
                                    "(default: baseline, or the run's only model)")
    embedder_path: Union[str, None] = Field(None, description="clip/timm: local folder or weights file "
                                            "(clip: or a hub id when online)")
    embedder_arch: Union[str, None] = Field(None, description="timm: architecture name when the path is a weights file")
    image_size: Union[int, None] = Field(None, description="clip/timm: input size (default: the model's own)")
    batch_size: int = Field(256, ge=1, description="images per embedding batch")
    device: Union[str, None] = Field(None, description="torch device for embedding (default: cuda when present)")
    consistency: Literal["knn", "prototype"] = Field(
        "knn", description="class consistency rule: knn (target class wins the similarity-weighted vote of the "
        "k nearest real train samples) or prototype (nearest class prototype is the target)")
    k: int = Field(10, ge=1, description="neighbours for the kNN vote")
    knn_prior_correction: float = Field(1.0, ge=0, le=1, description="kNN votes are divided by n_class**this, "
                                        "so head classes do not outvote the tail by sheer numbers (0: plain kNN)")
    fidelity_percentile: float = Field(5.0, ge=0, le=100, description="fidelity threshold of a class: this "
                                       "percentile of its real samples' leave-one-out cosine to the prototype")
    min_calibration: int = Field(10, ge=2, description="classes with fewer real train samples use the pooled "
                                 "threshold (or their least typical real sample, if lower)")
    novelty_percentile: float = Field(99.0, ge=0, le=100, description="near-copy ceiling: this percentile of "
                                      "real samples' similarity to their nearest other real sample")
    novelty_ceiling: Union[float, None] = Field(None, description="fixed near-copy ceiling (overrides the percentile)")
    duplicate_threshold: Union[float, None] = Field(None, description="cosine above which two accepted candidates "
                                                    "are duplicates (default: the near-copy ceiling)")
    calibration_samples: int = Field(20000, ge=1, description="real samples used to calibrate the near-copy ceiling")
    weight_consistency: float = Field(0.5, description="ranking score weight of the consistency score")
    weight_fidelity: float = Field(1.0, description="ranking score weight of fidelity above the class threshold")
    weight_novelty: float = Field(0.5, description="ranking score weight of novelty (1 - max similarity to real)")
    ivf_threshold: int = Field(200_000, ge=1, description="real samples past which an IVF index replaces exact search")
    nprobe: int = Field(16, ge=1, description="IVF lists probed per query")
    threads: Union[int, None] = Field(None, ge=1, description="faiss CPU threads (default: all cores; 1 is faster "
                                      "on a busy shared machine)")
    grid_samples: int = Field(8, ge=1, description="accepted and rejected samples shown per tail class grid")
    cache: bool = Field(True, description="cache embeddings under <run>/filter/cache")
    seed: int = Field(0, description="seed of calibration sampling and of the random quota order (guard rules)")
    realism_percentile: Union[float, None] = Field(
        0.0, ge=0, le=100, description="`unrealistic`: a candidate farther from every real train sample than this "
        "percentile of the real samples' nearest-other similarity (0: the least typical real sample) is off the "
        "data manifold, e.g. noise; None turns the rule off")
    blank_std: float = Field(2.0, ge=0, description="`blank`: an image candidate whose pixel standard deviation "
                             "(0-255) is below this is blank or constant")
    feature_rules: Literal["guard", "all"] = Field(
        "guard", description="rules for feature-vector candidates (featdict, featcov): guard = only what catches "
        "broken samples (unrealistic, near copies of another class's real sample, near copies, duplicates) and "
        "a seeded random quota order; all = every image rule and the score order. guard was chosen on val: "
        "every selection rule lost to a random subset in feature space (bench/results/feature_study.md)")
    image_rules: Literal["all", "guard"] = Field(
        "all", description="rules for image candidates: all (every rule, score order) or guard (only the broken-sample "
        "rules and a seeded random quota order, as feature_rules: guard). The benchmark's oracle arm uses guard: its "
        "candidates are held-back REAL images, and the selection rules, made to catch a generator's failures, would "
        "drop the hard real tail images a perfect generator is worth most for")
    rules: list[str] = Field(default_factory=list, description="extra rules registered in "
                             "tailforge.eval.filter.score.RULES, applied after the built-in ones in this order "
                             "(none by default)")

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, v: str) -> str:
        from .embedders import EMBEDDERS

        return _known(v.strip(), EMBEDDERS, "embedder")

    @field_validator("rules", mode="before")
    @classmethod
    def _known_rules(cls, v):
        from .score import RULES

        v = [v] if isinstance(v, str) else v  # `--rules low_margin`: one name
        return [_known(str(n).strip(), RULES, "filter rule") for n in v] if isinstance(v, (list, tuple)) else v


def _known(name: str, registry, kind: str) -> str:
    """``name`` if registered, else a ValueError naming the nearest and the valid ones (pydantic reports it)."""
    if name not in registry:
        valid = sorted(registry)
        raise ValueError(f"unknown {kind} '{name}': " + (did_you_mean(name, valid) + "valid: " + ", ".join(valid)
                         if valid else f"none is registered (see docs/architecture.md: add a {kind})"))
    return name


SCORE_COLUMNS = ("score_consistency", "score_fidelity", "score_novelty", "score_duplicate", "score")


def filter_dir(run: RunDir) -> Path:
    return run.side / "filter"


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_candidates(cands: pd.DataFrame, info: dict) -> None:
    """Every candidate names a class of the dataset, by label and by name."""
    if cands.empty:
        raise TailforgeError("candidates.parquet holds no candidates", "run `tailforge generate` with a non-empty plan")
    names = info["class_names"]
    bad = cands[(cands["label"] < 0) | (cands["label"] >= len(names))]
    if not bad.empty:
        raise TailforgeError(f"candidate {bad['sample_id'].iloc[0]} has unknown class label {int(bad['label'].iloc[0])} "
                             f"(the dataset has {len(names)} classes)", "regenerate the candidates for this run")
    wrong = cands["class_name"].to_numpy() != np.asarray(names, dtype=object)[cands["label"].to_numpy()]
    if wrong.any():
        row = cands[wrong].iloc[0]
        raise TailforgeError(f"candidate {row['sample_id']} has class '{row['class_name']}' but label {row['label']} "
                             f"is '{names[int(row['label'])]}'", "regenerate the candidates for this run")


def load_quotas(run: RunDir) -> dict[int, int]:
    """Per-class number of candidates to keep (``need`` in plan.json)."""
    plan = read_json(run.require(run.plan, "plan"))
    try:
        return {int(c["label"]): int(c["need"]) for c in plan["classes"]}
    except (KeyError, TypeError, ValueError):
        raise TailforgeError(f"{run.plan} has no per-class 'label'/'need' list",
                             "re-run `tailforge plan`") from None


def load_features(run: RunDir, uris: list[str]) -> np.ndarray:
    """Rows of float32 ``.npy`` feature shards addressed as ``path.npy#row``."""
    out, by_file = [None] * len(uris), {}
    for i, uri in enumerate(uris):
        path, row = run.resolve(uri)
        if row is None:
            raise TailforgeError(f"feature candidate uri {uri!r} names no row", "featdict uris look like shard.npy#12")
        by_file.setdefault(str(path), []).append((i, row))
    dims = set()
    for path, pairs in by_file.items():
        arr = load_npy(path)
        if arr.ndim != 2:
            raise TailforgeError(f"feature shard {path} has shape {arr.shape}, not (rows, dim)", "regenerate it")
        dims.add(arr.shape[1])
        block = np.asarray(arr[[r for _, r in pairs]], dtype=np.float32)
        for (i, _), v in zip(pairs, block):
            out[i] = v
    if len(dims) > 1:
        raise TailforgeError(f"feature shards have different dimensions {sorted(dims)}", "regenerate the featdict shards")
    return np.stack(out)


def _space_groups(cands: pd.DataFrame, cfg: FilterConfig) -> dict[tuple[str, str], np.ndarray]:
    """Candidate row positions per embedding space: ("image", embedder) or ("features", feature_model)."""
    is_feat = is_feature(cands)
    groups = {}
    if (~is_feat).any():
        groups[("image", cfg.embedder)] = np.flatnonzero(~is_feat)
    if is_feat.any():
        if "feature_model" not in cands.columns or cands.loc[is_feat, "feature_model"].isna().any():
            raise TailforgeError("feature candidates lack the column feature_model",
                                 "regenerate them: each feature row must name the classifier it came from")
        fm = cands["feature_model"].to_numpy()
        for m in sorted(set(fm[is_feat])):
            groups[("features", str(m))] = np.flatnonzero(is_feat & (fm == m))
    return groups


def filter_candidates(run: RunDir | str | Path, cfg: FilterConfig | None = None, progress: Progress = None) -> pd.DataFrame:
    """Score all candidates, decide accept/reject with a reason, write ``filtered.parquet`` + report."""
    from .embedders import ClassifierEmbedder, embed_cached, make_embedder, uri_hash
    from .index import FaissSearch
    from .report import write_report
    from .score import decide, duplicate_pairs, random_priority, score_space

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or FilterConfig()
    info = run.dataset_info()
    if not run.candidates.exists() and run.plan.exists() and int(read_json(run.plan).get("total", 0)) == 0:
        # the plan tops up no class (a balanced dataset, e.g. one that `tailforge export` wrote): nothing was
        # generated, nothing is kept, and the arms train on the real data alone
        out = pd.DataFrame({"sample_id": pd.Series(dtype=str), "uri": pd.Series(dtype=str),
                            "label": pd.Series(dtype="int64"), "class_name": pd.Series(dtype=str),
                            "split": pd.Series(dtype=str), "source": pd.Series(dtype=str),
                            **{c: pd.Series(dtype=float) for c in (*SCORE_COLUMNS, "fidelity_threshold")},
                            "space": pd.Series(dtype=str), "accepted": pd.Series(dtype=bool),
                            "reason": pd.Series(dtype=str)})
        write_manifest(out, run.filtered)
        return out
    cands = read_manifest(run.require(run.candidates, "generate")).reset_index(drop=True)
    check_candidates(cands, info)
    quotas = load_quotas(run)
    fingerprint = {"config": cfg.model_dump(mode="json"), "candidates": _file_digest(run.candidates),
                   "real": _file_digest(run.real), "plan": _file_digest(run.plan)}
    groups = _space_groups(cands, cfg)
    fingerprint["files"] = uri_hash(cands["uri"].tolist(), run)
    embedders = {key: (make_embedder(run, cfg) if key[0] == "image" else
                       ClassifierEmbedder(run, key[1], cfg.batch_size, cfg.device)) for key in groups}
    fingerprint["embedders"] = {f"{k[0]}:{k[1]}": e.key for k, e in embedders.items()}
    done = filter_dir(run) / "done.json"
    if run.filtered.exists() and done.exists() and read_json(done).get("fingerprint") == fingerprint:
        return pd.read_parquet(run.filtered)

    real = read_manifest(run.real)
    real = real[(real["split"] == "train") & (real["source"] == "real")].reset_index(drop=True)
    channels, size = info["channels"], tuple(info["image_size"])

    def images(uris):
        return load_images(uris, run.root, channels, size)

    num_classes, search = len(info["class_names"]), FaissSearch(cfg.ivf_threshold, cfg.nprobe, seed=cfg.seed,
                                                                  threads=cfg.threads)
    frames, calibrations, vectors = [], {}, {}
    steps = 2 * len(groups) + 1
    for g, (key, rows) in enumerate(groups.items()):
        emb, name = embedders[key], f"{key[0]}:{key[1]}"

        def tick(done_, total_, what, step):
            if progress:
                progress(step, steps, {"stage": what, "space": name, "done": done_, "total": total_})

        real_vec = embed_cached(emb, real["uri"].tolist(), run, images, use_cache=cfg.cache,
                                progress=lambda d, t: tick(d, t, "embed real train", 2 * g))
        uris = cands["uri"].iloc[rows].tolist()
        if key[0] == "image":
            cand_vec = embed_cached(emb, uris, run, images, use_cache=cfg.cache,
                                    progress=lambda d, t: tick(d, t, "embed candidates", 2 * g + 1))
        else:
            cand_vec = load_features(run, uris)
            if cand_vec.shape[1] != real_vec.shape[1]:
                raise TailforgeError(
                    f"feature candidates have dimension {cand_vec.shape[1]} but classifier '{key[1]}' gives "
                    f"{real_vec.shape[1]}-d features", "regenerate the featdict candidates with that classifier")
        guard = (key[0] == "features" and cfg.feature_rules == "guard") or (key[0] == "image" and cfg.image_rules == "guard")
        frame, cal = score_space(real_vec, real["label"].to_numpy(), cand_vec, cands["label"].to_numpy()[rows],
                                 num_classes, cfg, search, guard=guard)
        if key[0] == "image":  # blank / constant images, whatever the embedder makes of them
            flat = blank_images(uris, images, cfg.blank_std)
            frame.loc[flat, "reason"] = "blank"
        frame["priority"] = random_priority(len(rows), cfg.seed) if guard else frame["score"].to_numpy()
        frame.index = rows
        frame["space"] = name
        frames.append(frame)
        calibrations[name] = cal
        vectors[name] = (rows, cand_vec, cal.duplicate_threshold)

    scores = pd.concat(frames).sort_index()
    labels = cands["label"].to_numpy()
    pairs = []
    for name, (rows, vec, thr) in vectors.items():
        alive = scores["reason"].to_numpy()[rows] == ""
        pairs += [(rows[i], rows[j]) for i, j in duplicate_pairs(vec, labels[rows], alive, thr, search)]
    accepted, reason = decide(labels, scores["priority"].to_numpy(), scores["reason"].to_numpy(), pairs, quotas)
    out = cands.copy()
    for col in SCORE_COLUMNS:
        out[col] = scores[col].to_numpy()
    out["fidelity_threshold"] = scores["fidelity_threshold"].to_numpy()
    out["space"] = scores["space"].to_numpy()
    out["accepted"], out["reason"] = accepted, pd.Series(reason, dtype=str).to_numpy()

    write_manifest(out, run.filtered)
    report = write_report(run, out, quotas, calibrations, cfg, search.name)
    write_json(done, {"fingerprint": fingerprint, "warnings": report["warnings"]})
    if progress:
        progress(steps, steps, {"stage": "done", "accepted": int(accepted.sum()), "candidates": len(out)})
    return out


def blank_images(uris: list[str], images, min_std: float, block: int = 2048) -> np.ndarray:
    """Positions of blank / constant images (pixel std below ``min_std``)."""
    out = []
    for i in range(0, len(uris), block):
        arr = images(uris[i:i + block])
        out.append(arr.reshape(len(arr), -1).std(1) < min_std)
    return np.flatnonzero(np.concatenate(out)) if out else np.zeros(0, int)


def summary_lines(out: pd.DataFrame) -> list[str]:
    """One line per reason with its count (for the CLI)."""
    counts = out["reason"].replace("", "accepted").value_counts()
    return [f"{k}: {int(v)}" for k, v in counts.items()]


__all__ = ["FilterConfig", "filter_candidates", "SCORE_COLUMNS", "check_candidates", "load_quotas"]
