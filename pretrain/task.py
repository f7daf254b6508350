"""MAE pretraining as a :class:`engine.trainer.Task`: data pipeline, stage transform, loss, pictures."""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence

import torch
import torch.nn as nn

from efficienttrain.curriculum import PlannedStage, StepInfo
from efficienttrain.fourier import downsample, low_frequency_crop
from engine.distributed import DistInfo

from .config import PretrainConfig
from .data import MAEPretrainDataset, center_crop_tensor, collate, normalize
from .models_mae import ARCHS, MaskedAutoencoderViT
from .visualize import reconstruction_grid


class MAETask:
    def __init__(self, cfg: PretrainConfig, files: Sequence[str], dist: DistInfo, num_vis: int = 6) -> None:
        self.cfg, self.files, self.dist = cfg, list(files), dist
        self.replay_chunks = cfg.data.replay_chunks
        self.vis = self._vis_images(num_vis)

    def _vis_images(self, num: int) -> torch.Tensor:
        """The first ``num`` readable images, centre-cropped: the fixed rows of every reconstruction grid."""
        out = []
        for f in self.files[: num * 4]:
            try:
                out.append(center_crop_tensor(f, self.cfg.model.img_size))
            except Exception:  # unreadable files are reported by the data loader
                continue
            if len(out) == num:
                break
        if not out:
            raise RuntimeError(f"none of the first {num * 4} images could be read; check data.path")
        return torch.stack(out)

    def make_loader(self, ps: PlannedStage, batches) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        ds = MAEPretrainDataset(self.files, self.cfg.model.img_size, d.scale, seed=self.cfg.train.seed,
                                stage_size=ps.stage.size if d.lowfreq == "cpu-lanczos" else None)
        # own generator: creating the loader must not consume the global RNG (masking noise), or a
        # resumed run would diverge from an uninterrupted one
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + ps.index)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=d.num_workers, collate_fn=collate, generator=gen,
            pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if d.num_workers > 0 else None)

    def stage_transform(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Normalised final-size batch -> stage-size batch (on the device)."""
        lowfreq = self.cfg.data.lowfreq
        if x.shape[-1] == size:
            return x
        if lowfreq == "fft":
            return low_frequency_crop(x, size)
        if lowfreq == "downsample":
            return downsample(x, size, self.cfg.data.downsample_mode)
        raise RuntimeError(f"lowfreq={lowfreq}: the loader should already deliver {size}px images, got {x.shape[-1]}")

    def loss(self, model: nn.Module, batch, info: StepInfo) -> torch.Tensor:
        imgs = batch[0].to(self.dist.device, non_blocking=True)
        x = self.stage_transform(normalize(imgs), info.size)
        loss, _, _ = model(x, mask_ratio=self.cfg.model.mask_ratio)
        return loss

    def on_stage_end(self, model: MaskedAutoencoderViT, ps: PlannedStage, run_dir: str) -> None:
        x = normalize(self.vis.to(self.dist.device))
        x = low_frequency_crop(x, ps.stage.size) if self.cfg.data.lowfreq == "fft" else (
            downsample(x, ps.stage.size, self.cfg.data.downsample_mode) if x.shape[-1] != ps.stage.size else x)
        path = os.path.join(run_dir, "reconstructions", f"stage{ps.index:02d}_size{ps.stage.size}.png")
        reconstruction_grid(model, x, path, self.cfg.model.mask_ratio)

    def checkpoint_meta(self) -> Dict[str, Any]:
        m = self.cfg.model
        arch = {**ARCHS[m.arch], **m.overrides()}
        return {"kind": "mae_pretrain", "arch": m.arch, "model_kwargs": arch, "patch_size": m.patch,
                "img_size": m.img_size, "target": m.target, "norm_pix_loss": m.target == "norm_pixel",
                "mask_ratio": m.mask_ratio, "pos_embed_mode": m.pos_embed_mode}
