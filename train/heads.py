"""Heads on frozen features: the real-only candidates of a crt recipe, and the post-hoc choices made on VAL.

Kang et al. (ICLR 2020, "Decoupling representation and classifier") show that once a backbone is trained, the
head decides most of the long tail's accuracy, and that which head is best depends on the data; Menon et al.
(ICLR 2021) add logit adjustment. A claim that synthetic tail data helps must therefore stand against the
strongest of these on the same features, chosen on VAL, not against one fixed head. ``HEADS`` names them; each
is a set of recipe settings (the same budget: ``epoch_samples`` and epochs come from the recipe):

``crt``      CE with class-balanced sampling, the head re-initialised (cRT; Kang et al.'s decoupling code)
``la``       logit-adjusted CE, ``log prior`` times ``la_tau`` added to the logits in training (Menon et al.),
             instance sampling
``taunorm``  CE with instance sampling, then tau-normalisation: each class's weight vector divided by its norm to
             the power tau, the bias dropped (Kang et al.: w_c / ||w_c||^tau); tau chosen on VAL over ``TAU_GRID``

``finish`` makes the post-hoc choices after training, on the validation split only: tau of ``taunorm``
(``train.tau_norm``) and the zero-shot / adapter blend of ``clip_adapter`` (train/clip.py). Both are baked into
the saved head, so evaluation, the filter and the classify page need nothing new.
"""
from __future__ import annotations

import numpy as np

HEADS: dict[str, dict] = {
    "crt": {"loss": "ce", "sampler": "class_balanced", "tau_norm": None},
    "la": {"loss": "logit_adjust", "sampler": "instance", "tau_norm": None},
    "taunorm": {"loss": "ce", "sampler": "instance", "tau_norm": "val"},
}
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0, 0.1, ..., 2.0 (Kang et al. search [0, 1]; wider here)


def tau_normalise(head: torch.nn.Linear, tau: float) -> None:
    """``w_c <- w_c / ||w_c||^tau``, bias set to 0 (in place)."""
    import torch

    with torch.no_grad():
        _tau_normalise(head, tau)


def _tau_normalise(head, tau: float) -> None:
    norm = head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    head.weight.div_(norm.pow(tau))
    if head.bias is not None:
        head.bias.zero_()


def choose_tau(head: torch.nn.Linear, val_feats: torch.Tensor, val_y: np.ndarray, score, fixed=None) -> dict:
    """Tau-normalise ``head`` with the tau of best VAL ``score(y, pred)`` over ``TAU_GRID`` (ties: the smaller
    tau), or with ``fixed``; returns the choice and every value seen."""
    import torch

    with torch.no_grad():
        return _choose_tau(head, val_feats, val_y, score, fixed)


def _choose_tau(head, val_feats, val_y, score, fixed) -> dict:
    import torch

    w0 = head.weight.detach().clone()
    b0 = None if head.bias is None else head.bias.detach().clone()
    seen = []
    for tau in ([float(fixed)] if fixed is not None else TAU_GRID):
        head.weight.copy_(w0)
        _tau_normalise(head, tau)
        logits = torch.cat([torch.nn.functional.linear(val_feats[i:i + 4096], head.weight)
                            for i in range(0, len(val_feats), 4096)])
        pred = logits.argmax(1).cpu().numpy()
        seen.append({"tau": tau, "val_balanced_acc": round(float(score(val_y, pred)), 6),
                     "val_top1": round(float((pred == val_y).mean()), 6)})
    best = max(seen, key=lambda r: (r["val_balanced_acc"], -r["tau"]))
    head.weight.copy_(w0)
    if b0 is not None:
        head.bias.copy_(b0)
    _tau_normalise(head, best["tau"])
    return {"tau": best["tau"], "tau_chosen_on": "fixed" if fixed is not None else "val",
            "val_balanced_acc": best["val_balanced_acc"], "val_top1": best["val_top1"], "grid": seen}


def finish(model, task, val_y: np.ndarray, cfg, meta: dict, state: dict, score) -> None:
    """The post-hoc choices on VAL after training (the best epoch's weights are loaded): tau-normalisation of a
    linear head (``cfg.tau_norm``), the blend of a ``clip_adapter``. Records them in ``meta`` and ``state``."""
    import torch

    from .clip import ClipAdapter

    if isinstance(model, ClipAdapter):  # the blend with the zero-shot head, chosen on val
        chosen = model.choose_blend(task.val_feats, val_y, score, cfg.clip.blend)
        meta["clip"] = {**meta.get("clip", {}), **{k: v for k, v in chosen.items() if k != "grid"},
                        "blend_grid": chosen["grid"]}
        state["best"].update({k: chosen[k] for k in ("val_balanced_acc", "val_top1", "blend", "blend_chosen_on",
                                                      "zero_shot_val_balanced_acc", "adapter_val_balanced_acc")})
    elif getattr(cfg, "tau_norm", None) is not None and isinstance(model.head, torch.nn.Linear) \
            and hasattr(task, "val_feats"):
        fixed = None if cfg.tau_norm == "val" else float(cfg.tau_norm)
        chosen = choose_tau(model.head, task.val_feats, val_y, score, fixed)
        meta["tau_norm"] = {k: v for k, v in chosen.items() if k != "grid"} | {"grid": chosen["grid"]}
        state["best"].update({k: chosen[k] for k in ("val_balanced_acc", "val_top1", "tau", "tau_chosen_on")})


def choose(run, names: dict[str, str], split: str = "val", reference: str | None = None) -> dict:
    """The real-only candidate with the best VAL balanced accuracy (its model's ``best.json``: the selected epoch,
    after the post-hoc choices), written to ``eval/candidates.json``: ``{"chosen", "split", "scores", "models"}``.
    ``names``: head -> model name. Ties go to the earlier head in ``names``.

    ``reference``: the frozen base network (the fine-tuned backbone with its own, jointly trained head). It is a
    real-only model too but not a head that can be re-trained on synthetic features, so it is scored, not chosen:
    ``"reference": {"model", "val_balanced_acc", "above"}`` (above: it beats the chosen head on VAL), and the
    report then also measures ``rebalanced`` against it (eval/room.py ``room_report``)."""
    from tailforge.data.atomic import read_json, write_json
    from tailforge.data.errors import TailforgeError

    scores = {}
    for head, model in names.items():
        f = run.model_dir(model) / "best.json"
        if not f.is_file():
            raise TailforgeError(f"candidate '{model}' has no best.json in {run.root}", "train it first")
        b = read_json(f)
        if b.get("split", split) != split:
            raise TailforgeError(f"candidate '{model}' was selected on {b.get('split')}, not {split}",
                                 "retrain it (model selection uses the val split)")
        scores[head] = float(b["val_balanced_acc"])
    best = max(scores, key=lambda h: (scores[h], -list(names).index(h)))
    out = {"chosen": best, "split": split, "metric": "balanced_acc", "scores": scores, "models": dict(names)}
    f = run.model_dir(reference) / "best.json" if reference else None
    if f is not None and f.is_file() and read_json(f).get("split", split) == split:
        v = float(read_json(f)["val_balanced_acc"])
        out["reference"] = {"model": reference, "val_balanced_acc": v, "above": v > scores[best]}
    write_json(run.eval_dir / "candidates.json", out)
    return out
__all__ = ["HEADS", "TAU_GRID", "tau_normalise", "choose_tau", "finish", "choose"]
