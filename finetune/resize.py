"""Stage-size changes of Swin and ViT classifiers as the official EfficientTrain++ code makes them.

Why: the official code trains every curriculum stage as a new process whose model is built for
the stage's input size, and carries the previous stage's checkpoint over
(``utils_buffer.py: auto_load_model -> update_ckpt``):

- Swin is built with ``window_size = img_size // 32`` (3 at 96, 5 at 160, 7 at 224; a block whose
  map is no bigger than the window uses the map as its window and no shift). Its
  ``relative_position_bias_table`` ((2w-1)^2 x heads) is bilinearly interpolated
  (``align_corners=False``, no antialiasing) to the new window, and so are the AdamW moments
  ``exp_avg`` / ``exp_avg_sq`` of those tables; index buffers and shift masks are rebuilt.
- DeiT is built for the stage grid (``img_size / 16``); its ``pos_embed`` grid part is
  bilinearly interpolated (same call) from the previous stage's grid, the class-token entry
  kept, and the AdamW moments of ``pos_embed`` likewise. Each stage starts from the previous
  one's table: 6 -> 10 -> 12 -> 14 for 96/160/192/224.
- The first stage builds the model at its own size, so a randomly initialised model starts with
  tables drawn at the first stage's shape (truncated normal, std 0.02), not with a
  downsampled final-size table.

Here one model and one optimizer live through the whole run, so the same happens in place:
:func:`prepare_for_size` gives the model the stage's geometry and new ``nn.Parameter`` objects of
the stage's shapes, and returns :class:`Swap` records; :func:`move_optimizer_state` moves the
optimizer's param_groups references and per-parameter state onto the new parameters, transforming
every state tensor of the parameter's shape (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
LARS / SGD ``momentum_buffer``, Lamb's moments) with the interpolation the weights got; scalar
state (``step``) is kept.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_STD = 0.02          # timm's and the official init of position tables: trunc_normal_(std=.02), cut at +-2

Transform = Callable[[torch.Tensor], torch.Tensor]


class Swap(NamedTuple):
    """One replaced parameter: ``transform`` maps a tensor of ``old``'s shape (the weights, an
    optimizer moment) to ``new``'s shape."""

    name: str
    old: nn.Parameter
    new: nn.Parameter
    transform: Transform


def _bilinear(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """[C, h, w] -> [C, *size]: the official call (bilinear, align_corners=False, no antialias),
    computed in float32 and returned in ``x``'s dtype."""
    out = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)
    return out[0].to(x.dtype)


def resize_rel_pos_table(table: torch.Tensor, old_window: Tuple[int, int], new_window: Tuple[int, int]) -> torch.Tensor:
    """A Swin relative-position bias table ``[(2h-1)(2w-1), heads]`` for ``old_window``,
    interpolated to ``new_window`` (the table as a (2h-1) x (2w-1) map per head)."""
    lh, lw = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    heads = table.shape[-1]
    grid = table.reshape(lh, lw, heads).permute(2, 0, 1)
    return _bilinear(grid, (nh, nw)).permute(1, 2, 0).reshape(nh * nw, heads)


def resize_pos_embed(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                     num_prefix_tokens: int) -> torch.Tensor:
    """A ViT position table ``[1, prefix + h*w, C]`` for ``old_grid``, its grid part interpolated
    to ``new_grid``; the prefix (class / distillation / register token) entries are kept."""
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    c = grid.shape[-1]
    grid = grid[0].transpose(0, 1).reshape(c, old_grid[0], old_grid[1])
    grid = _bilinear(grid, tuple(new_grid)).reshape(c, -1).transpose(0, 1)[None]
    return torch.cat([prefix, grid], dim=1)


def _new_param(old: nn.Parameter, value: torch.Tensor, init: Optional[torch.Generator]) -> nn.Parameter:
    """The replacement of ``old``: ``value`` (the interpolation), or a fresh draw of ``value``'s
    shape from ``init`` (a generator; the init's cut at +-2 is 100 standard deviations away, so a
    clamped normal draws the same distribution)."""
    if init is not None:
        value = (torch.randn(value.shape, generator=init) * INIT_STD).clamp_(-2.0, 2.0)
        value = value.to(device=old.device, dtype=old.dtype)
    return nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)


# ---- which models ------------------------------------------------------------------------------
def is_swin(model: nn.Module) -> bool:
    """timm Swin Transformers (v1 and v2): ``set_input_size`` that changes the window."""
    set_size = getattr(model, "set_input_size", None)
    if not callable(set_size) or not type(model).__name__.startswith("SwinTransformer"):
        return False
    params = inspect.signature(set_size).parameters
    return "window_size" in params and "always_partition" in params


