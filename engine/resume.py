"""Safe resume: find the checkpoint a run continues from and refuse it when the settings that
decide what the run computes changed since it was written.

Every checkpoint records the run's resolved config (``meta.config``). Resuming compares it with
the config of the new invocation key by key; keys that only change *how* the run is executed or
observed (logging, workers, checkpoint cadence, ``max_steps``, the device, compilation,
evaluation) may differ, every other key must match, unless the user names it (or its section) in
``train.resume_allow``. The refusal lists each differing key with both values, so a changed
learning rate or depth is never continued silently with the new value.
"""
from __future__ import annotations

import difflib
import glob
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from .checkpoint import CheckpointError, find_latest, load_checkpoint
from .config import ConfigError

# Keys (or whole sections) a resumed run may change without asking: they do not change the
# computation of the steps still to come, only where, how fast and how visibly they run.
ALWAYS_ALLOWED: Tuple[str, ...] = (
    "train.max_steps", "train.log_every", "train.progress", "train.save_every_steps", "train.save_every_minutes",
    "train.eval_every_steps", "train.keep_last", "train.resume", "train.resume_allow", "train.output_dir",
    "train.device", "train.ema_eval",
    "train.compile", "train.compile_backend", "train.compile_mode", "train.compile_recompile_limit",
    "train.per_gpu_batch_size",
    "data.num_workers", "data.decode", "data.crop_pct", "curriculum.baseline_epochs", "eval",
    "model.checkpoint",      # fine-tuning: the pretrained file only initialises; a resume loads the run's weights
)
# Keys no resume can change, accepted or not: the checkpoint's model or optimizer state, or the plan
# of steps it sits in, would not fit the run.
NEVER: Tuple[str, ...] = (
    "mode", "optimizer", "model.arch", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
    "model.num_heads", "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads",
    "model.name", "model.builder", "model.kwargs", "model.num_classes", "model.global_pool", "model.resize", "curriculum.name",
    "curriculum.epochs", "curriculum.multiple_of", "train.batch_size", "train.accum_steps",
    "growth.schedule", "growth.omega", "growth.stages", "growth.operator", "growth.search_epochs",
    "growth.search_first", "growth.multiple_of",
)
_ABSENT = "(absent)"
# What a key added later meant in checkpoints written before it existed
LEGACY_DEFAULTS: Dict[str, Any] = {"model.resize": "forward", "train.accum_by_stage": False, "model.builder": "timm",
                                   "recipe": "none", "opt_eps": 1e-8, "data.replay_chunks": 1, "train.ema_decay": 0.0,
                                   "train.ema_eval": True,
                                   **{f"growth.{k}": v for k, v in (
                                       ("schedule", "none"), ("omega", 0.5), ("stages", 4), ("operator", "mogrow"),
                                       ("momentum", 0.998), ("momentum_warmup", False), ("search_epochs", 2.0),
                                       ("search_first", False),
                                       ("search_images", 256), ("alpha", None), ("adareg", False),
                                       ("multiple_of", None), ("score_momentum", 0.998), ("runtime", "flops"),
                                       ("shrink", "fourier"))}}


