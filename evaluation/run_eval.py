"""``python -m evaluation RUN_DIR [key=value ...]``: evaluate a finished pretraining run in one command.

Reads the run's ``encoder.pth`` and, on a labelled ImageFolder pair (``data=ROOT`` with
``ROOT/train`` and ``ROOT/val``, or the run's own ``eval.knn`` folders), extracts the frozen
features once (evaluation transform at the pretraining size) and reports:

- ``knn``: the weighted kNN rule (:mod:`engine.knn`);
- ``probe``: a linear probe on the cached features (:mod:`evaluation.probe`);
- ``finetune`` (``finetune.epochs=N``): a short MAE-recipe fine-tune, a ``python -m finetune``
  process with its own run directory ``RUN_DIR/eval_finetune/<settings hash>`` (resumed if interrupted), final
  and best top-1.

Settings are ``key=value`` overrides of :class:`EvaluationConfig` (``knn.k=10``, ``probe=false``),
as for ``python -m pretrain`` / ``finetune``; the older ``--flags`` (``--data``, ``--k``,
``--no-probe``, ...) stay as aliases. Every phase longer than a few seconds says how far it is.
The numbers are merged into ``RUN_DIR/evaluation.json`` (so evaluations can be added later).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import yaml

from engine.checkpoint import atomic_write_json, load_checkpoint
from engine.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from engine.config_doc import keys_help
from engine.data import EvalDataset, check_same_classes, eval_transform, image_folder
from engine.distributed import DistInfo, resolve_device
from engine.errors import RunFailed, run_cli
from engine.knn import extract_features, knn_accuracy
from engine.stops import RunLock, StopSignals, run_child

from .probe import linear_probe

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
PROGRESS_SECONDS = 10.0      # a phase in progress says how far it is at most this often


def _say(line: str) -> None:
    print(line, flush=True)            # progress reaches a redirected log as it happens


@dataclass
class KnnEvalConfig:
    enabled: bool = True              # score the weighted kNN rule (engine.knn) on the frozen features (knn=false: off)
    k: int = 20                       # neighbours that vote
    temperature: float = 0.07         # vote weight exp(similarity / temperature)


@dataclass
class ProbeEvalConfig:
    enabled: bool = True              # train a linear probe on the cached features (probe=false: off)
    epochs: int = 100                 # probe training epochs (AdamW, cosine; seconds on small sets)


@dataclass
class FinetuneEvalConfig:
    epochs: float = 0.0               # also fine-tune this many epochs (0: no), a python -m finetune run in
                                      # RUN_DIR/eval_finetune/<settings hash> (finetune=N: the same)
    config: Optional[str] = None      # fine-tuning YAML to start from (null: the finetune defaults)
    overrides: List[str] = field(default_factory=list)   # key=value of the fine-tuning config, e.g.
                                      # [train.batch_size=128]; --finetune-set KEY=VALUE adds one


@dataclass
class EvaluationConfig:
    """What ``python -m evaluation`` does, set as ``key=value`` after the run directory."""

    data: Optional[str] = None        # ImageFolder root with train/ and val/ (null: the run's eval.knn folders)
    feature: Literal["cls", "avgpool"] = "cls"   # encoder output: normed cls token | mean of the patch tokens
    batch_size: int = 256             # feature-extraction batch
    num_workers: int = 0              # feature-extraction loader workers (0: load in this process)
    device: str = "auto"              # auto (cuda when available) | cpu | cuda | cuda:N
    crop_pct: float = 0.875           # evaluation transform: resize to size / crop_pct, centre crop
    knn: KnnEvalConfig = field(default_factory=KnnEvalConfig)   # the kNN rule
    probe: ProbeEvalConfig = field(default_factory=ProbeEvalConfig)   # the linear probe
    finetune: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)   # the optional short fine-tune

    def validate(self, where: str) -> None:
        for key, value, ok, rule in (("knn.k", self.knn.k, self.knn.k >= 1, ">= 1"),
                                     ("knn.temperature", self.knn.temperature, self.knn.temperature > 0, "> 0"),
                                     ("probe.epochs", self.probe.epochs, self.probe.epochs >= 1, ">= 1"),
                                     ("finetune.epochs", self.finetune.epochs, self.finetune.epochs >= 0, ">= 0"),
                                     ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
                                     ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
                                     ("crop_pct", self.crop_pct, 0 < self.crop_pct <= 1, "in (0, 1]")):
            if not ok:
                raise ConfigError(f"{key} must be {rule}, got {value}")
        bad = [o for o in self.finetune.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"finetune.overrides: {bad} are not key=value (e.g. train.batch_size=128)")


# the --flags of earlier versions, kept as aliases: flag -> key
FLAG_KEYS = {"data": "data", "no_knn": "knn.enabled", "no_probe": "probe.enabled",
             "finetune_epochs": "finetune.epochs", "k": "knn.k", "temperature": "knn.temperature",
             "feature": "feature", "probe_epochs": "probe.epochs", "batch_size": "batch_size",
             "workers": "num_workers", "device": "device", "finetune_config": "finetune.config"}
SHORTHANDS = {"knn": "knn.enabled", "probe": "probe.enabled", "finetune": "finetune.epochs"}


def evaluation_config(overrides: Sequence[str] = (), flags: Optional[Dict[str, Any]] = None,
                      finetune_set: Sequence[str] = ()) -> EvaluationConfig:
    """The settings: defaults, then the ``--flag`` aliases (``flags``: FLAG_KEYS name -> value given),
    then the ``key=value`` overrides (``knn=false``, ``probe=false``, ``finetune=N``: shorthands),
    then the ``--finetune-set`` items appended to ``finetune.overrides``."""
    data: Dict[str, Any] = {}
    for name, value in (flags or {}).items():
        if name in ("no_knn", "no_probe"):
            value = not value
        node = data
        parts = FLAG_KEYS[name].split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    items = []
    for item in overrides:
        key, eq, value = item.partition("=")
        items.append(f"{SHORTHANDS[key.strip()]}={value}" if eq and key.strip() in SHORTHANDS else item)
    data = apply_overrides(data, items)
    if finetune_set:
        ft = data.setdefault("finetune", {})
        if not isinstance(ft, dict):
            raise ConfigError(f"finetune: expected a mapping, got {ft!r}")
        have = ft.get("overrides") or []
        ft["overrides"] = [*([have] if isinstance(have, str) else have), *finetune_set]
    return from_dict(EvaluationConfig, data)


class _Progress:
    """Says how far a phase of ``total`` items is, at most every :data:`PROGRESS_SECONDS`, and
    what it took at the end."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None]) -> None:
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.done = 0
        self.t0 = self.t_last = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.t_last >= PROGRESS_SECONDS and self.done < self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.log(f"  {self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
                     f"about {left:.0f} s left)")
            self.t_last = now

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _counting(fn: Callable[[torch.Tensor], torch.Tensor], progress: _Progress) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` that advances ``progress`` by the batch it was given."""
    def features(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        progress.advance(int(x.shape[0]))
        return out
    return features


def _extract(fn: Callable[[torch.Tensor], torch.Tensor], files: List[str], labels: List[int], tf: Any,
             dev: torch.device, what: str, log: Callable[[str], None], **kw: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of ``files``, saying how far the extraction is."""
    log(f"extracting features of the {len(files)} {what} images on {dev} ...")
    prog = _Progress(f"{what} features", len(files), "images", log)
    out = extract_features(_counting(fn, prog), EvalDataset(files, labels, tf), dev, **kw)
    log(f"  {what} features: {len(files)} images in {prog.seconds():.1f} s "
        f"({len(files) / max(prog.seconds(), 1e-9):.0f} images/s)")
    return out


def load_encoder(path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A timm ViT (no head) holding the MAE encoder of ``path`` (our pretraining checkpoint or
    ``encoder.pth``), and the checkpoint's metadata."""
    from timm.models.vision_transformer import VisionTransformer

    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    kw = meta.get("model_kwargs")
    if not kw:
        raise ConfigError(f"{path} has no architecture metadata (meta.model_kwargs); evaluate checkpoints written "
                          "by python -m pretrain")
    sd = {k: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_PREFIXES)}
    vit = VisionTransformer(img_size=kw["img_size"], patch_size=kw["patch_size"], embed_dim=kw["embed_dim"],
                            depth=kw["depth"], num_heads=kw["num_heads"], num_classes=0)
    vit.load_state_dict(sd, strict=True)
    return vit.eval(), meta


def pooled(vit: torch.nn.Module, pool: str):
    """The features MAE's encoder gives: normed cls token, or mean of the normed patch tokens."""
    def features(x: torch.Tensor) -> torch.Tensor:
        tokens = vit.forward_features(x)
        return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    return features


def data_folders(run_dir: str, data: Optional[str]) -> Tuple[str, str]:
    """(train, val) ImageFolder roots: ``data/train`` and ``data/val``, else the run's eval.knn folders."""
    if data:
        return os.path.join(data, "train"), os.path.join(data, "val")
    cfg_path = os.path.join(run_dir, "config.yaml")
    knn = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, "r", encoding="utf-8") as f:
            knn = ((yaml.safe_load(f) or {}).get("eval") or {}).get("knn") or {}
    if not knn.get("train"):
        raise ConfigError(f"no labelled data to evaluate {run_dir} on: give data=ROOT (ROOT/train and ROOT/val, "
                          "ImageFolder layout; --data ROOT is the same) or pretrain with eval.knn.train / eval.knn.val")
    return knn["train"], knn["val"]


def finetune_config(encoder: str, meta: Dict[str, Any], train: str, val: str, epochs: float, out: str,
                    overrides: Sequence[str], config: Optional[str] = None):
    """The MAE fine-tuning recipe (``config``, e.g. configs/finetune/mae_vit-b_finetune.yaml, or the
    finetune defaults) for this encoder's architecture, short (warm-up: 10 % of the epochs, at most
    MAE's 5); ``overrides`` come last."""
    from finetune.config import FinetuneConfig

    kw = meta["model_kwargs"]
    root = os.path.dirname(os.path.abspath(train))
    base = [f"model.checkpoint={encoder}", "model.name=vit_base_patch16_224", f"model.img_size={kw['img_size']}",
            f"model.kwargs={{patch_size: {kw['patch_size']}, embed_dim: {kw['embed_dim']}, depth: {kw['depth']}, "
            f"num_heads: {kw['num_heads']}}}",
            f"model.num_classes={len(image_folder(val)[2])}", f"data.path={root}",
            f"data.train_dir={os.path.relpath(os.path.abspath(train), root)}",
            f"data.val_dir={os.path.relpath(os.path.abspath(val), root)}",
            f"curriculum.epochs={epochs}", f"train.warmup_epochs={min(5.0, 0.1 * epochs):g}",
            f"train.output_dir={out}", "train.progress=true"]   # its log is a file: plain progress lines
    return load_config(FinetuneConfig, config, [*base, *overrides])


def _run_config(run_dir: str) -> Dict[str, Any]:
    """The run's resolved ``config.yaml`` as a mapping ({} when there is none or it does not parse)."""
    try:
        with open(os.path.join(run_dir, "config.yaml"), "r", encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def why_no_encoder(run_dir: str) -> str:
    """The one line that says why ``run_dir`` has no ``encoder.pth`` to evaluate: it does not exist,
    is a file, is a fine-tuning run, is no run at all, or is a pretraining run that has not finished."""
    if not os.path.exists(run_dir):
        return (f"run directory {run_dir} does not exist: give the folder of a pretraining run (the "
                "train.output_dir of python -m pretrain, e.g. runs/demo)")
    if not os.path.isdir(run_dir):
        folder = os.path.dirname(os.path.abspath(run_dir))
        return (f"{run_dir} is a file, not a run directory: give the pretraining run's folder"
                + (f" ({folder})" if os.path.basename(run_dir) == "encoder.pth" else " (the one holding encoder.pth)"))
    cfg = _run_config(run_dir)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if "mode" in cfg or "num_classes" in model:
        source = model.get("checkpoint") or ""
        return (f"{run_dir} is a fine-tuning run (python -m finetune), not a pretraining run: python -m evaluation "
                "scores a pretrained encoder; give the pretraining run directory"
                + (f" (this fine-tune started from {source}: python -m evaluation {os.path.dirname(source) or '.'})"
                   if os.path.basename(str(source)) == "encoder.pth" else
                   f" (this fine-tune started from {source})" if source else ""))
    if not cfg:
        return (f"{run_dir} is not a pretraining run directory: it holds neither encoder.pth nor config.yaml "
                "(python -m pretrain writes both into its train.output_dir)")
    return (f"{os.path.join(run_dir, 'encoder.pth')} does not exist: the pretraining run has not finished (the "
            "encoder is exported at its last step); finish it by running the same pretraining command again")


def _inputs(run_dir: str, data: Optional[str], feature: str) -> Tuple[str, str, str]:
    """(encoder.pth, train folder, val folder), checked: what an evaluation and its dry run check first."""
    encoder = os.path.join(run_dir, "encoder.pth")
    if not os.path.isfile(encoder):
        raise FileNotFoundError(why_no_encoder(run_dir))
    if feature not in ("cls", "avgpool"):
        raise ConfigError(f"feature: {feature!r} is not allowed; allowed: cls, avgpool")
    return (encoder, *data_folders(run_dir, data))


def evaluate_run(run_dir: str, data: Optional[str] = None, knn: bool = True, probe: bool = True,
                 finetune_epochs: float = 0, finetune_overrides: Sequence[str] = (),
                 finetune_config_path: Optional[str] = None, k: int = 20,
                 temperature: float = 0.07, feature: str = "cls", batch_size: int = 256, num_workers: int = 0,
                 probe_epochs: int = 100, device: str = "auto", crop_pct: float = 0.875,
                 launcher: Optional[Sequence[str]] = None, log: Callable[[str], None] = _say) -> Dict[str, Any]:
    """Evaluate ``run_dir``'s encoder; returns (and writes into evaluation.json) the results. The
    fine-tune runs as its own ``python -m finetune`` process, behind ``launcher`` (default: this
    Python; e.g. ``[python, -m, torch.distributed.run, --nproc_per_node, 8]``). ``log`` receives a
    line per phase and, in phases longer than a few seconds, how far they are."""
    encoder, train, val = _inputs(run_dir, data, feature)
    with RunLock(run_dir, "python -m evaluation"):   # evaluation.json is the run's: one writer at a time
        t0 = time.perf_counter()
        log(f"loading the encoder {encoder}")
        vit, meta = load_encoder(encoder)
        dev = resolve_device(device)
        vit.to(dev)
        kw_ = meta["model_kwargs"]
        log(f"encoder: ViT of width {kw_['embed_dim']}, depth {kw_['depth']}, patch {kw_['patch_size']}, "
            f"{kw_['img_size']} px, on {dev} ({time.perf_counter() - t0:.1f} s)")
        results: Dict[str, Any] = {"encoder": encoder, "train": train, "val": val,
                                   "img_size": meta["model_kwargs"]["img_size"], "feature": feature}
        if knn or probe:
            log(f"reading the image lists of {train} and {val}")
            train_files, train_labels, classes = image_folder(train)
            val_files, val_labels, val_classes = image_folder(val)
            check_same_classes(classes, val_classes, train, val)
            log(f"data: {len(train_files)} training / {len(val_files)} validation images, {len(classes)} classes")
            tf = eval_transform(meta["model_kwargs"]["img_size"], crop_pct)
            amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
            kw = dict(batch_size=batch_size, num_workers=num_workers, amp_dtype=amp)
            fn = pooled(vit, feature)
            ft, yt = _extract(fn, train_files, train_labels, tf, dev, "training", log, **kw)
            fv, yv = _extract(fn, val_files, val_labels, tf, dev, "validation", log, **kw)
            if knn:
                t = time.perf_counter()
                log(f"scoring the weighted kNN rule (k {k}, temperature {temperature:g}) ...")
                results["knn"] = {**knn_accuracy(ft, yt, fv, yv, k, temperature, len(classes)), "k": k,
                                  "temperature": temperature}
                log(f"  knn: top-1 {results['knn']['top1']:.2f}% ({time.perf_counter() - t:.1f} s)")
            if probe:
                log(f"training a linear probe for {probe_epochs} epochs on the cached features ...")
                prog = _Progress("linear probe", probe_epochs, "epochs", log)
                results["probe"] = {**linear_probe(ft, yt, fv, yv, len(classes), epochs=probe_epochs,
                                                   on_epoch=lambda: prog.advance()), "epochs": probe_epochs}
                log(f"  probe: top-1 {results['probe']['top1']:.2f}% ({prog.seconds():.1f} s)")
            del ft, yt, fv, yv
        vit.cpu()                                   # the fine-tune's processes get the whole device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if finetune_epochs > 0:
            results["finetune"] = _finetune(encoder, meta, train, val, finetune_epochs, run_dir, finetune_overrides,
                                            finetune_config_path, launcher, log)
        path = os.path.join(run_dir, "evaluation.json")
        old = {}
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                old = json.load(f)
        same = all(old.get(k) == results[k] for k in ("train", "val", "img_size", "feature"))
        merged = {**(old if same else {}), **results}     # earlier entries only if they scored the same data
        atomic_write_json(merged, path)
        return merged


class _Relay:
    """Echoes the progress lines a child run appends to its log (``progress: ...``, evaluations)
    while it runs, so a long fine-tune is not silent."""

    PREFIXES = ("progress: ", "eval at step ")

    def __init__(self, path: str, what: str, log: Callable[[str], None], every: float = 2.0) -> None:
        self.path, self.what, self.log, self.every = path, what, log, every
        self.pos = os.path.getsize(path) if os.path.isfile(path) else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Relay":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self._drain()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "r", encoding="utf-8", errors="replace") as f:
                f.seek(self.pos)
                text = f.read()
        except OSError:
            return
        done = text.rfind("\n") + 1            # whole lines only; a partial one is read next time
        self.pos += len(text[:done].encode("utf-8"))
        for line in text[:done].splitlines():
            if line.startswith(self.PREFIXES):
                self.log(f"  {self.what}: {line}")


def _finetune(encoder: str, meta: Dict[str, Any], train: str, val: str, epochs: float, run_dir: str,
              overrides: Sequence[str], config: Optional[str], launcher: Optional[Sequence[str]],
              log: Callable[[str], None] = _say) -> Dict[str, Any]:
    """Short fine-tune in its own process (resumable like any run); its final and best top-1."""
    settings = json.dumps([epochs, list(overrides), config, open(config).read() if config else None, train, val])
    # one folder per fine-tune setting: a changed setting is a new run, never a resumed old one
    out = os.path.join(run_dir, "eval_finetune", hashlib.sha256(settings.encode()).hexdigest()[:12])
    cfg = finetune_config(encoder, meta, train, val, epochs, out, overrides, config)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "requested.yaml")
    save_config(cfg, cfg_path)
    cmd = [*(launcher or [sys.executable]), "-m", "finetune", "--config", cfg_path]
    log_path = os.path.join(out, "finetune.log")
    log(f"fine-tuning for {epochs:g} epochs: python -m finetune in {out} (its log: {log_path}) ...")
    t = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as logf, _Relay(log_path, "fine-tune", log):
        rc = run_child(cmd, logf, f"the fine-tune of {encoder} (log {log_path})")
    log(f"  fine-tune: finished in {time.perf_counter() - t:.1f} s")
    if rc != 0:
        raise RunFailed(f"the fine-tune of {encoder} failed (exit {rc}); see {os.path.join(out, 'finetune.log')}")
    with open(os.path.join(out, "summary.json"), "r", encoding="utf-8") as f:
        summary = json.load(f)
    ev = summary.get("eval") or {}
    return {"top1": ev.get("eval_top1"), "top5": ev.get("eval_top5"), "best_top1": summary.get("best"),
            "epochs": epochs, "run_dir": out, "overrides": list(overrides), "config": config}


def check_evaluation(run_dir: str, data: Optional[str], knn: bool, probe: bool, finetune_epochs: float,
                     feature: str) -> List[str]:
    """What :func:`evaluate_run` checks before its expensive steps, in its order and with its
    messages (a ``--dry-run`` reaches the real run's verdict): ``encoder.pth`` (loaded), the
    feature, the data folders (ImageFolder trees with the same classes). Writes nothing; returns
    the lines saying what the evaluation would do."""
    encoder, train, val = _inputs(run_dir, data, feature)
    _, meta = load_encoder(encoder)
    kw = meta["model_kwargs"]
    lines = [f"encoder {encoder}: ViT of width {kw['embed_dim']}, depth {kw['depth']}, patch {kw['patch_size']}, "
             f"{kw['img_size']} px"]
    if knn or probe or finetune_epochs > 0:
        train_files, _, classes = image_folder(train)
        val_files, _, val_classes = image_folder(val)
        check_same_classes(classes, val_classes, train, val)
        lines.append(f"data: {train} ({len(train_files)} images) / {val} ({len(val_files)} images), "
                     f"{len(classes)} classes")
    if knn:
        lines.append(f"would score the weighted kNN rule on the {feature} features")
    if probe:
        lines.append(f"would train a linear probe on the {feature} features")
    if finetune_epochs > 0:
        lines.append(f"would fine-tune for {finetune_epochs:g} epochs (a python -m finetune run under "
                     f"{os.path.join(run_dir, 'eval_finetune')})")
    lines.append(f"would merge the results into {os.path.join(run_dir, 'evaluation.json')}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    aliases = ", ".join(f"--{name.replace('_', '-')} ({key}{'=false' if name.startswith('no_') else ''})"
                        for name, key in FLAG_KEYS.items())
    ap = argparse.ArgumentParser(
        prog="python -m evaluation", usage="python -m evaluation RUN_DIR [key=value ...] [--dry-run] [--print-config]",
        description="Evaluate a finished pretraining run's encoder in one command: weighted kNN, a linear probe "
                    "on the cached\nfrozen features and, optionally, a short fine-tune; results merged into "
                    "RUN_DIR/evaluation.json.", formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="settings, as key=value after RUN_DIR (key=default  meaning; knn=false, probe=false and finetune=N are "
               "short\nfor knn.enabled=false, probe.enabled=false and finetune.epochs=N):\n"
               + keys_help(EvaluationConfig)
               + "\n\n" + textwrap.fill("the --flags of earlier versions are aliases of keys (a key=value given "
                                         "too wins): " + aliases + ", --finetune-set KEY=VALUE (adds to "
                                         "finetune.overrides)", width=100, subsequent_indent="  ",
                                         break_on_hyphens=False)
               + "\n\nexamples:\n  python -m evaluation runs/demo\n"
                 "  python -m evaluation runs/demo data=/data/imagenette knn.k=10 probe=false\n"
                 "  python -m evaluation runs/demo finetune.epochs=5 finetune.overrides=[train.batch_size=128]")
    ap.add_argument("items", nargs="*", metavar="RUN_DIR [key=value ...]",
                    help="a finished pretraining run directory (holds encoder.pth), then key=value settings")
    for name in FLAG_KEYS:
        flag = "--" + name.replace("_", "-")
        if name.startswith("no_"):
            ap.add_argument(flag, dest=name, action="store_const", const=True, default=None,
                            help=argparse.SUPPRESS)
        else:
            ap.add_argument(flag, dest=name, default=None, help=argparse.SUPPRESS,
                            type={"finetune_epochs": float, "k": int, "temperature": float, "probe_epochs": int,
                                  "batch_size": int, "workers": int}.get(name, str))
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved settings (defaults, aliases and key=value) as YAML and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="check encoder.pth and the data folders, print what would be done and exit (no features "
                         "are extracted, nothing is written)")
    args = ap.parse_intermixed_args(argv)
    dirs = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if len(dirs) != 1:
        ap.error("give one run directory" + (f", got {len(dirs)}: {' '.join(dirs)}" if dirs else "")
                 + "; settings are key=value (e.g. knn.k=10)")
    run_dir = dirs[0]
    flags = {name: getattr(args, name) for name in FLAG_KEYS if getattr(args, name) is not None}
    res: dict = {}
    cfg_box: List[EvaluationConfig] = []

    def settings() -> EvaluationConfig:
        cfg = evaluation_config(overrides, flags, args.finetune_set)
        cfg_box.append(cfg)
        return cfg

    if args.print_config:
        def show() -> None:
            print(yaml.safe_dump(to_dict(settings()), sort_keys=False), end="")
        return run_cli(show)
    if args.dry_run:
        def dry() -> None:
            c = settings()
            lines = check_evaluation(run_dir, c.data, c.knn.enabled, c.probe.enabled, c.finetune.epochs, c.feature)
            print("\n".join([*lines, "dry run: the encoder and the data check out; nothing was extracted or written"]))
        return run_cli(dry)

    def main_() -> None:
        c = settings()
        res.update(evaluate_run(run_dir, c.data, c.knn.enabled, c.probe.enabled, c.finetune.epochs,
                                c.finetune.overrides, c.finetune.config, c.knn.k, c.knn.temperature, c.feature,
                                c.batch_size, c.num_workers, c.probe.epochs, c.device, c.crop_pct, log=_say))

    signals = StopSignals().install()      # SIGTERM too stops without a traceback (exit 143)
    try:
        rc = run_cli(main_)
    finally:
        signals.restore()
    if rc:
        return rc
    c = cfg_box[0]
    done = [k for k, on in (("knn", c.knn.enabled), ("probe", c.probe.enabled), ("finetune", c.finetune.epochs > 0))
            if on]
    for key in done:
        if key in res:
            print(f"{key}: top-1 {res[key]['top1']:.2f}%" + (f" (best {res[key]['best_top1']:.2f}%)" if key == "finetune" else ""))
    print(f"written to {os.path.join(run_dir, 'evaluation.json')}")
    return 0
