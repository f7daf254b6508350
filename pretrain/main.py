"""``python -m pretrain --config CONFIG [key=value ...]``: MAE pretraining with a curriculum, in
one process (or one torchrun job) from the first stage to the last."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from efficienttrain.curriculum import Plan, get_curriculum
from efficienttrain.replay import buffer_bytes
from engine.checkpoint import atomic_save
from engine.config import to_dict
from engine.data import open_image_source
from engine.distributed import barrier, cleanup
from engine.run import cli_main, start_run, write_run_files
from engine.trainer import CurriculumTrainer

from .config import PretrainConfig
from .demo_data import generate_demo_dataset
from .models_mae import create_mae

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state_dict(model_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder part of an MAE state dict, in the official layout (what MAE's released
    pretrained files hold): no decoder, no mask token."""
    return {k: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIXES)}


def export_encoder(checkpoint: Dict, path: str) -> str:
    """Write ``{"model": encoder state dict, "meta": ...}`` for fine-tuning and detection."""
    atomic_save({"model": encoder_state_dict(checkpoint["model"]), "meta": checkpoint.get("meta", {})}, path)
    return path


def curriculum_table(plan: Plan, patch: int, base_lr: float, warmup_epochs: float, min_lr: float,
                     world_size: int = 1) -> str:
    """The plan as a table; replay stages show their buffer's memory per process (stage-size
    float16 images, as the official replay stores them)."""
    lines = [f"{'stage':>5} {'size':>5} {'grid':>6} {'batch x acc':>12} {'replay':>6} {'data ep':>8} "
             f"{'steps':>7} {'lr range':>21} {'buffer/proc':>11}"]
    for ps in plan.stages:
        lr0 = plan.lr(ps.start_step, base_lr, warmup_epochs, min_lr)
        lr1 = plan.lr(ps.end_step - 1, base_lr, warmup_epochs, min_lr)
        g = ps.stage.size // patch
        buf = ""
        if ps.stage.replay_times > 1:
            mem = buffer_bytes(ps.stage.replay_buffer, ps.loader_batch_size // world_size, (3, ps.stage.size, ps.stage.size))
            buf = f"{mem / 2 ** 30:.2f} GiB"
        lines.append(f"{ps.index:>5} {ps.stage.size:>5} {f'{g}x{g}':>6} {f'{ps.batch_size} x {ps.accum_steps}':>12} "
                     f"{ps.stage.replay_times:>6} {ps.data_epochs:>8.2f} {ps.steps:>7} {f'{lr0:.2e}->{lr1:.2e}':>21} "
                     f"{buf:>11}")
    lines.append(f"total: {plan.total_steps} optimizer steps, "
                 f"{sum(p.data_epochs for p in plan.stages):.2f} data epochs over {plan.dataset_size} images")
    return "\n".join(lines)


def run(cfg: PretrainConfig, run_name: str = "pretrain") -> Dict:
    dist, log, run_dir = start_run(cfg, run_name)
    knn = cfg.eval.knn                  # "{data.path}" in the kNN folders: the data root of this run (the demo's)
    knn.train, knn.val = (p.replace("{data.path}", cfg.data.path) for p in (knn.train, knn.val))
    try:
        if cfg.data.demo and dist.is_main:
            generate_demo_dataset(cfg.data.path, cfg.data.demo_images)   # no-op when it is already there
        barrier(dist)
        data_path = os.path.join(cfg.data.path, "train") if cfg.data.demo else cfg.data.path
        source = open_image_source(data_path)
        model = create_mae(cfg.model.arch, **cfg.model.overrides())
        cur = get_curriculum(cfg.curriculum.name, cfg.model.img_size, cfg.curriculum.multiple_of or cfg.model.patch)
        plan = cur.plan(cfg.curriculum.epochs, len(source), cfg.train.batch_size, cfg.train.accum_steps)
        t = cfg.train
        baseline = cfg.curriculum.baseline_epochs or cfg.curriculum.epochs
        from .task import MAETask

        task = MAETask(cfg, source, dist)
        if dist.is_main:
            write_run_files(cfg, cur, plan, run_dir)
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            log(f"MAE {cfg.model.arch} ({n_params:.1f}M params, target {cfg.model.target}), {source.describe()}, "
                f"curriculum {cur.name} ({cur.budget} budget {cfg.curriculum.epochs:g}, "
                f"{cur.speedup(cfg.curriculum.epochs, baseline):.2f}x less compute than {baseline:g} epochs at "
                f"{cur.final_size}), "
                f"{dist.world_size} process(es) on {dist.device}, decode on {task.decode}")
            log(curriculum_table(plan, cfg.model.patch, t.base_lr(), t.warmup_epochs, t.min_lr,
                                 dist.world_size))
        trainer = CurriculumTrainer(t, model, task, plan, dist, run_dir, to_dict(cfg), len(source),
                                    baseline_epochs=baseline)
        result = trainer.fit()
        if dist.is_main and result["step"] == plan.total_steps:
            path = export_encoder(trainer.state_dict(), os.path.join(run_dir, "encoder.pth"))
            log(f"encoder exported to {path}")
        if dist.is_main:
            log(f"done: step {result['step']}/{plan.total_steps}, last loss {result['loss']:.4f}, "
                f"{result['bad_samples']} unreadable image(s) skipped")
            log(f"run directory: {run_dir}")
        return {**result, "run_dir": run_dir}
    finally:
        cleanup(dist)


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main("python -m pretrain", __doc__.splitlines()[0], PretrainConfig, run, "pretrain",
                    "YAML config (see configs/pretrain/)", "key.sub=value overrides, e.g. train.batch_size=256", argv)
