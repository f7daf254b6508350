"""``python -m evaluation RUN_DIR``: evaluate a finished pretraining run in one command.

Reads the run's ``encoder.pth`` and, on a labelled ImageFolder pair (``--data ROOT`` with
``ROOT/train`` and ``ROOT/val``, or the run's own ``eval.knn`` folders), extracts the frozen
features once (evaluation transform at the pretraining size) and reports:

- ``knn``: the weighted kNN rule (:mod:`evaluation.knn`);
- ``probe``: a linear probe on the cached features (:mod:`evaluation.probe`);
- ``finetune`` (``--finetune-epochs N``): a short MAE-recipe fine-tune, a ``python -m finetune``
  process with its own run directory ``RUN_DIR/eval_finetune/<settings hash>`` (resumed if interrupted), final
  and best top-1.

The numbers are merged into ``RUN_DIR/evaluation.json`` (so evaluations can be added later).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from engine.checkpoint import atomic_write_json, load_checkpoint
from engine.config import ConfigError, load_config, save_config
from engine.data import EvalDataset, check_same_classes, eval_transform, image_folder
from engine.distributed import DistInfo, resolve_device
from engine.errors import RunFailed, run_cli
from engine.stops import RunLock, StopSignals, run_child

from .knn import extract_features, knn_accuracy
from .probe import linear_probe

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


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
        raise ConfigError(f"no labelled data to evaluate {run_dir} on: pass --data ROOT (ROOT/train and ROOT/val, "
                          "ImageFolder layout) or pretrain with eval.knn.train / eval.knn.val")
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
            f"train.output_dir={out}", "train.progress=false"]
    return load_config(FinetuneConfig, config, [*base, *overrides])


def _inputs(run_dir: str, data: Optional[str], feature: str) -> Tuple[str, str, str]:
    """(encoder.pth, train folder, val folder), checked: what an evaluation and its dry run check first."""
    encoder = os.path.join(run_dir, "encoder.pth")
    if not os.path.isfile(encoder):
        raise FileNotFoundError(f"{encoder} does not exist: the run has not finished (the encoder is exported "
                                "at its last step); finish it by running the same pretraining command again")
    if feature not in ("cls", "avgpool"):
        raise ConfigError(f"feature: {feature!r} is not allowed; allowed: cls, avgpool")
    return (encoder, *data_folders(run_dir, data))


def evaluate_run(run_dir: str, data: Optional[str] = None, knn: bool = True, probe: bool = True,
                 finetune_epochs: float = 0, finetune_overrides: Sequence[str] = (),
                 finetune_config_path: Optional[str] = None, k: int = 20,
                 temperature: float = 0.07, feature: str = "cls", batch_size: int = 256, num_workers: int = 0,
                 probe_epochs: int = 100, device: str = "auto", crop_pct: float = 0.875,
                 launcher: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluate ``run_dir``'s encoder; returns (and writes into evaluation.json) the results. The
    fine-tune runs as its own ``python -m finetune`` process, behind ``launcher`` (default: this
    Python; e.g. ``[python, -m, torch.distributed.run, --nproc_per_node, 8]``)."""
    encoder, train, val = _inputs(run_dir, data, feature)
    with RunLock(run_dir, "python -m evaluation"):   # evaluation.json is the run's: one writer at a time
        vit, meta = load_encoder(encoder)
        dev = resolve_device(device)
        vit.to(dev)
        results: Dict[str, Any] = {"encoder": encoder, "train": train, "val": val,
                                   "img_size": meta["model_kwargs"]["img_size"], "feature": feature}
        if knn or probe:
            train_files, train_labels, classes = image_folder(train)
            val_files, val_labels, val_classes = image_folder(val)
            check_same_classes(classes, val_classes, train, val)
            tf = eval_transform(meta["model_kwargs"]["img_size"], crop_pct)
            amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
            kw = dict(batch_size=batch_size, num_workers=num_workers, amp_dtype=amp)
            fn = pooled(vit, feature)
            ft, yt = extract_features(fn, EvalDataset(train_files, train_labels, tf), dev, **kw)
            fv, yv = extract_features(fn, EvalDataset(val_files, val_labels, tf), dev, **kw)
            if knn:
                results["knn"] = {**knn_accuracy(ft, yt, fv, yv, k, temperature, len(classes)), "k": k,
                                  "temperature": temperature}
            if probe:
                results["probe"] = {**linear_probe(ft, yt, fv, yv, len(classes), epochs=probe_epochs),
                                    "epochs": probe_epochs}
            del ft, yt, fv, yv
        vit.cpu()                                   # the fine-tune's processes get the whole device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if finetune_epochs > 0:
            results["finetune"] = _finetune(encoder, meta, train, val, finetune_epochs, run_dir, finetune_overrides,
                                            finetune_config_path, launcher)
        path = os.path.join(run_dir, "evaluation.json")
        old = {}
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                old = json.load(f)
        same = all(old.get(k) == results[k] for k in ("train", "val", "img_size", "feature"))
        merged = {**(old if same else {}), **results}     # earlier entries only if they scored the same data
        atomic_write_json(merged, path)
        return merged


