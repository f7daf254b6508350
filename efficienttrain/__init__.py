"""EfficientTrain / EfficientTrain++ curriculum library.

Turns "where are we in training" into "what input size, augmentation strength, batch and replay
does this step use", and performs the low-frequency crop. Knows nothing about MAE or ViTs.
"""
from .curriculum import (BUILTIN, Curriculum, CurriculumError, Plan, Stage, StepInfo, get_curriculum,
                         model_flops_cost, pixel_cost, warmup_cosine, with_replay)
from .fourier import downsample, high_pass_filter, low_frequency_crop, low_pass_filter
from .replay import ReplayBuffer

__version__ = "0.1.0"
__all__ = [
    "BUILTIN", "Curriculum", "CurriculumError", "Plan", "Stage", "StepInfo", "get_curriculum",
    "model_flops_cost", "pixel_cost", "warmup_cosine", "with_replay", "downsample",
    "high_pass_filter", "low_frequency_crop", "low_pass_filter", "ReplayBuffer",
]
