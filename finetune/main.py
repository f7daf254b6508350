"""``python -m finetune --config CONFIG [key=value ...]``: MAE fine-tuning, linear probing,
supervised training with a curriculum (mode=train) and evaluation, on the shared training core."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from efficienttrain.curriculum import get_curriculum
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, to_dict
from engine.data import EvalDataset, check_same_classes, eval_transform, image_folder
from engine.distributed import DistInfo, barrier, cleanup
from engine.optim import describe_groups, param_groups_layer_decay
from engine.run import cli_main, start_run, write_run_files
from engine.trainer import CurriculumTrainer

from .config import FinetuneConfig
from .models import classifier_depth, create_classifier, init_head, load_pretrained, make_linear_probe
from .task import ClassificationTask, evaluate


def build_optimizer(cfg: FinetuneConfig, model: nn.Module, dist: DistInfo) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (ViTs) and no decay on norms/biases/tokens, or LARS for probes."""
    t = cfg.train
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = classifier_depth(model)
    decay = cfg.model.layer_decay if depth and cfg.mode != "linprobe" else 1.0
    groups = param_groups_layer_decay(model.named_parameters(), depth, t.weight_decay, decay, skip)
    if cfg.optimizer == "lars":
        from timm.optim import Lars

        for g in groups:   # as MAE's LARS: no trust-ratio adaptation (and no decay) for 1-D parameters
            g["always_adapt"] = g["weight_decay"] > 0 or any(p.ndim > 1 for p in g["params"])
        return Lars(groups, lr=t.base_lr(), momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.base_lr(), betas=tuple(t.betas),
                             **({"fused": True} if dist.device.type == "cuda" else {}))


def build_model(cfg: FinetuneConfig, log) -> nn.Module:
    m = cfg.model
    model = create_classifier(m, dynamic_size=cfg.mode == "train")
    if cfg.mode in ("finetune", "linprobe") or (cfg.mode == "train" and m.checkpoint):
        report = load_pretrained(model, m.checkpoint)
        log(f"loaded {m.checkpoint}: {report.summary()}")
        if cfg.mode == "finetune" and "head.weight" in report.initialised:
            init_head(model, std=2e-5)
    if cfg.mode == "linprobe":
        make_linear_probe(model)
    return model


def run(cfg: FinetuneConfig, run_name: str = "finetune") -> Dict:
    dist, log, run_dir = start_run(cfg, run_name)
    try:
        d = cfg.data
        if d.demo and dist.is_main:
            from pretrain.demo_data import generate_demo_dataset

            generate_demo_dataset(d.path)   # no-op when it is already there
        barrier(dist)
        val_files, val_labels, classes = image_folder(os.path.join(d.path, d.val_dir))
        if len(classes) != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but {d.path}/{d.val_dir} has "
                              f"{len(classes)} classes; set model.num_classes={len(classes)}")
        if cfg.mode == "eval":
            return run_eval(cfg, dist, val_files, val_labels, log)
        train_files, train_labels, train_classes = image_folder(os.path.join(d.path, d.train_dir))
        check_same_classes(train_classes, classes, os.path.join(d.path, d.train_dir), os.path.join(d.path, d.val_dir))
        model = build_model(cfg, log)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        multiple = cfg.curriculum.multiple_of or (patch[0] if patch else 32)
        cur = get_curriculum(cfg.curriculum.name, cfg.model.img_size, multiple)
        if cfg.mode != "train" and len({s.size for s in cur.stages}) > 1:
            raise ConfigError(f"mode {cfg.mode} trains at the final size; curriculum {cur.name!r} changes it "
                              "(use curriculum.name=baseline, or mode=train for curriculum training)")
        plan = cur.plan(cfg.curriculum.epochs, len(train_files), cfg.train.batch_size, cfg.train.accum_steps)
        optimizer = build_optimizer(cfg, model, dist)
        if dist.is_main:
            write_run_files(cfg, cur, plan, run_dir)
            groups = describe_groups(optimizer.param_groups)
            with open(os.path.join(run_dir, "param_groups.txt"), "w") as f:
                f.write(groups + "\n")
            log(f"{cfg.mode}: {cfg.model.name} on {len(train_files)} images / {len(classes)} classes, "
                f"curriculum {cur.name} ({plan.total_steps} steps), lr {cfg.train.base_lr():.3g}; parameter groups:\n{groups}")
        task = ClassificationTask(cfg, train_files, train_labels, val_files, val_labels, dist)
        trainer = CurriculumTrainer(cfg.train, model, task, plan, dist, run_dir, to_dict(cfg), len(train_files),
                                    optimizer=optimizer,
                                    baseline_epochs=cfg.curriculum.baseline_epochs or cfg.curriculum.epochs)
        result = trainer.fit()
        if dist.is_main:
            ev = result.get("eval") or {}
            log(f"validation at {cfg.model.img_size}px: top-1 {ev.get('top1', float('nan')):.2f}% "
                f"top-5 {ev.get('top5', float('nan')):.2f}% (best top-1 {result['best'] or float('nan'):.2f}%, "
                f"chance {100.0 / len(classes):.1f}%)")
            log(f"run directory: {run_dir}")
        return {**result, "run_dir": run_dir, "num_classes": len(classes)}
    finally:
        cleanup(dist)


def run_eval(cfg: FinetuneConfig, dist: DistInfo, files: List[str], labels: List[int], log) -> Dict:
    """Evaluate a fine-tuned / probed checkpoint at the final size (resize + centre crop)."""
    model = create_classifier(cfg.model)
    ckpt = load_checkpoint(cfg.model.checkpoint)
    if ckpt.get("meta", {}).get("linear_probe"):
        make_linear_probe(model)
    model.load_state_dict(ckpt.get("model", ckpt), strict=True)
    model.to(dist.device)
    ds = EvalDataset(files, labels, eval_transform(cfg.model.img_size, cfg.data.crop_pct))
    loader = torch.utils.data.DataLoader(ds, batch_size=min(256, cfg.train.batch_size), num_workers=cfg.data.num_workers)
    metrics = evaluate(model, loader, dist.device)
    log(f"eval {cfg.model.checkpoint}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
        f"loss {metrics['loss']:.4f} ({len(files)} images)")
    return {"eval": metrics}


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main("python -m finetune", __doc__.splitlines()[0], FinetuneConfig, run, "finetune",
                    "YAML config (see configs/finetune/)", "key.sub=value overrides, e.g. mode=eval model.checkpoint=...",
                    argv, user_errors=(ValueError,))