def _finetune(encoder: str, meta: Dict[str, Any], train: str, val: str, epochs: float, run_dir: str,
              overrides: Sequence[str], config: Optional[str], launcher: Optional[Sequence[str]]) -> Dict[str, Any]:
    """Short fine-tune in its own process (resumable like any run); its final and best top-1."""
    settings = json.dumps([epochs, list(overrides), config, open(config).read() if config else None, train, val])
    # one folder per fine-tune setting: a changed setting is a new run, never a resumed old one
    out = os.path.join(run_dir, "eval_finetune", hashlib.sha256(settings.encode()).hexdigest()[:12])
    cfg = finetune_config(encoder, meta, train, val, epochs, out, overrides, config)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "requested.yaml")
    save_config(cfg, cfg_path)
    cmd = [*(launcher or [sys.executable]), "-m", "finetune", "--config", cfg_path]
    with open(os.path.join(out, "finetune.log"), "a", encoding="utf-8") as logf:
        rc = run_child(cmd, logf, f"the fine-tune of {encoder} (log {os.path.join(out, 'finetune.log')})")
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
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished pretraining run directory (holds encoder.pth)")
    ap.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the run's eval.knn folders)")
    ap.add_argument("--no-knn", action="store_true")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--finetune-epochs", type=float, default=0, help="also fine-tune this many epochs (0: no)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--feature", default="cls", choices=["cls", "avgpool"])
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finetune-config", help="fine-tuning YAML to start from (default: the finetune defaults)")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the fine-tuning config (repeatable), e.g. train.batch_size=128")
    ap.add_argument("--dry-run", action="store_true",
                    help="check encoder.pth and the data folders, print what would be done and exit (no features "
                         "are extracted, nothing is written)")
    args = ap.parse_args(argv)
    res: dict = {}
    if args.dry_run:
        def dry() -> None:
            lines = check_evaluation(args.run_dir, args.data, not args.no_knn, not args.no_probe,
                                     args.finetune_epochs, args.feature)
            print("\n".join([*lines, "dry run: the encoder and the data check out; nothing was extracted or written"]))
        return run_cli(dry)

    def main_() -> None:
        res.update(evaluate_run(args.run_dir, args.data, not args.no_knn, not args.no_probe, args.finetune_epochs,
                                args.finetune_set, args.finetune_config, args.k, args.temperature, args.feature,
                                args.batch_size, args.workers, args.probe_epochs, args.device))

    signals = StopSignals().install()      # SIGTERM too stops without a traceback (exit 143)
    try:
        rc = run_cli(main_)
    finally:
        signals.restore()
    if rc:
        return rc
    done = [k for k, on in (("knn", not args.no_knn), ("probe", not args.no_probe),
                            ("finetune", args.finetune_epochs > 0)) if on]
    for key in done:
        if key in res:
            print(f"{key}: top-1 {res[key]['top1']:.2f}%" + (f" (best {res[key]['best_top1']:.2f}%)" if key == "finetune" else ""))
    print(f"written to {os.path.join(args.run_dir, 'evaluation.json')}")
    return 0
