"""``python -m pretrain --config CONFIG [key=value ...]``: MAE pretraining with a curriculum, in
one process (or one torchrun job) from the first stage to the last."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from efficienttrain.curriculum import Plan, get_curriculum
from efficienttrain.replay import buffer_bytes
from engine.checkpoint import atomic_save
from engine.config import ConfigError, to_dict
from engine.data import open_image_source
from engine.demo_data import demo_dataset_exists, demo_dataset_status, demo_notice, generate_demo_dataset
from engine.flops import log_planned_savings
from engine.progressive import GrowthController
from engine.run import Run, RunOptions, cli_main
from engine.speed import nothing_planned, times
from engine.trainer import CurriculumTrainer, check_plan_fits

from .config import PretrainConfig
from .flops import mae_builder
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


def run(cfg: PretrainConfig, run_name: str = "pretrain", opts: Optional[RunOptions] = None) -> Dict:
    """Pretrain as ``cfg`` says. Everything a user can get wrong is checked before the data folder
    is scanned: the curriculum and its sizes, how every stage's batch splits, the checkpoint to
    resume and whether its settings match."""
    t = cfg.train
    cur = get_curriculum(cfg.curriculum.name, cfg.model.img_size, cfg.curriculum.multiple_of or cfg.model.patch)
    odd = sorted({s.size for s in cur.stages if s.size % cfg.model.patch})
    if odd:
        raise ConfigError(f"curriculum {cur.name!r} has input sizes {odd} that are not multiples of the patch size "
                          f"{cfg.model.patch} (model.patch_size); set curriculum.multiple_of to a multiple of "
                          f"{cfg.model.patch} (or leave it unset: the patch size)")
    knn = cfg.eval.knn                  # "{data.path}" in the kNN folders: the data root of this run (the demo's)
    knn.train, knn.val = (p.replace("{data.path}", cfg.data.path) for p in (knn.train, knn.val))
    with Run(cfg, run_name, opts) as r:
        dist, log = r.dist, r.log
        if not cfg.growth.enabled:           # growth sets its own sizes per step
            cur = t.stage_accumulation(cur, dist.world_size, cfg.data.replay_chunks)
        check_plan_fits(cur.plan(cfg.curriculum.epochs, 1, t.batch_size, t.accum_steps), dist.world_size,
                        cfg.data.replay_chunks)
        r.find_resume(to_dict(cfg))
        d = cfg.data
        if d.demo and not r.demo_data_ready(
                lambda: demo_dataset_exists(d.path), lambda: generate_demo_dataset(d.path, d.demo_images), d.path,
                check=lambda: demo_dataset_status(d.path, d.demo_images),
                notice=lambda verdict: demo_notice(d.path, verdict, d.demo_images, dry_run=True)):
            return {"dry_run": True, "run_dir": r.dir}
        data_path = os.path.join(cfg.data.path, "train") if cfg.data.demo else cfg.data.path
        source = open_image_source(data_path)
        plan = cur.plan(cfg.curriculum.epochs, len(source), t.batch_size, t.accum_steps)
        r.check_plan(plan)
        baseline = cfg.curriculum.baseline_epochs or cfg.curriculum.epochs
        model = create_mae(cfg.model.arch, **cfg.model.overrides())
        growth = None
        if cfg.growth.enabled:            # the encoder's depth and input size grow; the decoder stays
            growth = GrowthController(cfg.growth, model, final_size=cfg.model.img_size, patch_size=cfg.model.patch,
                                      epochs=cfg.curriculum.epochs, embed_dim=model.cls_token.shape[-1], seed=t.seed,
                                      log=log)
            cur = growth.curriculum(cur.stages[-1].magnitude)
            plan = cur.plan(cfg.curriculum.epochs, len(source), t.batch_size, t.accum_steps)
            r.check_plan(plan)
            log(growth.describe())
            log(growth.plan_line("encoder"))
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        planned = cur.speedup(cfg.curriculum.epochs, baseline)
        log(f"MAE {cfg.model.arch} ({n_params:.1f}M params, target {cfg.model.target}), {source.describe()}, "
            f"curriculum {cur.name} ({cur.budget} budget {cfg.curriculum.epochs:g}"
            + ("" if nothing_planned(planned) else
               f", {times(planned, 'compute')} than {baseline:g} epochs at {cur.final_size}")
            + f"), {dist.world_size} process(es) on {dist.device}")
        savings = (log_planned_savings(mae_builder(cfg.model), cur, cfg.curriculum.epochs, baseline, log,
                                       f"MAE {cfg.model.arch}") if dist.is_main and growth is None else None)
        log(curriculum_table(plan, cfg.model.patch, t.base_lr(), t.warmup_epochs, t.min_lr, dist.world_size))
        if r.opts.dry_run:
            log("dry run: the config, curriculum, data and checkpoints check out; nothing was trained or written")
            return {"dry_run": True, "total_steps": plan.total_steps, "run_dir": r.dir}
        from .task import MAETask

        task = MAETask(cfg, source, dist)
        if growth is not None:
            growth.attach(task, task.subset_loss)
        log(f"decode on {task.decode_description}")
        r.write_files(cur, plan, savings)
        trainer = CurriculumTrainer(t, model, task, plan, dist, r.dir, to_dict(cfg), len(source),
                                    baseline_epochs=baseline, resume=r.resume, signals=r.signals,
                                    flops_ratio=(savings or {}).get("flops_ratio"))
        r.resume = None                 # the trainer holds it now; free the loaded tensors with it
        result = trainer.fit()
        if dist.is_main and result["step"] > 0 and (result["trained_steps"] or not os.path.isfile(
                os.path.join(r.dir, "encoder.pth"))):
            path = export_encoder(trainer.state_dict(), os.path.join(r.dir, "encoder.pth"))
            partial = "" if result["step"] == plan.total_steps else " (a partial run: train.max_steps)"
            log(f"encoder of step {result['step']}/{plan.total_steps} exported to {path}{partial}")
        if growth is not None:
            log(growth.result_lines(result["speed"], "encoder"))
        if result["trained_steps"]:
            log(f"done: step {result['step']}/{plan.total_steps}, last loss {result['loss']:.4f}, "
                f"{result['bad_samples']} unreadable image(s) skipped")
        else:
            log(f"nothing to train: the run is at step {result['step']}/{plan.total_steps}"
                + ("" if result["step"] == plan.total_steps else f" and train.max_steps={t.max_steps}"))
        log(f"run directory: {r.dir}")
        return {**result, "run_dir": r.dir}


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main("python -m pretrain", " ".join(__doc__.split("\n\n")[0].split()), PretrainConfig, run, "pretrain",
                    "YAML config (see configs/pretrain/)", "key.sub=value overrides, e.g. train.batch_size=256", argv)
