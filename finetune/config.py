"""The fine-tuning / linear-probing / supervised-training config schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from engine.config import ConfigError, join_key
from engine.progressive import GrowthConfig
from engine.trainer import TrainConfig

from .recipes import apply_recipe

MODES = ("finetune", "linprobe", "train", "eval")
GLOBAL_POOLS = ("avg", "token", "", "max", "avgmax", "map")


@dataclass
class ClassifierConfig:
    name: str = "auto"                    # any timm classification model; auto: the architecture recorded in
                                          # model.checkpoint (ours), else vit_base_patch16_224
    num_classes: int = 1000               # classes of the new head (must match the class folders)
    img_size: Optional[int] = None        # final (and evaluation) input size; null: model.checkpoint's, else 224
    builder: Literal["timm", "torchvision"] = "timm"   # who builds model.name: timm (timm.create_model) | torchvision
                                          # (torchvision.models.get_model; resnet50 as the official ET++ code)
    drop_path: Optional[float] = None     # stochastic depth rate (timm drop_path_rate); null: recipe=official's
                                          # budget-scaled rate, else 0.1 (0 for torchvision models)
    global_pool: str = "avg"              # ViTs: avg + fc_norm (MAE fine-tuning) or token (linear probing)
    checkpoint: str = ""                  # pretrained weights: our MAE / fine-tuned checkpoints or official MAE files
    layer_decay: float = 0.75             # layer-wise lr decay for ViTs (1.0 = off)
    kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    resize: Literal["official", "forward"] = "official"   # ViT / Swin across curriculum sizes (ConvNets: no effect):
                                          # official (as the official ET++ code: at each stage change the ViT
                                          # pos-embed table moves to the stage grid and the Swin window to
                                          # size // 32, tables and AdamW moments bilinearly interpolated from the
                                          # previous stage's) | forward (deviation: one final-size table resampled
                                          # in every forward pass, Swin keeps window 7 and pads feature maps)

    def validate(self, where: str) -> None:
        import timm

        if self.builder == "torchvision":
            import torchvision

            if self.name != "auto" and self.name not in torchvision.models.list_models(torchvision.models):
                raise ConfigError(f"{where}.name: {self.name!r} is not a torchvision classification model "
                                  f"({where}.builder=torchvision); allowed: torchvision.models.list_models(), e.g. resnet50")
            if self.drop_path:
                raise ConfigError(f"{where}.drop_path={self.drop_path:g}: torchvision models have no stochastic depth; "
                                  f"set {where}.drop_path=0 or {where}.builder=timm")
        elif self.name != "auto" and not timm.is_model(self.name):
            import difflib

            close = difflib.get_close_matches(self.name, timm.list_models(), n=4, cutoff=0.75)
            raise ConfigError(f"{where}.name: {self.name!r} is not a timm model; allowed: auto (the architecture "
                              f"model.checkpoint records) or any name of timm.list_models()"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"{where}.global_pool: {self.global_pool!r} is not allowed; allowed: "
                              f"{', '.join(map(repr, GLOBAL_POOLS))} (timm ViT pooling)")
        if self.resize not in ("official", "forward"):
            raise ConfigError(f"{where}.resize: {self.resize!r} is not allowed; allowed: official (per-stage ViT "
                              "position / Swin window tables, as the official code) or forward (final-size tables "
                              "resampled in the forward pass)")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ConfigError(f"{where}.drop_path must be in [0, 1) (or null), got {self.drop_path}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"{where}.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.num_classes < 1:
            raise ConfigError(f"{where}.num_classes must be >= 1, got {self.num_classes}")


@dataclass
class ClassifierDataConfig:
    path: str = ""                        # root holding train/ and val/ in ImageFolder layout
    train_dir: str = "train"              # training ImageFolder tree, relative to path
    val_dir: str = "val"                  # validation ImageFolder tree, relative to path
    num_workers: int = 8                  # loader worker processes per training process (0: load in the main process)
    randaug: str = "rand-m9-mstd0.5-inc1" # timm RandAugment spec; its m is replaced by the curriculum's per step
    scale: Any = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale
    hflip: float = 0.5                    # horizontal flip probability
    mixup: float = 0.8                    # mixup alpha (0: off)
    cutmix: float = 1.0                   # CutMix alpha (0: off)
    smoothing: float = 0.1                # label smoothing
    reprob: float = 0.25                  # random erasing probability (applied on the device)
    crop_pct: float = 0.875               # evaluation: resize to size / crop_pct, centre crop
    lowfreq: Literal["fft", "cpu-lanczos", "downsample"] = "fft"   # shrink to the stage size: fft (low-frequency
                                          # crop on the device, after erasing at the final size: the ICCV order) |
                                          # cpu-lanczos (ET++: Lanczos resize in the workers after RandAug, erasing
                                          # at the stage size) | downsample (bicubic on the device)
    replay_chunks: int = 32               # replay stages: chunks each loader micro-batch is stored as; replayed
                                          # chunks are drawn uniformly (official: 32; must divide the micro-batch)
    demo: bool = False                    # generate the bundled demo set at `path` if missing; an existing folder
                                          # it did not generate is refused, never replaced

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is required: a folder with {self.train_dir}/ and {self.val_dir}/ (ImageFolder layout)")
        if self.replay_chunks < 1:
            raise ConfigError(f"{where}.replay_chunks must be >= 1, got {self.replay_chunks}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers must be >= 0, got {self.num_workers}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"{where}.crop_pct must be in (0, 1], got {self.crop_pct}")
        sc = self.scale
        if not (isinstance(sc, (list, tuple)) and len(sc) == 2 and all(isinstance(v, (int, float)) for v in sc)
                and 0 < sc[0] <= sc[1] <= 1):
            raise ConfigError(f"{where}.scale must be [min, max] with 0 < min <= max <= 1, got {sc!r}")
        if self.randaug:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.randaug, {})
            except (AssertionError, ValueError, KeyError) as e:
                raise ConfigError(f"{where}.randaug: {self.randaug!r} is not a timm RandAugment spec ({e}); allowed: "
                                  "'' (off) or e.g. rand-m9-mstd0.5-inc1 (rand-<m|n|mstd|inc|w><value>-...)") from None


@dataclass
class FTCurriculumConfig:
    name: str = "baseline"                # baseline for MAE fine-tuning; et / etpp / a YAML file for supervised training
    epochs: float = 100.0                 # budget: epochs, or equivalent epochs at the final size
    multiple_of: Optional[int] = None     # default: 16 for patch models, 32 otherwise
    baseline_epochs: Optional[float] = None   # the baseline the saving is reported against (default: epochs)


@dataclass
class FTEvalConfig:
    max_batches: Optional[int] = None     # validate on the first N batches only (quick checks); null: the whole set
    size: Literal["stage", "final"] = "stage"   # input size of evaluations during smaller stages: stage (the
                                          # stage size, as the official code) | final; the run's last evaluation
                                          # is at the final size either way, and only final-size ones compete for
                                          # checkpoint-best.pth

    def validate(self, where: str) -> None:
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"{where}.max_batches must be >= 1 (or null for the whole validation set), "
                              f"got {self.max_batches}")


@dataclass
class FinetuneConfig:
    mode: str = "finetune"                # finetune | linprobe | train | eval
    recipe: Literal["none", "official"] = "none"   # official: the official ET++ launcher of model.name
                                          # (finetune/recipes.py): null train.warmup_epochs / model.drop_path get its
                                          # formulas, and the run lists every setting that differs from it
    optimizer: str = "adamw"              # adamw | lamb (CSWin-B's official recipe) | lars (linear probing, as MAE)
    opt_eps: float = 1e-8                 # optimizer epsilon (AdamW / LAMB; official LAMB runs use 1e-6)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)   # the classifier and its pretrained weights
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)   # ImageFolder data and augmentation
    curriculum: FTCurriculumConfig = field(default_factory=FTCurriculumConfig)   # the curriculum and the budget
    train: TrainConfig = field(default_factory=lambda: TrainConfig(   # optimisation, checkpoints, logging, resume
        batch_size=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05, betas=[0.9, 0.999]))
    eval: FTEvalConfig = field(default_factory=FTEvalConfig)   # validation
    growth: GrowthConfig = field(default_factory=GrowthConfig)   # AutoProg / Prog progressive growth (mode=train, ViTs)

    def validate(self, where: str) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{join_key(where, 'mode')}: {self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if self.optimizer not in ("adamw", "lamb", "lars"):
            raise ConfigError(f"{join_key(where, 'optimizer')}: {self.optimizer!r} is not allowed; allowed: adamw, "
                              "lamb, lars")
        if not self.opt_eps > 0:
            raise ConfigError(f"{join_key(where, 'opt_eps')} must be > 0, got {self.opt_eps}")
        self.recipe_report: List[str] = []
        if self.recipe == "official":
            self.recipe_report = apply_recipe(self)
        if self.model.drop_path is None:
            self.model.drop_path = 0.0 if self.model.builder == "torchvision" else 0.1
        if self.mode == "eval" and self.train.warmup_epochs is None:
            self.train.warmup_epochs = 0.0
        if self.mode != "eval":
            self.train.check_budget(join_key(where, "train"), self.curriculum.epochs)
        g = self.growth
        if g.enabled:
            gw = join_key(where, "growth")
            if self.mode != "train":
                raise ConfigError(f"{gw}.schedule={g.schedule} grows a model trained from the start; it needs "
                                  f"mode=train, got mode={self.mode}")
            if self.model.resize != "forward":
                raise ConfigError(f"{gw}.schedule={g.schedule} changes the input size per step (supernet phases); "
                                  "set model.resize=forward (one position table resampled in the forward pass)")
            if self.model.layer_decay != 1.0:
                raise ConfigError(f"{gw}.schedule={g.schedule}: layer-wise lr decay is not defined for a growing depth; "
                                  f"set model.layer_decay=1.0, got {self.model.layer_decay}")
            g.check_run(gw, curriculum=self.curriculum.name, lowfreq=self.data.lowfreq,
                        ema_decay=self.train.ema_decay, compile=self.train.compile, epochs=self.curriculum.epochs)
        if self.mode in ("finetune", "linprobe", "eval") and not self.model.checkpoint:
            raise ConfigError(f"{join_key(where, 'model.checkpoint')} is required for mode {self.mode!r} "
                              "(a pretraining/encoder checkpoint, or a fine-tuned one for eval)")
