"""Image classification as a :class:`engine.trainer.Task` (MAE fine-tuning, linear probing and
supervised curriculum training share it)."""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.distributed as tdist
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from efficienttrain.curriculum import PlannedStage, StepInfo
from efficienttrain.fourier import downsample, low_frequency_crop
from engine.config import ConfigError
from engine.data import EvalDataset, Normalizer, check_shared_memory, eval_transform
from engine.distributed import DistInfo
from engine.progressive import search_subset, shrink_input, subset_line
from engine.stops import ignore_stop_signals
from engine.trainer import Prepared, RunBatches

from .config import FinetuneConfig
from .data import CurriculumTrainDataset, collate_train
from .models import check_resizable
from .resize import current_size, handles, move_optimizer_state, prepare_for_size


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dist: Optional[DistInfo] = None,
             transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             max_batches: Optional[int] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over ``loader`` (its first ``max_batches`` per
    rank, when set), summed across ranks."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)   # correct1, correct5, loss sum, count
    try:
        for x, y in itertools.islice(loader, max_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            logits = model(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            stats[0] += (top[:, 0] == y).sum()
            stats[1] += (top == y[:, None]).any(dim=1).sum()
            stats[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
            stats[3] += y.numel()
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        tdist.all_reduce(stats)
    n = max(stats[3].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n, "loss": stats[2].item() / n}


class ClassificationTask:
    replay_dtypes = (torch.float16, None)     # stage-size images as the official replay stores them; labels as they are

    def __init__(self, cfg: FinetuneConfig, train_files: Sequence[str], train_labels: Sequence[int],
                 val_files: Sequence[str], val_labels: Sequence[int], dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.train_files, self.train_labels = list(train_files), list(train_labels)
        d = cfg.data
        self.replay_chunks = d.replay_chunks
        self.normalize = Normalizer(dist.device)
        self.mixup = (Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.smoothing,
                            num_classes=cfg.model.num_classes) if (d.mixup > 0 or d.cutmix > 0) else None)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup is not None
                          else LabelSmoothingCrossEntropy(d.smoothing) if d.smoothing > 0 else nn.CrossEntropyLoss())
        self.erasing = (RandomErasing(d.reprob, mode="pixel", max_count=1, device=str(dist.device))
                        if d.reprob > 0 else None)
        self.val_files, self.val_labels = list(val_files), list(val_labels)
        self.val_loader = self._make_val_loader(cfg.model.img_size)
        self._val_loaders = {cfg.model.img_size: self.val_loader}
        # model.resize=official: the input size the Swin / ViT parameters are shaped for (None: not
        # re-shaped, the final size); a randomly initialised model gets its tables drawn afresh at
        # the first stage's shapes, as the official code builds the model at that size
        self.param_size: Optional[int] = None
        self.stage_size: Optional[int] = None     # the current stage's input size (eval.size=stage evaluates at it)
        self._random_init = cfg.mode == "train" and not cfg.model.checkpoint
        self.growth = None                        # growth.schedule: the GrowthController (it attaches itself)
        self._subset: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.search_indices, self.search_subset_line = None, None
        if cfg.growth.enabled:                    # Eq. 8's subset: seeded, class-stratified (the files are class-sorted)
            self.search_indices = search_subset(self.train_labels, cfg.growth.search_images, cfg.train.seed)
            self.search_subset_line = subset_line(self.search_indices, self.train_labels)

    def subset_loss(self, model: nn.Module, size: int, backward: bool = False) -> float:
        """AutoProg's Eq. 8 loss (and the growth continuity check): cross-entropy on the seeded
        class-stratified sample of ``growth.search_images`` training images with the evaluation
        transform at the final size (fixed augmentation), shrunk to ``size`` as training shrinks them.
        ``backward``: also back-propagate each batch (the growth controller times it)."""
        if self._subset is None:
            idx = self.search_indices
            if idx is None:
                idx = search_subset(self.train_labels, self.cfg.growth.search_images, self.cfg.train.seed)
            ds = EvalDataset([self.train_files[i] for i in idx], [self.train_labels[i] for i in idx],
                             eval_transform(self.cfg.model.img_size, self.cfg.data.crop_pct))
            xs, ys = zip(*(ds[i] for i in range(len(idx))))
            self._subset = (torch.stack(xs), torch.as_tensor(ys))
        total, count = 0.0, 0
        for x, y in zip(self._subset[0].split(64), self._subset[1].split(64)):
            x = self.stage_transform(x.to(self.dist.device), size)
            logits = model(x).float()
            loss = nn.functional.cross_entropy(logits, y.to(self.dist.device), reduction="sum")
            if backward:
                loss.backward()
            total += loss.item()
            count += y.numel()
        return total / count

    @staticmethod
    def replay_sample_bytes(size: int) -> int:
        """A replayed sample: the stage-size float16 image and its int64 label."""
        return 3 * size * size * 2 + 8

    def _make_val_loader(self, size: int) -> torch.utils.data.DataLoader:
        val = EvalDataset(self.val_files, self.val_labels, eval_transform(size, self.cfg.data.crop_pct))
        sampler = (torch.utils.data.distributed.DistributedSampler(val, shuffle=False)
                   if self.dist.enabled else None)
        return torch.utils.data.DataLoader(val, batch_size=max(1, min(256, self.cfg.train.batch_size)),
                                           sampler=sampler, num_workers=self.cfg.data.num_workers,
                                           pin_memory=self.dist.device.type == "cuda",
                                           worker_init_fn=ignore_stop_signals)

    def make_loader(self, batches: RunBatches) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        ds = CurriculumTrainDataset(self.train_files, self.train_labels, self.cfg.model.img_size, d.randaug,
                                    d.scale, d.hflip, seed=self.cfg.train.seed,
                                    lanczos_to_stage=d.lowfreq == "cpu-lanczos")
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919)
        if isinstance(batches, RunBatches):    # the workers' batches in flight must fit in /dev/shm
            check_shared_memory(d.num_workers, 2, batches.max_micro_batch(), 3 * self.cfg.model.img_size ** 2 + 8,
                                int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size)))
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=d.num_workers,
                                           collate_fn=collate_train, generator=gen,
                                           pin_memory=self.dist.device.type == "cuda",
                                           worker_init_fn=ignore_stop_signals)

    def prepare_stage(self, model: nn.Module, ps: PlannedStage,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """``model.resize=official``: give a Swin / ViT the stage size's windows or patch grid and
        position tables (:mod:`finetune.resize`), carrying the optimizer state over the same way.
        A no-op when the model already has the stage's shapes (a resumed run, prepared before its
        checkpoint was loaded). True when it changed the model (new parameters, or buffers such
        as Swin's index tables and masks, which a DDP wrapper would otherwise hold stale).
        ``optimizer=None``: a copy without one (the weight EMA), always interpolated, as the
        official code converts ``model_ema`` with ``model`` (a fresh draw is the trainer's to copy)."""
        if self.cfg.model.resize != "official" or not handles(model):
            return False
        untrained = self._random_init and optimizer is not None and not any(optimizer.state.values())
        init = torch.Generator().manual_seed(self.cfg.train.seed) if untrained else None
        before = current_size(model)
        swaps = prepare_for_size(model, ps.stage.size, init)
        if optimizer is not None:
            move_optimizer_state(optimizer, swaps)
        self.param_size = current_size(model)
        return bool(swaps) or self.param_size != before

    def on_stage_start(self, model: nn.Module, ps: PlannedStage) -> None:
        self.stage_size = ps.stage.size
        if self.cfg.model.resize == "official" and handles(model):
            return                              # prepared by prepare_stage
        ok, why = check_resizable(model, ps.stage.size)
        if not ok:
            raise ConfigError(f"model.name={self.cfg.model.name} cannot train at input size {ps.stage.size} in this run: {why}. "
                             "Use a curriculum with sizes this model supports, or a ConvNet / ViT.")

    def stage_transform(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        if self.cfg.growth.enabled:
            return shrink_input(x, size, self.cfg.growth.shrink)
        if self.cfg.data.lowfreq == "fft":
            return low_frequency_crop(x, size)
        return downsample(x, size, "bicubic")

    def prepare(self, batch, info: StepInfo) -> Prepared:
        """Normalise, erase, shrink to the stage size: the ICCV order (erasing at the final size,
        then the low-frequency crop) for lowfreq=fft / downsample; with cpu-lanczos the images come
        at the stage size and are erased there (the ET++ order). Mixing happens per step in :meth:`loss`."""
        imgs, labels = batch[0].to(self.dist.device, non_blocking=True), batch[1].to(self.dist.device, non_blocking=True)
        x = self.normalize(imgs)
        if self.erasing is not None:
            if self.growth is not None:           # AdaReg (1.0 without it)
                self.erasing.probability = self.cfg.data.reprob * self.growth.reg_fraction
            x = self.erasing(x)
        return Prepared((self.stage_transform(x, info.size), labels))

    def loss(self, model: nn.Module, inputs, info: StepInfo) -> torch.Tensor:
        x, labels = inputs
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ConfigError(f"mixup/cutmix need an even per-process batch, got {x.shape[0]}")
            x, labels = self.mixup(x, labels)
        return self.criterion(model(x), labels)

    @property
    def best_metric(self) -> Optional[str]:
        """top1; None while the parameters have a smaller stage's shapes (model.resize=official):
        such a model is evaluated at its stage size and its checkpoint does not load into the
        final-size model, so only final-shape evaluations compete for checkpoint-best.pth."""
        if self.growth is not None and not self.growth.complete:
            return None                           # a sub-network: its checkpoint is not the final model yet
        return None if self._eval_size() != self.cfg.model.img_size else "top1"

    def _eval_size(self) -> int:
        """The parameters' stage size (model.resize=official), else the stage size with
        eval.size=stage (as the official code validates every stage), else the final size."""
        if self.growth is not None:
            return self.growth.eval_subnet.size
        if self.param_size:
            return self.param_size
        if self.cfg.eval.size == "stage" and self.stage_size:
            return self.stage_size
        return self.cfg.model.img_size

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Top-1 / top-5 / loss at :meth:`_eval_size` (resize to size / crop_pct, centre crop size):
        in smaller stages at the stage size, as the official code evaluates every stage."""
        if self.growth is not None:
            self.growth.activate_eval()
        size = self._eval_size()
        if size not in self._val_loaders:
            self._val_loaders = {self.cfg.model.img_size: self.val_loader, size: self._make_val_loader(size)}
        metrics = evaluate(model, self._val_loaders[size], self.dist.device, self.dist,
                           max_batches=self.cfg.eval.max_batches)
        return {**metrics, "size": size}          # logged as eval_size: which size this evaluation ran at

    def on_stage_end(self, model: nn.Module, ps: PlannedStage, run_dir: str) -> None:
        pass

    def checkpoint_meta(self) -> Dict[str, Any]:
        m = self.cfg.model
        return {"kind": f"classifier_{self.cfg.mode}", "model_name": m.name, "builder": m.builder,
                "num_classes": m.num_classes,
                "img_size": m.img_size, "global_pool": m.global_pool, "model_kwargs": dict(m.kwargs),
                "param_size": self.param_size or m.img_size,   # the input size the parameters are shaped for (a stage's
                                                   # in a low-resolution stage with model.resize=official)
                "linear_probe": self.cfg.mode == "linprobe",
                **({"growth": self.growth.summary()} if self.growth is not None else {})}
