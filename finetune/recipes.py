"""The official EfficientTrain++ supervised recipes (github.com/LeapLabTHU/EfficientTrain,
``_ET_pp_main_*.py``), as data and formulas, for ``recipe: official``.

The official launchers run ``main_buffer.py`` once per sub-stage; every call gets the whole
schedule length of that sub-stage's resolution (``--epochs int(E * (224 / size)^2 / rt)``) and
resumes the previous call's checkpoint, so the learning rate is one warmup + cosine curve over
the fraction of the budget, which is how :meth:`efficienttrain.curriculum.Plan.lr` indexes it.
Two values are formulas of the budget E:

- **warmup**: ``--warmup_epochs int(20 / rt)`` data epochs of the first stage's schedule for
  Swin, ResNet, ConvNeXt and CSWin (about 1.8 % of the budget at E=200: 3.68 budget epochs), and
  ``int(0.2 * E * ratio / rt)`` for DeiT (20 % of the budget). :func:`warmup_epochs` converts
  either into the budget epochs ``train.warmup_epochs`` counts, with the launchers' truncations.
- **drop path**: ``rate * E / 200`` (DeiT 0.1, Swin-T 0.2, Swin-S 0.3, Swin-B 0.5, ConvNeXt-T 0.1,
  -S 0.4, -B 0.5, ResNet-50 0).

Everything else is a constant of the launcher; :func:`apply_recipe` fills the formula values a
config leaves null and lists every setting that differs from the launcher, so a run says how it
deviates instead of claiming a reproduction it is not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from engine.config import ConfigError

REFERENCE_EPOCHS = 200.0      # the budget the launchers' drop-path rates are given for
OFFICIAL_LR = 4e-3            # --lr 4e-3 at the launchers' global batch 4096 (blr 2.5e-4)
OFFICIAL_BATCH = 4096


@dataclass(frozen=True)
class OfficialRecipe:
    """One launcher's settings (the ones our config schema can express)."""

    script: str                      # the official launcher it reproduces
    curriculum: str                  # our built-in curriculum with the launcher's res_list
    sizes: Tuple[int, ...]           # the launcher's res_list (10 sub-stages)
    drop_path_at_200: float          # --drop_path at E = 200 (scaled by E / 200)
    warmup: str                      # first-stage: int(20 / rt) data epochs | budget-share: int(0.2 E ratio / rt)
    amp: str                         # fp16 (--use_amp true: torch.cuda.amp, fp16) | off (fp32)
    clip_grad: Optional[float]       # --clip_grad
    ema_decay: float = 0.0           # --model_ema (timm ModelEma; 0.9999 unless --model_ema_decay)
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    lr: float = OFFICIAL_LR
    builder: str = "timm"            # resnet50: torchvision's resnet50() (last BN gamma 1, not timm's 0)
    model: str = ""                  # the launcher's own --model name where it differs


_ETPP = (96,) * 2 + (160,) * 4 + (224,) * 4
_DEIT = (96,) * 2 + (160,) * 4 + (192,) * 2 + (224,) * 2
_CONVNEXT = (160,) * 6 + (224,) * 4

OFFICIAL: Dict[str, OfficialRecipe] = {
    "deit_small_patch16_224": OfficialRecipe("_ET_pp_main_deitS.py", "etpp-deit", _DEIT, 0.1, "budget-share", "fp16", 5.0),
    # DeiT-T (ET Table 6) has no launcher of its own: the DeiT-S one with --model deit_tiny_patch16_224
    "deit_tiny_patch16_224": OfficialRecipe("_ET_pp_main_deitS.py", "etpp-deit", _DEIT, 0.1, "budget-share", "fp16", 5.0,
                                            model="deit_tiny_patch16_224 in the DeiT-S launcher"),
    "swin_tiny_patch4_window7_224": OfficialRecipe("_ET_pp_main_swinT.py", "etpp", _ETPP, 0.2, "first-stage", "fp16", 5.0,
                                                   model="swin_tiny"),
    "swin_small_patch4_window7_224": OfficialRecipe("_ET_pp_main_swinS.py", "etpp", _ETPP, 0.3, "first-stage", "fp16",
                                                    5.0, model="swin_small"),
    "swin_base_patch4_window7_224": OfficialRecipe("_ET_pp_main_swinB.py", "etpp", _ETPP, 0.5, "first-stage", "fp16", 5.0,
                                                   model="swin_base"),
    "resnet50": OfficialRecipe("_ET_pp_main_res50.py", "etpp", _ETPP, 0.0, "first-stage", "off", None, builder="torchvision"),
    "convnext_tiny": OfficialRecipe("_ET_pp_main_convnextT.py", "etpp-convnext", _CONVNEXT, 0.1, "first-stage", "off", None,
                                    ema_decay=0.9999),
    "convnext_small": OfficialRecipe("_ET_pp_main_convnextS.py", "etpp-convnext", _CONVNEXT, 0.4, "first-stage", "off",
                                     None, ema_decay=0.9999),
    "convnext_base": OfficialRecipe("_ET_pp_main_convnextB.py", "etpp-convnext", _CONVNEXT, 0.5, "first-stage", "off",
                                    None, ema_decay=0.9999),
}

