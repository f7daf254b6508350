"""Classifiers from timm, initialised from our or the official MAE checkpoints.

Loading reports what it did: the keys it dropped on purpose (decoder, mask token, the encoder's
final norm when the classifier pools with fc_norm, a head of another size), the keys the
classifier initialises itself (head, fc_norm), and fails on anything else (a missing block, a
shape that does not fit) instead of training a half-initialised model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import ConfigError
from engine.pos_embed import resample_pos_embed

from .config import ClassifierConfig

_DROP_PREFIXES = ("decoder_", "decoder_blocks.", "mask_token")
_VIT_MODULES = ("vision_transformer", "deit")   # timm modules building (subclasses of) VisionTransformer


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)            # in the file, not used on purpose
    initialised: List[str] = field(default_factory=list)        # in the model, not in the file, expected
    resized: List[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "") if keys else "-"
        return (f"loaded {len(self.loaded)} tensors; resized: {short(self.resized)}; dropped from the file: "
                f"{short(self.dropped)}; initialised here: {short(self.initialised)}")


# timm names of the MAE architectures, and the ViT widths timm names (for files without metadata)
MAE_TO_TIMM = {"mae_vit_tiny_patch16": "vit_tiny_patch16_224", "mae_vit_small_patch16": "vit_small_patch16_224",
               "mae_vit_base_patch16": "vit_base_patch16_224", "mae_vit_large_patch16": "vit_large_patch16_224",
               "mae_vit_huge_patch14": "vit_huge_patch14_224"}
_TIMM_VITS = {192: ("vit_tiny_patch16_224", 16, 12, 3), 384: ("vit_small_patch16_224", 16, 12, 6),
              768: ("vit_base_patch16_224", 16, 12, 12), 1024: ("vit_large_patch16_224", 16, 24, 16),
              1280: ("vit_huge_patch14_224", 14, 32, 16)}
_TIMM_VIT_DEFAULTS = {name: dict(patch_size=p, embed_dim=width, depth=d, num_heads=h)
                      for width, (name, p, d, h) in _TIMM_VITS.items()}
DEFAULT_MODEL, DEFAULT_IMG_SIZE = "vit_base_patch16_224", 224


def _vit_from_state(sd: Dict[str, Any], path: str) -> Tuple[str, Dict[str, Any], int]:
    """(timm name, kwargs, img_size) of a ViT state dict without metadata (an official MAE file)."""
    w = sd.get("patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4:
        raise CheckpointError(f"model.checkpoint {path!r} records no architecture and is not a ViT state dict "
                              "(no patch_embed.proj.weight); set model.name (any timm model) and model.img_size")
    embed, patch = w.shape[0], w.shape[-1]
    if embed not in _TIMM_VITS:
        raise CheckpointError(f"model.checkpoint {path!r}: a ViT of width {embed}, which no standard ViT has "
                              f"(known: {sorted(_TIMM_VITS)}); set model.name and model.kwargs for it")
    name, p0, d0, _ = _TIMM_VITS[embed]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    kwargs = {**({"patch_size": patch} if patch != p0 else {}), **({"depth": depth} if depth != d0 else {})}
    pos = sd.get("pos_embed")
    grid = int(round((pos.shape[1] - 1) ** 0.5)) if isinstance(pos, torch.Tensor) and pos.ndim == 3 else 0
    return name, kwargs, grid * patch if grid else DEFAULT_IMG_SIZE


def resolve_architecture(cfg: ClassifierConfig, ckpt: Optional[Dict[str, Any]]) -> str:
    """Fill ``model.name: auto`` and ``model.img_size: null`` from ``model.checkpoint`` (``ckpt``,
    loaded): its metadata (our MAE pretraining, encoder export or classifier checkpoints), or the
    shapes of an official MAE / timm ViT file. Explicit values are kept; ``model.kwargs`` given by
    the user win over the derived ones. Returns a line saying what was taken from where."""
    meta = ckpt.get("meta") if isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) else {}
    taken = []
    if cfg.name == "auto":
        if ckpt is None:
            raise ConfigError("model.name=auto takes the architecture from model.checkpoint, and none is set; set "
                              "model.name (any timm model, e.g. resnet50 or vit_base_patch16_224) or model.checkpoint")
        if meta.get("arch") in MAE_TO_TIMM:               # our MAE pretraining / encoder export
            name, size = MAE_TO_TIMM[meta["arch"]], meta.get("img_size")
            mk = meta.get("model_kwargs") or {}
            default = _TIMM_VIT_DEFAULTS[name]      # the MAE encoder's shapes (pretrain's ARCHS) are timm's
            derived = {k: mk[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")
                       if k in mk and mk[k] != default[k]}
        elif meta.get("model_name"):                      # our fine-tuned / probed classifier
            name, derived, size = meta["model_name"], dict(meta.get("model_kwargs") or {}), meta.get("img_size")
            if meta.get("builder", "timm") != cfg.builder:
                cfg.builder = meta["builder"]
                taken.append(f"model.builder={cfg.builder}")
        else:                                             # an official file: read the shapes
            sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
            name, derived, size = _vit_from_state(sd if isinstance(sd, dict) else {}, cfg.checkpoint)
        cfg.name = name
        cfg.kwargs = {**derived, **cfg.kwargs}
        taken.append(f"model.name={name}" + (f" model.kwargs={cfg.kwargs}" if cfg.kwargs else ""))
        if cfg.img_size is None and size:
            cfg.img_size = int(size)
            taken.append(f"model.img_size={cfg.img_size}")
    if cfg.img_size is None:
        cfg.img_size = int(meta.get("img_size") or DEFAULT_IMG_SIZE)
        taken.append(f"model.img_size={cfg.img_size}")
    return f"from {cfg.checkpoint or 'the defaults'}: {' '.join(taken)}" if taken else ""


def create_classifier(cfg: ClassifierConfig, dynamic_size: bool = False) -> nn.Module:
    """timm model ``cfg.name``; ViTs are built for ``img_size`` and get ``global_pool`` and, for
    curriculum training, ``dynamic_img_size``. With ``model.resize=forward`` the position table
    stays at the final grid and is resampled in every forward pass; with ``official`` the training
    task re-makes it at each stage's grid (:mod:`finetune.resize`), so a forward pass at the stage
    size uses it as it is and only other sizes (a FLOPs count, an ad-hoc evaluation) resample it."""
    if cfg.builder == "torchvision":
        # the official ET++ ResNet-50: torchvision's resnet50() (every BN gamma 1; timm zero-inits
        # each block's last one), trained in fp32
        import torchvision

        return torchvision.models.get_model(cfg.name, weights=None, num_classes=cfg.num_classes, **cfg.kwargs)
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("drop_path_rate", cfg.drop_path)
    if not timm.is_model(cfg.name):     # from_dict checked the config; a name resolved from a file is checked here
        raise ConfigError(f"model.name: {cfg.name!r} is not a timm model; allowed: any name of timm.list_models()")
    is_vit = timm.models.model_entrypoint(cfg.name).__module__.split(".")[-1] in _VIT_MODULES
    if is_vit:
        kwargs.setdefault("img_size", cfg.img_size)
        kwargs.setdefault("global_pool", cfg.global_pool)
        if dynamic_size:
            kwargs.setdefault("dynamic_img_size", True)
    return timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, **kwargs)


def _encoder_state(sd: Dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> Dict[str, torch.Tensor]:
    own = model.state_dict()
    uses_fc_norm = isinstance(getattr(model, "fc_norm", None), nn.LayerNorm)
    out = {}
    for k, v in sd.items():
        if k.startswith(_DROP_PREFIXES):
            report.dropped.append(k)
        elif uses_fc_norm and k.startswith("norm."):
            report.dropped.append(k)           # MAE fine-tuning pools with a fresh fc_norm instead
        elif k.startswith("head.") and (k not in own or own[k].shape != v.shape):
            report.dropped.append(k)           # a head for another number of classes
        else:
            out[k] = v
    return out


def load_pretrained(model: nn.Module, path: str, ckpt: Optional[Dict[str, Any]] = None) -> LoadReport:
    """Load an encoder (our MAE pretraining / encoder export / fine-tuned checkpoint, or an official
    MAE file) into a timm ViT, interpolating position embeddings to the model's grid. ``ckpt``: the
    file's content when the caller already loaded it. Raises :class:`CheckpointError` (naming
    the file, what does not fit and how) for a file that does not fit the model."""
    if ckpt is None:
        ckpt = load_checkpoint(path, "model.checkpoint")
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"model.checkpoint {path!r}: no state dict found (expected {{'model': state_dict}} "
                              "or a state dict)")
    report = LoadReport()
    sd = _encoder_state(sd, model, report)
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, num_prefix_tokens=n_prefix)
        report.resized.append("pos_embed")
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and own[k].shape != v.shape]
    unexpected = [k for k in sd if k not in own]
    if bad_shapes or unexpected:
        raise CheckpointError(
            f"model.checkpoint {path!r} does not fit {type(model).__name__}: shape mismatches {bad_shapes[:6] or '-'}; "
            f"unexpected keys {unexpected[:8] or '-'}. Is it the right architecture / patch size? model.name=auto "
            f"(the default) reads it from our checkpoints; otherwise set model.name / model.kwargs to match the file")
    missing = [k for k in own if k not in sd]
    allowed_missing = [k for k in missing if k.startswith(("head.", "fc_norm."))]
    real_missing = [k for k in missing if k not in allowed_missing]
    if real_missing:
        raise CheckpointError(f"model.checkpoint {path!r} lacks weights the model needs: {real_missing[:8]}"
                              f"{' ...' if len(real_missing) > 8 else ''} ({len(real_missing)} keys); set "
                              f"model.name / model.kwargs to the file's architecture")
    model.load_state_dict(sd, strict=False)
    report.loaded = sorted(sd)
    report.initialised = allowed_missing
    return report


def init_head(model: nn.Module, std: float) -> None:
    """Head as MAE initialises it: truncated normal (2e-5 fine-tuning, 0.01 linear probing), zero bias."""
    head = model.get_classifier()
    trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)


def make_linear_probe(model: VisionTransformer) -> nn.Module:
    """Freeze everything; the head becomes BatchNorm (no affine, eps 1e-6) + linear, as MAE's probe."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"mode=linprobe is implemented for timm VisionTransformer models; model.name gives a "
                          f"{type(model).__name__}")
    init_head(model, std=0.01)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    return model


