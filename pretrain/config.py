"""The pretraining config schema: every key a YAML file or ``key=value`` override may set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from engine.config import ConfigError
from engine.trainer import TrainConfig
from evaluation.knn import KNNConfig

from .data import DECODE_MODES
from .models_mae import ARCHS, TARGETS
from .pos_embed import POS_EMBED_MODES


@dataclass
class ModelConfig:
    arch: str = "mae_vit_base_patch16"
    img_size: int = 224                   # final input size (the curriculum ends here)
    target: str = "norm_pixel"            # pixel | norm_pixel | hog
    mask_ratio: float = 0.75
    pos_embed_mode: str = "scaled"        # scaled | regenerate | interpolate
    # architecture overrides for small experiments (null = the arch's value)
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None

    def validate(self, where: str) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"{where}.arch: unknown architecture {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"{where}.target: {self.target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        if self.pos_embed_mode not in POS_EMBED_MODES:
            raise ConfigError(f"{where}.pos_embed_mode: {self.pos_embed_mode!r}; allowed: {', '.join(POS_EMBED_MODES)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"{where}.mask_ratio must be in [0, 1), got {self.mask_ratio}")

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
    num_workers: int = 8
    decode: str = "auto"                  # cpu (PIL in the workers) | device (workers read bytes; decode + crop on
                                          # the training device) | auto (device when training on CUDA)
    scale: List[float] = field(default_factory=lambda: [0.2, 1.0])   # RandomResizedCrop scale
    lowfreq: Literal["fft", "cpu-lanczos", "downsample"] = "fft"
    downsample_mode: Literal["bilinear", "bicubic", "area", "nearest"] = "bicubic"
    replay_chunks: int = 32               # chunks per loader batch in the replay buffer
    demo: bool = False                    # generate the bundled demo set at `path` if it is missing
    demo_images: int = 1200

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is required: an image folder or a .txt file listing image paths")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"{where}.scale must be [min, max] with 0 < min <= max <= 1, got {self.scale}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"{where}.decode: {self.decode!r} is not allowed; allowed: {', '.join(DECODE_MODES)}")
        if self.decode == "device" and self.lowfreq == "cpu-lanczos":
            raise ConfigError(f"{where}.decode=device cannot be combined with {where}.lowfreq=cpu-lanczos (the "
                              "Lanczos resize runs in the workers on decoded images); use decode=cpu, or lowfreq=fft")
        if self.replay_chunks < 1:
            raise ConfigError(f"{where}.replay_chunks must be >= 1, got {self.replay_chunks}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}")

    def decode_on(self, device) -> str:
        """The decode path for a run on ``device`` (``auto``: the device path on CUDA)."""
        if self.decode == "auto":
            return "device" if device.type == "cuda" and self.lowfreq != "cpu-lanczos" else "cpu"
        return self.decode


@dataclass
class CurriculumConfig:
    name: str = "etpp"                    # built-in name or a YAML file
    epochs: float = 400.0                 # budget: epochs, or equivalent epochs at the final size
    multiple_of: Optional[int] = None     # size rounding (default: the patch size)
    baseline_epochs: Optional[float] = None   # the baseline the speedup is reported against (default: epochs)


@dataclass
class EvalConfig:
    knn: KNNConfig = field(default_factory=KNNConfig)   # kNN monitor: stage ends and every train.eval_every_steps


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
