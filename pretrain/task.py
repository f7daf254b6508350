"""MAE pretraining as a :class:`engine.trainer.Task`: data pipeline, stage transform, loss, pictures."""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from efficienttrain.curriculum import PlannedStage, StepInfo
from efficienttrain.fourier import downsample, low_frequency_crop
from engine.data import DataError, ImageSource, Normalizer, check_shared_memory
from engine.decode import DaliDecoder, DecodeAhead, EncodedBatch
from engine.distributed import DistInfo
from engine.knn import KNNMonitor
from engine.progressive import search_subset, shrink_input, subset_line
from engine.stops import ignore_stop_signals
from engine.trainer import Prepared, RunBatches

from .config import PretrainConfig
from .data import MAEPretrainDataset, center_crop_tensor
from .models_mae import ARCHS, MaskedAutoencoderViT
from .visualize import reconstruction_grid


def folder_labels(source: ImageSource, root: str) -> Optional[List[int]]:
    """The ImageFolder class (first folder under ``root``) of every image of a file source, for a
    stratified subset; None for a flat folder, a list file or shards (no labels to stratify by)."""
    files = getattr(source, "files", None)
    if files is None or not os.path.isdir(root):
        return None
    tops = []
    for f in files:
        rel = os.path.relpath(f, root).split(os.sep)
        if len(rel) < 2 or rel[0] == "..":
            return None
        tops.append(rel[0])
    index = {c: i for i, c in enumerate(sorted(set(tops)))}
    return [index[t] for t in tops]