def classifier_depth(model: nn.Module) -> int:
    """Number of transformer blocks (for layer decay); 0 for models without ``blocks``."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else 0


def check_resizable(model: nn.Module, size: int) -> Tuple[bool, str]:
    """Prepare ``model`` for input ``size`` without changing any parameter, or say why not
    (``model.resize=forward``, and every model but Swin / ViT with ``official``).

    ConvNets need nothing; ViTs need ``dynamic_img_size`` (position embeddings resampled in the
    forward pass); Swin-like models keep their window size and pad feature maps to whole windows
    (``always_partition``), so relative-position tables keep their shape at every size.
    """
    if isinstance(model, VisionTransformer):
        ok = getattr(model, "dynamic_img_size", False) or tuple(model.patch_embed.img_size) == (size, size)
        return ok, "" if ok else "the ViT was built for one input size (without dynamic_img_size)"
    set_size = getattr(model, "set_input_size", None)
    if not callable(set_size):
        return True, ""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    kwargs = {"img_size": (size, size)}
    params = inspect.signature(set_size).parameters
    if "always_partition" in params and "window_size" in params:
        window = getattr(model, "_et_window", None)
        if window is None:
            first = next((m for m in model.modules() if hasattr(m, "window_size") and m is not model), None)
            window = tuple(first.window_size) if first is not None else None
            model._et_window = window
        kwargs.update(window_size=window, always_partition=True)
    try:
        set_size(**kwargs)
    except Exception as e:
        return False, f"set_input_size({size}) failed: {type(e).__name__}: {e}"
    changed = [k for k, v in model.state_dict().items() if k in shapes and v.shape != shapes[k]]
    if changed:
        return False, f"changing the input size re-shapes parameters {changed[:4]}"
    return True, ""