def is_vit(model: nn.Module) -> bool:
    """timm ViTs (DeiT included) with a learned position table."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and isinstance(getattr(model, "pos_embed", None), nn.Parameter)


def handles(model: nn.Module) -> bool:
    """Whether ``resize: official`` re-shapes this model per stage (Swin, ViT)."""
    return is_swin(model) or is_vit(model)


def current_size(model: nn.Module) -> int:
    """The (square) input size the model is prepared for."""
    return int(model.patch_embed.img_size[0])


# ---- preparation -------------------------------------------------------------------------------
def _stage_windows(model: nn.Module, size: int) -> Tuple[int, ...]:
    """Per-stage Swin windows at ``size``: the windows of the model as built, scaled with its patch
    grid and floored (the official ``size // 32`` for window 7 at 224 and window 12 at 384)."""
    ref = getattr(model, "_et_ref_windows", None)
    if ref is None:
        grid = int(model.patch_embed.grid_size[0])
        ref = (grid, tuple(int(stage.blocks[0].window_size[0]) for stage in model.layers))
        model._et_ref_windows = ref
    grid, windows = ref
    new_grid = size // int(model.patch_embed.patch_size[0])
    return tuple(max(1, w * new_grid // grid) for w in windows)


def prepare_swin(model: nn.Module, size: int, init: Optional[torch.Generator] = None) -> List[Swap]:
    """Give a timm Swin the official geometry for ``size`` (see the module docstring): windows
    scaled with the input, no forced partitioning, so a map no bigger than its window is one
    window without shift (index buffers and masks rebuilt by timm). Every relative-position table
    whose window changed is replaced by the bilinear interpolation of the current one (or a fresh
    draw, ``init``). Returns the swaps (none when the size does not change)."""
    if current_size(model) == size:
        return []
    windows = _stage_windows(model, size)
    before = dict(model.named_parameters())
    old_windows = {n: tuple(m.window_size) for n, m in model.named_modules() if hasattr(m, "relative_position_bias_table")}
    arg = windows[0] if len(set(windows)) == 1 else tuple((w, w) for w in windows)
    with warnings.catch_warnings():     # timm resizes the tables its own way (replaced below); quiet its warnings
        warnings.simplefilter("ignore", UserWarning)
        model.set_input_size(img_size=(size, size), window_size=arg, always_partition=False)
    swaps = []
    for name, p in list(model.named_parameters()):
        old = before.get(name)
        if old is None or p is old:
            continue
        module_name, _, attr = name.rpartition(".")
        if attr != "relative_position_bias_table" or module_name not in old_windows:
            raise RuntimeError(f"set_input_size({size}) replaced parameter {name!r}, which resize=official does "
                               "not know how to carry over")
        module = model.get_submodule(module_name)
        ow, nw = old_windows[module_name], tuple(module.window_size)
        transform = (lambda ow, nw: lambda t: resize_rel_pos_table(t, ow, nw))(ow, nw)
        new = _new_param(old, transform(old.detach()), init)
        setattr(module, attr, new)
        swaps.append(Swap(name, old, new, transform))
    return swaps


def prepare_vit(model: nn.Module, size: int, init: Optional[torch.Generator] = None) -> List[Swap]:
    """Set a timm ViT's patch grid to ``size`` and replace ``pos_embed`` by the bilinear
    interpolation of the current table to the new grid (class-token entries kept), or a fresh
    draw (``init``). Returns the swaps (none when the grid does not change)."""
    old_grid = tuple(model.patch_embed.grid_size)
    model.patch_embed.set_input_size(img_size=(size, size))
    new_grid = tuple(model.patch_embed.grid_size)
    if new_grid == old_grid:
        return []
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old = model.pos_embed
    transform = lambda t: resize_pos_embed(t, old_grid, new_grid, prefix)   # noqa: E731
    new = _new_param(old, transform(old.detach()), init)
    model.pos_embed = new
    return [Swap("pos_embed", old, new, transform)]


def prepare_for_size(model: nn.Module, size: int, init: Optional[torch.Generator] = None) -> List[Swap]:
    """:func:`prepare_swin` / :func:`prepare_vit` for ``model``; other models: nothing (``[]``)."""
    if is_swin(model):
        return prepare_swin(model, size, init)
    if is_vit(model):
        return prepare_vit(model, size, init)
    return []


# ---- the optimizer -----------------------------------------------------------------------------
def move_optimizer_state(optimizer: torch.optim.Optimizer, swaps: Sequence[Swap]) -> None:
    """Put each swap's new parameter where the old one was in ``optimizer.param_groups`` (same
    group, same position: per-group lr scale / weight decay and the state_dict order are kept)
    and move its state: tensors of the old parameter's shape through the swap's transform (in
    their own dtype and device), scalars (``step``) as they are. Works for torch AdamW (fused,
    foreach or not), SGD, timm Lamb and LARS, which keep only such state. Raises on any other
    tensor state instead of silently dropping it."""
    if not swaps:
        return
    by_old: Dict[int, Swap] = {id(s.old): s for s in swaps}
    for group in optimizer.param_groups:
        group["params"] = [by_old[id(p)].new if id(p) in by_old else p for p in group["params"]]
    for s in swaps:
        state = optimizer.state.pop(s.old, None)
        if not state:
            continue
        moved = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.shape != s.old.shape:
                    raise RuntimeError(f"{type(optimizer).__name__} state {key!r} of {s.name} has shape "
                                       f"{tuple(value.shape)}, not the parameter's {tuple(s.old.shape)}: cannot carry "
                                       "it over a stage-size change")
                value = s.transform(value)
            moved[key] = value
        optimizer.state[s.new] = moved
