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

import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from .checkpoint import find_latest, load_checkpoint
from .config import ConfigError

# Keys (or whole sections) a resumed run may change without asking: they do not change the
# computation of the steps still to come, only where, how fast and how visibly they run.
ALWAYS_ALLOWED: Tuple[str, ...] = (
    "train.max_steps", "train.log_every", "train.progress", "train.save_every_steps", "train.eval_every_steps",
    "train.keep_last", "train.resume", "train.resume_allow", "train.output_dir", "train.device",
    "train.compile", "train.compile_backend", "train.compile_recompile_limit", "train.per_gpu_batch_size",
    "data.num_workers", "data.decode", "data.demo", "data.demo_images", "eval",
)


class Resume(NamedTuple):
    path: str
    state: Dict[str, Any]


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
    and ``allow``, exact keys or section prefixes)."""
    a, b = flatten(saved), flatten(current)
    names = (*ALWAYS_ALLOWED, *allow)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb and not _covered(key, names):
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def check_settings(path: str, saved: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                   allow: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` naming every setting that differs from the checkpoint's."""
    allow = list(allow)
    if saved is None:
        if "*" in allow:
            return
        raise ConfigError(f"cannot resume from {path}: it records no config, so this run's settings cannot be "
                          "checked against it; use a new train.output_dir, train.resume=never to start over, or "
                          "train.resume_allow=['*'] to continue it anyway")
    diffs = changed_settings(saved, current, allow)
    if not diffs:
        return
    lines = "\n".join(f"  {k}: {v0!r} in the run, {v1!r} now" for k, v0, v1 in diffs)
    keys = ", ".join(k for k, _, _ in diffs)
    raise ConfigError(
        f"cannot resume from {path}: {len(diffs)} setting(s) differ from the run it continues:\n{lines}\n"
        f"Continuing would train the rest of the run with other settings than its first part. Use a new "
        f"train.output_dir (or train.resume=never to start this one over), restore the run's values (its "
        f"config.yaml), or accept the change explicitly with train.resume_allow=[{keys}].")


def find_resume(train_cfg: Any, run_dir: str, config: Mapping[str, Any]) -> Optional[Resume]:
    """The checkpoint ``train_cfg.resume`` points at (auto: the run directory's latest, if any),
    loaded and checked against ``config``; None when the run starts fresh."""
    if train_cfg.resume == "never":
        return None
    if train_cfg.resume == "auto":
        path = find_latest(os.path.join(run_dir, "checkpoints"))
        if path is None:
            return None
    else:
        path = train_cfg.resume
    state = load_checkpoint(path, "train.resume")
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "position" not in meta or "optimizer" not in state:
        raise ConfigError(f"train.resume {path!r} is not a training checkpoint of this toolkit (it has no "
                          "optimizer state or run position; an encoder export or an official file cannot be "
                          "resumed); to start from pretrained weights use model.checkpoint (fine-tuning)")
    check_settings(path, meta.get("config"), config, train_cfg.resume_allow)
    return Resume(path, state)
