"""The pretraining config schema: every key a YAML file or ``key=value`` override may set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from engine.config import ConfigError, join_key
from engine.decode import DALI_INSTALL, dali_available
from engine.knn import KNNConfig
from engine.pos_embed import POS_EMBED_MODES
from engine.progressive import GrowthConfig
from engine.trainer import TrainConfig

from .data import DECODE_MODES
from .models_mae import ARCHS, TARGETS


@dataclass
class ModelConfig:
    arch: str = "mae_vit_base_patch16"    # mae_vit_{tiny,small,base,large}_patch16 | mae_vit_huge_patch14
    img_size: int = 224                   # final input size (the curriculum ends here)
    target: str = "norm_pixel"            # pixel | norm_pixel | hog
    mask_ratio: float = 0.75              # fraction of patches hidden from the encoder, in [0, 1)
    pos_embed_mode: str = "scaled"        # scaled | regenerate | interpolate
    # architecture overrides for small experiments (null = the arch's value)
    patch_size: Optional[int] = None      # patch size in pixels (null: the arch's)
    embed_dim: Optional[int] = None       # encoder width (null: the arch's)
    depth: Optional[int] = None           # encoder blocks (null: the arch's)
    num_heads: Optional[int] = None       # encoder attention heads (null: the arch's)
    decoder_embed_dim: Optional[int] = None   # decoder width (null: the arch's)
    decoder_depth: Optional[int] = None   # decoder blocks (null: the arch's)
    decoder_num_heads: Optional[int] = None   # decoder attention heads (null: the arch's)

    def validate(self, where: str) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"{where}.arch: unknown architecture {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"{where}.target: {self.target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        if self.pos_embed_mode not in POS_EMBED_MODES:
            raise ConfigError(f"{where}.pos_embed_mode: {self.pos_embed_mode!r}; allowed: {', '.join(POS_EMBED_MODES)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"{where}.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        p = self.patch
        if self.img_size < p or self.img_size % p:
            lo = max(p, self.img_size // p * p)
            raise ConfigError(f"{where}.img_size={self.img_size} is not a multiple of the patch size {p} "
                              f"({where}.patch_size or the arch's); allowed: multiples of {p}, e.g. {lo} or {lo + p}")
        arch = {**ARCHS[self.arch], **{k: v for k, v in self.overrides().items() if k in ARCHS[self.arch]}}
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if arch[dim] % arch[heads]:
                raise ConfigError(f"{where}: {dim} {arch[dim]} is not divisible by {heads} {arch[heads]} "
                                  f"(set {where}.{dim} / {where}.{heads} so that it is)")
            if arch[dim] % 4:      # the 2-D sin-cos position embedding splits the width in four
                raise ConfigError(f"{where}.{dim} must be a multiple of 4 (2-D sin-cos position embeddings), "
                                  f"got {arch[dim]}")

    @property
    def patch(self) -> int:
        return self.patch_size or ARCHS[self.arch]["patch_size"]

    def overrides(self) -> dict:
        keys = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return {**out, "img_size": self.img_size, "target": self.target, "pos_embed_mode": self.pos_embed_mode}


@dataclass
class DataConfig:
    path: str = ""                        # image folder (ImageFolder or flat tree), a .txt list of paths, or tar shards
    num_workers: int = 8                  # loader worker processes per training process (0: load in the main process)
    decode: str = "auto"                  # cpu (PIL in the workers) | dali (workers read bytes + draw the crop; NVIDIA
                                          # DALI decodes the crop in the training process: nvJPEG on CUDA, its CPU
                                          # backend otherwise) | auto (dali on CUDA when installed, else cpu);
                                          # device: the former name of dali
    scale: List[float] = field(default_factory=lambda: [0.2, 1.0])   # RandomResizedCrop scale
    lowfreq: Literal["fft", "cpu-lanczos", "downsample"] = "fft"   # shrink to the stage size: fft (low-frequency
                                                                   # crop on the device) | cpu-lanczos (official ET++
                                                                   # resize in the workers) | downsample (resize on
                                                                   # the device; the Table 13(b) ablation)
    downsample_mode: Literal["bilinear", "bicubic", "area", "nearest"] = "bicubic"   # interpolation for lowfreq=downsample
    replay_chunks: int = 32               # replay stages: chunks each loader micro-batch is stored as; replayed
                                          # chunks are drawn uniformly (official: 32; must divide the micro-batch)
    demo: bool = False                    # generate the bundled demo set at `path` if it is missing; an existing
                                          # folder it did not generate is refused, never replaced
    demo_images: int = 1200               # images in the generated demo set (data.demo=true)

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is required: an image folder or a .txt file listing image paths")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"{where}.scale must be [min, max] with 0 < min <= max <= 1, got {self.scale}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"{where}.decode: {self.decode!r} is not allowed; allowed: {', '.join(DECODE_MODES)}")
        if self.decode in ("dali", "device") and self.lowfreq == "cpu-lanczos":
            raise ConfigError(f"{where}.decode={self.decode} cannot be combined with {where}.lowfreq=cpu-lanczos (the "
                              "Lanczos resize runs in the workers on decoded images); use decode=cpu, or lowfreq=fft")
        if self.decode in ("dali", "device") and not dali_available():
            raise ConfigError(f"{where}.decode={self.decode}: NVIDIA DALI is not installed; {DALI_INSTALL}, "
                              f"or use {where}.decode=cpu (PIL in the loader workers) or auto")
        if self.replay_chunks < 1:
            raise ConfigError(f"{where}.replay_chunks must be >= 1, got {self.replay_chunks}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}")

    def decode_on(self, device) -> str:
        """The decode path (``cpu`` or ``dali``) for a run on ``device``: ``auto`` is DALI on CUDA when
        it is installed (a GPU otherwise waits for PIL), PIL on a CPU machine; ``device`` is DALI."""
        if self.decode == "auto":
            return "dali" if device.type == "cuda" and self.lowfreq != "cpu-lanczos" and dali_available() else "cpu"
        return "dali" if self.decode == "device" else self.decode


@dataclass
class CurriculumConfig:
    name: str = "etpp"                    # built-in name (baseline, et, etpp, etpp-replay, etpp-deit, etpp-convnext,
                                          # linear: python -m efficienttrain list) or a YAML file
    epochs: float = 400.0                 # budget: epochs, or equivalent epochs at the final size
    multiple_of: Optional[int] = None     # size rounding (default: the patch size)
    baseline_epochs: Optional[float] = None   # the baseline the speedup is reported against (default: epochs)


@dataclass
class EvalConfig:
    knn: KNNConfig = field(default_factory=KNNConfig)   # kNN monitor: stage ends and every train.eval_every_steps


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)   # the MAE model: architecture, target, masking
    data: DataConfig = field(default_factory=DataConfig)   # pretraining images and how they are loaded
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)   # the EfficientTrain curriculum and the budget
    train: TrainConfig = field(default_factory=TrainConfig)   # optimisation, batch, checkpoints, logging, resume
    eval: EvalConfig = field(default_factory=EvalConfig)   # kNN monitor of the encoder
    growth: GrowthConfig = field(default_factory=GrowthConfig)   # AutoProg / Prog growth of the encoder (decoder fixed)

    def validate(self, where: str) -> None:
        self.train.check_budget(join_key(where, "train"), self.curriculum.epochs)   # evaluation during pretraining
        self.growth.check_run(join_key(where, "growth"), curriculum=self.curriculum.name, lowfreq=self.data.lowfreq,
                              ema_decay=self.train.ema_decay, compile=self.train.compile, epochs=self.curriculum.epochs)