# the launchers with a replay buffer (_ET_pp_wReplay_main_*.py): per sub-stage (replay times, buffer)
WITH_REPLAY: Dict[str, Tuple[str, Tuple[Tuple[int, int], ...]]] = {
    "deit_small_patch16_224": ("_ET_pp_wReplay_main_deitS.py", ((4, 1920),) * 2 + ((2, 256),) * 4 + ((1, 0),) * 4),
    "resnet50": ("_ET_pp_wReplay_main_res50.py", ((4, 1920),) * 2 + ((2, 256),) * 4 + ((1, 0),) * 4),
    "swin_tiny_patch4_window7_224": ("_ET_pp_wReplay_main_swinT.py", ((2, 1024),) * 2 + ((1, 0),) * 8),
}

# the data recipe every launcher shares (main_buffer.py defaults)
DATA = {"mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "reprob": 0.25, "scale": [0.08, 1.0], "hflip": 0.5}


def drop_path_rate(recipe: OfficialRecipe, epochs: float) -> float:
    """``--drop_path rate * E / 200``, as the launchers scale stochastic depth with the budget."""
    return recipe.drop_path_at_200 * epochs / REFERENCE_EPOCHS


def warmup_epochs(rule: str, epochs: float, final_size: int, first_size: int, first_replay_times: int = 1) -> float:
    """The launchers' warmup in budget epochs (what ``train.warmup_epochs`` counts).

    The first sub-stage runs a schedule of ``int(E * ratio / rt)`` data epochs (ratio
    ``(final / size)^2``) whose first ``w`` epochs warm up: ``w = int(20 / rt)`` (rule
    ``first-stage``) or ``int(0.2 * E * ratio / rt)`` (``budget-share``, DeiT). The warmup is the
    fraction ``w / int(E * ratio / rt)`` of the whole curve, i.e. ``E * w / int(...)`` budget epochs."""
    if rule not in ("first-stage", "budget-share"):
        raise ValueError(f"warmup rule {rule!r}; allowed: first-stage, budget-share")
    ratio = (final_size * final_size) / (first_size * first_size)    # the launchers' epoch_scale_ratio
    total = int(epochs * ratio / first_replay_times)
    warm = int(20 / first_replay_times) if rule == "first-stage" else int(0.2 * epochs * ratio / first_replay_times)
    if total < 1:
        raise ConfigError(f"curriculum.epochs={epochs:g} is too small for the official warmup formula "
                          f"(the first stage's schedule would have {total} epochs)")
    return epochs * warm / total


def recipe_for(name: str) -> OfficialRecipe:
    """The launcher for timm model ``name``, or a ConfigError listing the ones there are."""
    if name not in OFFICIAL:
        raise ConfigError(f"recipe: official has no official EfficientTrain++ launcher for model.name={name!r}; "
                          f"allowed: {', '.join(OFFICIAL)} (CSWin and PVT v1 are not timm models), or recipe: none with "
                          "train.warmup_epochs and model.drop_path set")
    return OFFICIAL[name]


def _close(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def apply_recipe(cfg: Any) -> List[str]:
    """``recipe: official``: fill ``train.warmup_epochs`` and ``model.drop_path`` left null with
    the launcher's formulas, and return report lines: the script reproduced, the derived values,
    then every setting that differs from the launcher (explicit values are kept, and listed).
    ``cfg`` is a :class:`finetune.config.FinetuneConfig`, whose ``validate`` calls this; this module
    does not import it (config imports recipes, never the other way round)."""
    from efficienttrain.curriculum import CurriculumError, get_curriculum

    if cfg.mode != "train":
        raise ConfigError(f"recipe: official is the supervised EfficientTrain++ recipe (mode=train); mode is "
                          f"{cfg.mode!r}: set recipe: none")
    rec = recipe_for(cfg.model.name)
    m, t, d, c = cfg.model, cfg.train, cfg.data, cfg.curriculum
    final = m.img_size or 224
    try:
        cur = get_curriculum(c.name, final, c.multiple_of or (16 if rec.curriculum == "etpp-deit" else 32))
    except (CurriculumError, OSError) as e:
        raise ConfigError(f"curriculum.name: {e}") from None
    first = cur.stages[0]
    replay = tuple((s.replay_times, s.replay_buffer or 0 if s.replay_times > 1 else 0) for s in cur.stages)
    script = rec.script
    if any(rt > 1 for rt, _ in replay):
        if m.name not in WITH_REPLAY:
            raise ConfigError(f"curriculum {cur.name!r} replays samples, and there is no official replay launcher for "
                              f"{m.name} (there are for {', '.join(WITH_REPLAY)}); use a curriculum without replay or "
                              "recipe: none")
        script, official_replay = WITH_REPLAY[m.name]
    lines = [f"recipe official: {script} (model {rec.model or m.name}) at E={c.epochs:g}"]
    derived = []
    w = warmup_epochs(rec.warmup, c.epochs, final, first.size, first.replay_times)
    w_rule = ("int(20/rt) data epochs of the first stage" if rec.warmup == "first-stage"
              else "int(0.2*E*ratio/rt) data epochs of the first stage")
    if t.warmup_epochs is None:
        t.warmup_epochs = w
        derived.append(f"train.warmup_epochs={w:.4g} ({w_rule})")
    dp = drop_path_rate(rec, c.epochs)
    if m.drop_path is None:
        m.drop_path = dp
        derived.append(f"model.drop_path={dp:.4g} ({rec.drop_path_at_200:g} x E/200)")
    if derived:
        lines.append("derived: " + "; ".join(derived))
    dev = []

    def differs(key: str, ours, official, why: str = "") -> None:
        same = _close(ours, official) if isinstance(official, float) or isinstance(ours, float) else ours == official
        if not same:
            def show(v):
                return f"{v:.4g}" if isinstance(v, float) else repr(v)
            dev.append(f"{key}={show(ours)} (official {show(official)}{'; ' + why if why else ''})")

    differs("train.warmup_epochs", t.warmup_epochs, w)
    differs("model.drop_path", m.drop_path, dp)
    differs("curriculum sizes", tuple(s.size for s in cur.stages), tuple(round(s * final / 224) for s in rec.sizes),
            f"curriculum {rec.curriculum}")
    if script != rec.script:
        differs("curriculum replay (times, buffer)", replay, official_replay)
    differs("peak lr", t.base_lr() * OFFICIAL_BATCH / t.batch_size, rec.lr, "compared at batch 4096 (linear scaling)")
    differs("train.batch_size", t.batch_size, OFFICIAL_BATCH)
    differs("train.min_lr", t.min_lr, 1e-6)
    differs("train.weight_decay", t.weight_decay, rec.weight_decay)
    differs("train.betas", list(t.betas), [0.9, 0.999])
    differs("train.clip_grad", t.clip_grad, rec.clip_grad)
    amp = {"auto": "bf16 on capable GPUs", "bf16": "bf16"}.get(t.amp, t.amp)
    differs("train.amp", amp, rec.amp)
    differs("train.ema_decay", getattr(t, "ema_decay", 0.0), rec.ema_decay)
    differs("optimizer", cfg.optimizer, rec.optimizer)
    differs("opt_eps", cfg.opt_eps, rec.opt_eps)
    differs("model.builder", m.builder, rec.builder)
    for key, value in DATA.items():
        differs(f"data.{key}", getattr(d, key), value)
    if d.randaug != "rand-m9-mstd0.5-inc1":
        differs("data.randaug", d.randaug, "rand-m{stage}-mstd0.5-inc1")
    differs("data.lowfreq", d.lowfreq, "cpu-lanczos", "fft is the GPU low-frequency crop of EfficientTrain (ICCV)")
    differs("eval.size", cfg.eval.size, "stage")
    if any(s.replay_times > 1 for s in cur.stages):
        differs("data.replay_chunks", d.replay_chunks, 32)
    if m.name.startswith(("deit", "vit", "swin")):
        differs("model.resize", m.resize, "official")
    lines.append("deviations from the launcher: " + ("; ".join(dev) if dev else "none"))
    return lines
