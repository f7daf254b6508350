"""``python -m finetune --config CONFIG [key=value ...]``: MAE fine-tuning, linear probing,
supervised training with a curriculum (mode=train) and evaluation, on the shared training core."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from efficienttrain.curriculum import get_curriculum
from efficienttrain.replay import check_replay_memory
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import ConfigError, to_dict
from engine.data import EvalDataset, check_same_classes, eval_transform, image_folder
from engine.demo_data import (DEFAULT_IMAGES, demo_dataset_exists, demo_dataset_status, demo_notice,
                              generate_demo_dataset)
from engine.distributed import DistInfo
from engine.flops import log_planned_savings
from engine.optim import describe_groups, param_groups_layer_decay
from engine.progressive import GrowthController
from engine.run import Run, RunOptions, cli_main
from engine.trainer import CurriculumTrainer, check_plan_fits

from .config import FinetuneConfig
from .flops import classifier_builder
from .models import (classifier_depth, create_classifier, init_head, load_pretrained, make_linear_probe,
                     resolve_architecture)
from .resize import is_swin
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
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # timm's Lamb is the implementation the official code ships (lamb.py): global gradient-norm
        # clipping at 1.0 inside the step, trust ratio on decayed parameters
        return Lamb(groups, lr=t.base_lr(), betas=tuple(t.betas), eps=cfg.opt_eps, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.base_lr(), betas=tuple(t.betas), eps=cfg.opt_eps,
                             **({"fused": True} if dist.device.type == "cuda" else {}))


def build_model(cfg: FinetuneConfig, log, ckpt: Optional[Dict] = None) -> nn.Module:
    m = cfg.model
    model = create_classifier(m, dynamic_size=cfg.mode == "train")
    if cfg.mode in ("finetune", "linprobe") or (cfg.mode == "train" and m.checkpoint):
        report = load_pretrained(model, m.checkpoint, ckpt)
        log(f"loaded {m.checkpoint}: {report.summary()}")
        if cfg.mode == "finetune" and "head.weight" in report.initialised:
            init_head(model, std=2e-5)
    if cfg.mode == "linprobe":
        make_linear_probe(model)
    return model


def run(cfg: FinetuneConfig, run_name: str = "finetune", opts: Optional[RunOptions] = None) -> Dict:
    """Fine-tune, probe, train or evaluate as ``cfg`` says. The checkpoint, the architecture it
    records, the model, the curriculum, the batch splits and the resume checkpoint are checked
    before the data folders are scanned."""
    t, d = cfg.train, cfg.data
    with Run(cfg, run_name, opts) as r:
        dist, log = r.dist, r.log
        ckpt = load_checkpoint(cfg.model.checkpoint, "model.checkpoint") if cfg.model.checkpoint else None
        taken = resolve_architecture(cfg.model, ckpt)
        if taken:
            log(f"architecture {taken}")
        for line in getattr(cfg, "recipe_report", []):
            log(line)
        if cfg.mode == "eval":
            return run_eval(cfg, r, ckpt)
        model = build_model(cfg, log, ckpt)
        del ckpt
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        swin_official = cfg.model.resize == "official" and is_swin(model)
        # Swin's official windows are img_size // 32: every stage size must be a multiple of 32
        multiple = cfg.curriculum.multiple_of or (32 if swin_official or not patch else patch[0])
        cur = get_curriculum(cfg.curriculum.name, cfg.model.img_size, multiple)
        growth = make_growth(cfg, model, cur, log) if cfg.growth.enabled else None
        if growth is not None:
            cur = growth.curriculum(cur.stages[-1].magnitude)
        else:
            cur = t.stage_accumulation(cur, dist.world_size, d.replay_chunks)
        odd = sorted({s.size for s in cur.stages if swin_official and s.size % 32})
        if odd:
            raise ConfigError(f"curriculum {cur.name!r} gives Swin the input sizes {odd}, which are not multiples of "
                              "32; model.resize=official sets windows of size // 32 and needs them: set "
                              "curriculum.multiple_of=32 (the default for Swin), or model.resize=forward")
        if cfg.mode != "train" and len({s.size for s in cur.stages}) > 1:
            raise ConfigError(f"mode {cfg.mode} trains at the final size; curriculum {cur.name!r} changes it "
                              "(use curriculum.name=baseline, or mode=train for curriculum training)")
        nominal = cur.plan(cfg.curriculum.epochs, 1, t.batch_size, t.accum_steps)
        check_plan_fits(nominal, dist.world_size, 1)
        if d.mixup > 0 or d.cutmix > 0:
            odd = [ps.index for ps in nominal.stages if ps.loader_batch_size // (dist.world_size * ps.accum_steps) % 2]
            if odd:
                raise ConfigError(f"data.mixup / data.cutmix mix pairs of samples and need an even per-process "
                                  f"micro-batch; stage(s) {odd} of this run have an odd one: choose train.batch_size "
                                  "(or train.per_gpu_batch_size) so that it is even (train.accum_by_stage=false keeps the "
                                  "accumulation of every stage), or set data.mixup=0 data.cutmix=0")
        r.find_resume(to_dict(cfg))
        # any demo set there will do (the pretraining demo's)
        if d.demo and not r.demo_data_ready(
                lambda: demo_dataset_exists(d.path), lambda: generate_demo_dataset(d.path, reuse_any=True), d.path,
                check=lambda: demo_dataset_status(d.path, reuse_any=True),
                notice=lambda verdict: demo_notice(d.path, verdict, DEFAULT_IMAGES, dry_run=True)):
            return {"dry_run": True, "run_dir": r.dir}
        val_files, val_labels, classes = image_folder(os.path.join(d.path, d.val_dir), "data.path + data.val_dir")
        check_num_classes(cfg, classes)
        train_files, train_labels, train_classes = image_folder(os.path.join(d.path, d.train_dir),
                                                                "data.path + data.train_dir")
        check_same_classes(train_classes, classes, os.path.join(d.path, d.train_dir), os.path.join(d.path, d.val_dir))
        plan = cur.plan(cfg.curriculum.epochs, len(train_files), t.batch_size, t.accum_steps)
        r.check_plan(plan)
        model_kw = f" {cfg.model.kwargs}" if cfg.model.kwargs else ""     # e.g. a ViT-Tiny built from vit_base's entry
        log(f"{cfg.mode}: {cfg.model.name}{model_kw} at {cfg.model.img_size}px on {len(train_files)} images / {len(classes)} "
            f"classes, curriculum {cur.name} ({plan.total_steps} steps), lr {t.base_lr():.3g}")
        savings = (log_planned_savings(classifier_builder(cfg.model), cur, cfg.curriculum.epochs,
                                       cfg.curriculum.baseline_epochs or cfg.curriculum.epochs, log, cfg.model.name)
                   if dist.is_main and growth is None else None)   # the pixel plan beside the model's FLOPs
        replay_bytes = check_replay_memory(plan, dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)),
                                           ClassificationTask.replay_sample_bytes)
        if r.opts.dry_run:
            log("\n".join(f"stage {row['stage']}: size {row['size']}, steps {row['start_step']}-{row['end_step']}"
                          + (f", replay {row['replay_times']} (buffer {replay_bytes[row['stage']] / 2 ** 30:.2f} GiB "
                             "per process when full)" if row['stage'] in replay_bytes else "")
                          for row in plan.rows()))
            log("dry run: the config, checkpoint, curriculum and data check out; nothing was trained or written")
            return {"dry_run": True, "total_steps": plan.total_steps, "run_dir": r.dir}
        optimizer = build_optimizer(cfg, model, dist)
        r.write_files(cur, plan, savings)
        if dist.is_main:
            groups = describe_groups(optimizer.param_groups)
            with open(os.path.join(r.dir, "param_groups.txt"), "w") as f:
                f.write(groups + "\n")
            log(f"parameter groups:\n{groups}")
        task = ClassificationTask(cfg, train_files, train_labels, val_files, val_labels, dist)
        if growth is not None:
            growth.attach(task, task.subset_loss)
        trainer = CurriculumTrainer(t, model, task, plan, dist, r.dir, to_dict(cfg), len(train_files),
                                    optimizer=optimizer, resume=r.resume, signals=r.signals,
                                    flops_ratio=(savings or {}).get("flops_ratio"),
                                    baseline_epochs=cfg.curriculum.baseline_epochs or cfg.curriculum.epochs)
        r.resume = None
        result = trainer.fit()
        ev = result.get("eval") or {}
        part = f" (first {cfg.eval.max_batches} batch(es) per process: eval.max_batches)" if cfg.eval.max_batches else ""
        log(f"validation at {task._eval_size()}px{part}: top-1 {ev.get('top1', float('nan')):.2f}% "
            f"top-5 {ev.get('top5', float('nan')):.2f}% (best top-1 {result['best'] or float('nan'):.2f}%, "
            f"chance {100.0 / len(classes):.1f}%)")
        if growth is not None:
            log(growth.result_lines(result.get("speed") or {}))
        if result.get("best_ema") is not None:
            log(f"EMA of weights: best top-1 {result['best_ema']:.2f}% (checkpoints/checkpoint-best-ema.pth)")
        log(f"run directory: {r.dir}")
        return {**result, "run_dir": r.dir, "num_classes": len(classes)}


def make_growth(cfg: FinetuneConfig, model: nn.Module, cur, log) -> GrowthController:
    """The growth controller of a timm ViT (``growth.schedule``); logs the space and the plan."""
    if not (isinstance(getattr(model, "blocks", None), nn.Sequential) and hasattr(model, "patch_embed")
            and getattr(model, "dynamic_img_size", False)):
        raise ConfigError(f"growth.schedule={cfg.growth.schedule} grows a timm VisionTransformer (blocks, patch "
                          f"embedding, dynamic input size); model.name={cfg.model.name} is not one (e.g. use "
                          "deit_tiny_patch16_224 or vit_small_patch16_224)")
    growth = GrowthController(cfg.growth, model, final_size=cfg.model.img_size,
                              patch_size=model.patch_embed.patch_size[0], epochs=cfg.curriculum.epochs,
                              embed_dim=model.embed_dim, drop_path=cfg.model.drop_path or 0.0,
                              seed=cfg.train.seed, log=log)
    log(growth.describe())
    log(growth.plan_line())
    return growth


def check_num_classes(cfg: FinetuneConfig, classes: List[str]) -> None:
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but {cfg.data.path}/{cfg.data.val_dir} has "
                          f"{len(classes)} classes; set model.num_classes={len(classes)}")


def run_eval(cfg: FinetuneConfig, r: Run, ckpt: Dict) -> Dict:
    """Evaluate a fine-tuned / probed checkpoint at the final size (resize + centre crop)."""
    model = create_classifier(cfg.model)
    if ckpt.get("meta", {}).get("linear_probe"):
        make_linear_probe(model)
    param_size = (ckpt.get("meta") or {}).get("param_size")
    if param_size and param_size != cfg.model.img_size:
        raise CheckpointError(f"model.checkpoint {cfg.model.checkpoint!r} was written in a {param_size}px stage "
                              f"(model.resize=official: its parameters have that stage's shapes), not at the final "
                              f"{cfg.model.img_size}px; evaluate checkpoint-best.pth or a checkpoint-latest.pth of a "
                              "finished run")
    sd, own = ckpt.get("model", ckpt), model.state_dict()
    problems = ([f"missing {k}" for k in own if k not in sd] + [f"unexpected {k}" for k in sd if k not in own]
                + [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
                   if k in own and hasattr(v, "shape") and v.shape != own[k].shape])
    if problems:
        hint = (f"; the head does not match model.num_classes={cfg.model.num_classes}"
                if any(p.startswith("head.") for p in problems) else "")
        raise CheckpointError(f"model.checkpoint {cfg.model.checkpoint!r} does not fit {cfg.model.name} (mode=eval "
                              f"loads a fine-tuned or probed checkpoint strictly): {'; '.join(problems[:5])}"
                              f"{f' ... ({len(problems)} problems)' if len(problems) > 5 else ''}{hint}")
    model.load_state_dict(sd, strict=True)
    files, labels, classes = image_folder(os.path.join(cfg.data.path, cfg.data.val_dir), "data.path + data.val_dir")
    check_num_classes(cfg, classes)
    model.to(r.dist.device)
    ds = EvalDataset(files, labels, eval_transform(cfg.model.img_size, cfg.data.crop_pct))
    loader = torch.utils.data.DataLoader(ds, batch_size=min(256, cfg.train.batch_size), num_workers=cfg.data.num_workers)
    if r.opts.dry_run:
        r.log(f"dry run: would evaluate {cfg.model.checkpoint} on {len(files)} images")
        return {"dry_run": True}
    metrics = evaluate(model, loader, r.dist.device, max_batches=cfg.eval.max_batches)
    n = len(files) if cfg.eval.max_batches is None else min(len(files), cfg.eval.max_batches * loader.batch_size)
    part = f" of {len(files)}, eval.max_batches={cfg.eval.max_batches}" if n < len(files) else ""
    r.log(f"eval {cfg.model.checkpoint}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
          f"loss {metrics['loss']:.4f} ({n} images{part})")
    return {"eval": metrics}


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main("python -m finetune", " ".join(__doc__.split("\n\n")[0].split()), FinetuneConfig, run, "finetune",
                    "YAML config (see configs/finetune/)", "key.sub=value overrides, e.g. mode=eval model.checkpoint=...",
                    argv)