class Resume(NamedTuple):
    path: str
    state: Dict[str, Any]
    accepted: List[Tuple[str, Any, Any]] = []      # changes train.resume_allow let through


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other values are leaves)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, names: Iterable[str]) -> bool:
    return any(n == "*" or key == n or key.startswith(n + ".") for n in names)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                     allow: Iterable[str] = ()) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs and may not (``ALWAYS_ALLOWED``
    and ``allow``, exact keys or section prefixes; never the ``NEVER`` keys). A key one side lacks
    shows as "(absent)"."""
    a, b = flatten(saved), flatten(current)
    a = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in b}, **a}
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb and not _covered(key, ALWAYS_ALLOWED) and (_covered(key, NEVER) or not _covered(key, allow)):
            out.append((key, va, vb))
    return out


def check_allow_list(allow: Iterable[str], config: Mapping[str, Any]) -> None:
    """Every ``train.resume_allow`` entry must name a key or section of the config (or be ``*``):
    a misspelt entry would silently accept nothing."""
    keys = list(flatten(config))
    names = set(keys) | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    bad = [n for n in allow if n != "*" and n not in names]
    if bad:
        hints = [m for n in bad for m in difflib.get_close_matches(n, sorted(names), n=1)]
        raise ConfigError(f"train.resume_allow names {bad}, which are no key or section of this config"
                          + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                          + "; allowed: dotted keys (train.blr), sections (train) or '*'")


def check_settings(path: str, saved: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                   allow: Iterable[str] = ()) -> List[Tuple[str, Any, Any]]:
    """Raise :class:`ConfigError` naming every setting that differs from the checkpoint's; returns
    the differences ``allow`` accepted."""
    allow = list(allow)
    if saved is None:
        if "*" in allow:
            return []
        raise ConfigError(f"cannot resume from {path}: it records no config, so this run's settings cannot be "
                          "checked against it; use a new train.output_dir, train.resume=never to start over, or "
                          "train.resume_allow=['*'] to continue it anyway")
    if set(saved) != set(current):
        raise ConfigError(f"cannot resume from {path}: it was written by another command (its config has the "
                          f"sections {sorted(saved)}, this one {sorted(current)}); use a new train.output_dir")
    diffs = changed_settings(saved, current, allow)
    if not diffs:
        return changed_settings(saved, current)      # what differs now is what allow accepted
    lines = "\n".join(f"  {k}: {_show(v0)} in the run, {_show(v1)} now" for k, v0, v1 in diffs)
    fixed = [k for k, _, _ in diffs if _covered(k, NEVER)]
    keys = ",".join(k for k, _, _ in diffs if k not in fixed)
    ways = ["use a new train.output_dir", "restore the run's values (its config.yaml)"]
    if keys:
        ways.append(f"accept the change explicitly with train.resume_allow=[{keys}]"
                    + (f" (not possible for {', '.join(fixed)}: the model or plan would not fit the checkpoint)"
                       if fixed else ""))
    else:
        ways[0] += f" ({', '.join(fixed)} cannot change within a run: the model or plan would not fit the checkpoint)"
    raise ConfigError(
        f"cannot resume from {path}: {len(diffs)} setting(s) differ from the run it continues:\n{lines}\n"
        f"Continuing would train the rest of the run with other settings than its first part: "
        + "; or ".join(ways) + ".")


def _show(v: Any) -> str:
    return v if v is _ABSENT else repr(v)


def find_resume(train_cfg: Any, run_dir: str, config: Mapping[str, Any]) -> Optional[Resume]:
    """The checkpoint ``train_cfg.resume`` points at (auto: the run directory's latest, if any),
    loaded and checked against ``config``; None when the run starts fresh."""
    check_allow_list(train_cfg.resume_allow, config)
    folder = os.path.join(run_dir, "checkpoints")
    if train_cfg.resume == "never":
        if glob.glob(os.path.join(folder, "checkpoint-*.pth")):
            raise ConfigError(f"train.resume=never, but {run_dir} holds the checkpoints of a run ({folder}); a new "
                              "run there would mix its checkpoints with the old ones. Use a new train.output_dir, "
                              "or delete that folder to start over")
        return None
    if train_cfg.resume == "auto":
        path = find_latest(folder)
        if path is None:
            return None
    else:
        path = train_cfg.resume
    try:
        state = load_checkpoint(path, "train.resume")
    except CheckpointError as e:
        older = sorted(glob.glob(os.path.join(folder, "checkpoint-0*.pth")))
        if train_cfg.resume != "auto" or not older:
            raise
        raise CheckpointError(f"{e}. The run's numbered checkpoints: {', '.join(map(os.path.basename, older))}; "
                              "continue from one with train.resume=PATH") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "position" not in meta or "optimizer" not in state:
        raise ConfigError(f"train.resume {path!r} is not a training checkpoint of this toolkit (it has no "
                          "optimizer state or run position; an encoder export or an official file cannot be "
                          "resumed); to start from pretrained weights use model.checkpoint (fine-tuning)")
    return Resume(path, state, check_settings(path, meta.get("config"), config, train_cfg.resume_allow))


def check_plan_steps(res: Resume, total_steps: int, dataset_size: int) -> None:
    """The checkpoint must sit in a plan of the same length: with the settings checked, a different
    length means the dataset changed size (data the settings cannot show)."""
    saved = res.state["meta"]["position"]["total_steps"]
    if saved != total_steps:
        raise ConfigError(
            f"cannot resume from {res.path}: it belongs to a plan of {saved} steps, this run's plan has "
            f"{total_steps} with the same settings, so the dataset changed size (now {dataset_size} samples); "
            f"use the run's data, a new train.output_dir, or train.resume=never in a new folder")