class MAETask:
    """MAE pretraining: decode + crop + normalise (``prepare``), masked reconstruction loss,
    reconstruction pictures at stage ends and, with ``eval.knn``, the kNN monitor as evaluation."""

    replay_dtypes = (torch.float16,)          # the stage-size model input, as the official replay stores it
    eval_prefix = "knn_"                      # evaluation metrics are logged as knn_top1 / knn_top5

    def __init__(self, cfg: PretrainConfig, source: ImageSource, dist: DistInfo, num_vis: int = 6) -> None:
        self.cfg, self.source, self.dist = cfg, source, dist
        d = cfg.data
        self.replay_chunks = d.replay_chunks
        self.decode = d.decode_on(dist.device)
        self.dataset = MAEPretrainDataset(source, cfg.model.img_size, d.scale, seed=cfg.train.seed,
                                          lanczos_to_stage=d.lowfreq == "cpu-lanczos", decode=self.decode)
        self.decoder = None
        if self.decode == "dali":
            try:
                self.decoder = DaliDecoder(cfg.model.img_size, dist.device, self.dataset.fallback)
                self.decoder.check()
            except RuntimeError as e:
                if d.decode != "auto":
                    raise DataError(f"data.decode={d.decode}: {e}; use data.decode=cpu") from None
                warnings.warn(f"{e}; data.decode=auto decodes with PIL in the loader workers instead")
                self.decode, self.decoder = "cpu", None
                self.dataset.decode = "cpu"
        self.normalize = Normalizer(dist.device)
        self.vis = self._vis_images(num_vis)
        self.knn = (KNNMonitor(cfg.eval.knn, cfg.model.img_size, dist, d.num_workers)
                    if cfg.eval.knn.enabled else None)
        if self.knn is None:
            self.evaluate = None               # no monitor: the loop has nothing to evaluate
        self.growth = None                     # growth.schedule: the GrowthController (it attaches itself)
        self._subset = None
        self.search_indices, self.search_labels, self.search_subset_line = None, None, None
        if cfg.growth.enabled:                 # Eq. 8's subset: folder labels when there are any
            data_path = os.path.join(cfg.data.path, "train") if cfg.data.demo else cfg.data.path
            self.search_labels = folder_labels(source, data_path)
            self.search_indices = search_subset(self.search_labels, cfg.growth.search_images, cfg.train.seed,
                                                len(source))
            self.search_subset_line = subset_line(self.search_indices, self.search_labels)

    def subset_loss(self, model: MaskedAutoencoderViT, size: int, backward: bool = False) -> float:
        """AutoProg's Eq. 8 loss (and the growth continuity check): the MAE loss of the seeded
        sample of ``growth.search_images`` images (class-stratified on an ImageFolder tree, else
        uniform; unreadable ones left out), centre-cropped (fixed augmentation), shrunk to ``size``
        as training shrinks them, with one fixed mask draw (seeded) for every candidate.
        ``backward``: also back-propagate each batch (the growth controller times it)."""
        if self._subset is None:
            if self.search_indices is None:
                self.search_indices = search_subset(None, self.cfg.growth.search_images, self.cfg.train.seed,
                                                    len(self.source))
            self._subset = self._read_crops(self.search_indices)
        total, count = 0.0, 0
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.train.seed + 4242)
            for x in self._subset.split(64):
                x = self.normalize(self.stage_transform(x.to(self.dist.device).float(), size))
                loss, _, _ = model(x, mask_ratio=self.cfg.model.mask_ratio)
                if backward:
                    loss.backward()
                total += float(loss) * x.shape[0]
                count += x.shape[0]
        return total / count

    def _vis_images(self, num: int) -> torch.Tensor:
        """The first ``num`` readable images, centre-cropped: the fixed rows of every reconstruction grid."""
        return self._read_crops(range(min(num * 4, len(self.source))), num)

    def _read_crops(self, indices, num: Optional[int] = None) -> torch.Tensor:
        """The readable images among ``indices`` (the first ``num`` of them), centre-cropped."""
        out = []
        for i in indices:
            try:
                out.append(center_crop_tensor(self.source.read(i), self.cfg.model.img_size))
            except Exception:  # unreadable files are reported by the data loader
                continue
            if len(out) == num:
                break
        if not out:
            raise DataError(f"none of {len(indices)} images of {self.source.name(0)!r} ... could be read; "
                            "check data.path (image files PIL can open)")
        return torch.stack(out)

    def make_loader(self, batches: RunBatches) -> torch.utils.data.DataLoader:
        d = self.cfg.data
        # own generator: creating the loader must not consume the global RNG (masking noise), or a
        # resumed run would diverge from an uninterrupted one
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919)
        if isinstance(batches, RunBatches):    # the workers' batches in flight must fit in /dev/shm
            check_shared_memory(d.num_workers, 4, batches.max_micro_batch(), 3 * self.cfg.model.img_size ** 2,
                                int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size)))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=d.num_workers, collate_fn=self.dataset.collate,
            generator=gen, pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if d.num_workers > 0 else None, worker_init_fn=ignore_stop_signals)
        # DALI: each batch's decode starts while the previous batch trains (the trainer sees plain batches)
        return DecodeAhead(loader, self.decoder) if self.decoder is not None else loader

    def on_stage_start(self, model: MaskedAutoencoderViT, ps: PlannedStage) -> None:
        # growth: sizes change per step; tables of sizes not prepared are built in the forward pass
        model.prepare_input_size(self.growth.eval_subnet.size if self.growth is not None else ps.stage.size)

    def stage_transform(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Final-size batch -> stage-size batch (on the device; linear, so before or after normalising)."""
        lowfreq = self.cfg.data.lowfreq
        if x.shape[-1] == size:
            return x
        if self.cfg.growth.enabled:
            return shrink_input(x, size, self.cfg.growth.shrink)
        if lowfreq == "fft":
            return low_frequency_crop(x, size)
        if lowfreq == "downsample":
            return downsample(x, size, self.cfg.data.downsample_mode)
        raise RuntimeError(f"lowfreq={lowfreq}: the loader should already deliver {size}px images, got {x.shape[-1]}")

    def prepare(self, batch: Tuple[torch.Tensor, ...], info: StepInfo) -> Prepared:
        """Decode (DALI path: the result of the decode :class:`DecodeAhead` started), low-frequency
        crop in 0..255 space, then normalise the smaller tensor."""
        skipped = 0
        if self.decoder is not None:
            imgs, skipped = self.decoder(EncodedBatch(*batch, bad=None))
        else:
            imgs = batch[0].to(self.dist.device, non_blocking=True)
        x = self.normalize(self.stage_transform(imgs.float(), info.size))
        return Prepared((x,), skipped)

    def loss(self, model: nn.Module, inputs: Tuple[torch.Tensor, ...], info: StepInfo) -> torch.Tensor:
        loss, _, _ = model(inputs[0], mask_ratio=self.cfg.model.mask_ratio)
        return loss

    def evaluate(self, model: MaskedAutoencoderViT) -> Dict[str, float]:
        """kNN top-1 / top-5 of the encoder at the final size (no gradients; bf16 on a GPU)."""
        was_training = model.training
        model.eval()
        if self.growth is not None:
            self.growth.activate_eval()        # the sub-network being trained (a supernet: its largest)
        try:
            amp = torch.bfloat16 if self.dist.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
            return self.knn(lambda x: model.forward_features(x, self.cfg.eval.knn.feature), amp)
        finally:
            model.train(was_training)

    @property
    def decode_description(self) -> str:
        """The decode path for the run log: PIL in the workers, or DALI with its version and backend."""
        if self.decoder is None:
            return "cpu (PIL in the loader workers)"
        alias = " (data.decode=device is its former name)" if self.cfg.data.decode == "device" else ""
        return f"dali: {self.decoder.backend}{alias}"

    def metrics(self) -> Dict[str, float]:
        if self.decoder is None:
            return {}
        return {"decode_fallbacks": self.decoder.fallbacks, "decode_worker_images": self.decoder.worker_decoded}

    def on_stage_end(self, model: MaskedAutoencoderViT, ps: PlannedStage, run_dir: str) -> None:
        size = ps.stage.size
        if self.growth is not None:
            size = self.growth.activate_eval().size
        x = self.vis.to(self.dist.device).float()
        if self.cfg.data.lowfreq == "cpu-lanczos" and x.shape[-1] != size:
            x = downsample(x, size, "bicubic")       # the pictures' stand-in for the workers' Lanczos
        x = self.normalize(self.stage_transform(x, size))
        path = os.path.join(run_dir, "reconstructions", f"stage{ps.index:02d}_size{size}.png")
        reconstruction_grid(model, x, path, self.cfg.model.mask_ratio)

    def checkpoint_meta(self) -> Dict[str, Any]:
        m = self.cfg.model
        arch = {**ARCHS[m.arch], **m.overrides()}
        return {"kind": "mae_pretrain", "arch": m.arch, "model_kwargs": arch, "patch_size": m.patch,
                "img_size": m.img_size, "target": m.target, "norm_pix_loss": m.target == "norm_pixel",
                "mask_ratio": m.mask_ratio, "pos_embed_mode": m.pos_embed_mode,
                **({"growth": self.growth.summary()} if self.growth is not None else {})}
