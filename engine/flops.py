"""Training FLOPs per sample of a model at every curriculum size, and the compute saving they imply.

Why: curricula are defined and planned with the pixel cost (one sample at input size B costs B^2,
:func:`efficienttrain.curriculum.pixel_cost`, as the official code). Real models deviate from it:
ViT attention is quadratic in the tokens, Swin trained the official way changes its window with
the input (``window_size = size // 32``), a padded Swin pays for the padding, MAE's encoder sees
only the unmasked tokens while its decoder sees all. The saving a run really buys is the samples
its (pixel-planned) stages process, weighted by what a sample costs *this model* at each stage
size; this module measures that cost once per size and turns it into the saving.

How it counts: ``torch.utils.flop_counter.FlopCounterMode`` around one forward pass of the
model's training loss and its backward pass, on a batch of 2 (BatchNorm in training needs more
than one value per channel), divided by 2. As every FLOPs table, it counts the matmuls and
convolutions (forward and backward: grad of inputs and of the trainable weights), not
element-wise ops, norms or softmax. A convolution's backward is counted as twice its forward
(input and weight gradients; :func:`_conv_backward_flop`), since torch's formula ignores groups.

- Device: ``meta`` by default. Meta tensors carry shapes and no data, so the count needs no memory
  and takes well under a second even for ViT-H, draws no random numbers, and equals the CPU count
  (checked in tests/test_flops.py for ViT, Swin, MAE and a ConvNet). A model whose construction or
  forward pass needs real values (``.item()``, ``.tolist()``, data-dependent shapes such as
  ``nonzero``) cannot run on meta; it is counted on the CPU instead (``log`` says so), inside
  ``torch.random.fork_rng`` so that building it draws nothing from the run's generator.
- Attention: counted with PyTorch's math backend of ``scaled_dot_product_attention``. The fused
  CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula in
  FlopCounterMode, so on the CPU the attention matmuls would silently count as zero; the math
  backend makes them plain ``bmm``s, counted the same on every device.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from efficienttrain.curriculum import CostFn, Curriculum, pixel_cost

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Build = Callable[[int], Tuple[nn.Module, LossFn]]   # input size -> (model prepared for it, its training loss)
RESIZE_MODES = ("official", "forward")
DIFFERENCE_NOTE = 0.05   # FLOP-based and pixel savings further apart than this (relative) get a log line


class FlopsError(ValueError):
    """A model that cannot be built or run at a size, or an unknown model name (says which and why)."""


def classifier_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stand-in classification loss (the head's logits reduced to a scalar): the loss itself costs
    next to nothing, what matters is that backward runs through the whole model."""
    return model(x).float().logsumexp(-1).sum()


@contextlib.contextmanager
def _counting_context() -> Iterator[None]:
    """No RNG draw reaches the caller, and attention runs as countable matmuls (module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        yield


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """Backward of a convolution: the input gradient and the weight gradient each take the
    forward's multiply-adds. torch's own formula (2.13) ignores ``groups`` and counts a depthwise
    convolution's backward as a dense one (ConvNeXt-T: 52 GFLOP instead of about 1.2 per pair of
    images), so this replaces it with the forward count, which handles groups through ``w_shape``."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_training_flops(model: nn.Module, loss_fn: LossFn, size: int, batch: int = 2, in_chans: int = 3) -> float:
    """FLOPs of one forward + backward of ``loss_fn`` per sample at ``size x size`` on the device of
    ``model``'s parameters (meta or CPU). The caller's RNG state is kept."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    with _counting_context():
        x = torch.zeros(batch, in_chans, size, size, device=device)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) \
                as counter:
            loss = loss_fn(model, x)
            if loss.requires_grad:
                loss.backward()
    return float(counter.get_total_flops()) / batch


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, FlopsError) else f"{type(e).__name__}: {text}"


def _build_and_count(build: Build, size: int, device: str, batch: int, in_chans: int) -> float:
    with _counting_context(), torch.device(device):
        model, loss_fn = build(size)
    model.train()
    return count_training_flops(model, loss_fn, size, batch, in_chans)


def flops_per_sample(build: Build, sizes: Iterable[int], device: str = "meta", batch: int = 2, in_chans: int = 3,
                     log: Optional[Callable[[str], None]] = None) -> Dict[int, float]:
    """Training FLOPs (forward + backward) per sample at every distinct size in ``sizes``.

    ``build(size)`` returns the model prepared for ``size`` the way training prepares it, and its
    loss ``loss_fn(model, images)``; it runs under ``torch.device(device)``, so its modules are
    created on that device (it must not move them elsewhere). On ``meta`` (the default) a model
    that cannot run there is built and counted again on the CPU, and ``log`` says so. Raises
    :class:`FlopsError` naming the size when the model cannot be built or run at a size at all."""
    out: Dict[int, float] = {}
    for size in sorted(set(int(s) for s in sizes)):
        try:
            out[size] = _build_and_count(build, size, device, batch, in_chans)
            continue
        except Exception as e:       # noqa: BLE001 - any failure: try the CPU, which tells a real error apart
            first = e
        if device == "cpu":
            raise FlopsError(f"the model cannot be built or run at input size {size}: {_why(first)}") from None
        try:
            out[size] = _build_and_count(build, size, "cpu", batch, in_chans)
        except Exception as e:       # noqa: BLE001
            raise FlopsError(f"the model cannot be built or run at input size {size}: {_why(e)}") from None
        if log is not None:
            log(f"FLOPs at {size}px counted on the CPU: the model cannot run on the {device} device ({_why(first)})")
    return out


# ---- from FLOPs per sample to the saving -----------------------------------------------------------
def cost_from_table(per_size: Dict[int, float]) -> CostFn:
    """A measured per-size table as a ``CostFn`` (for ``Curriculum.compute`` / ``speedup`` in
    ``epochs`` mode). Do not plan a ``compute``-budget curriculum with it unless the run is planned
    with it too: in compute mode the cost function decides the samples per stage, so
    ``speedup(cost=...)`` would answer for another plan than the pixel-planned one a run trains."""
    def cost(size: int) -> float:
        if size not in per_size:
            raise FlopsError(f"no FLOPs measured at size {size}; measured: {sorted(per_size)}")
        return per_size[size]
    return cost


def flop_ratios(per_size: Dict[int, float], final_size: int) -> Dict[int, float]:
    """Cost of a sample at every size relative to the final size."""
    return {s: v / per_size[final_size] for s, v in sorted(per_size.items())}


def stage_flops(curriculum: Curriculum, epochs: float, per_size: Dict[int, float]) -> List[float]:
    """Per stage, training FLOPs per image of the data set: the samples the pixel-planned stage
    processes (``Curriculum.sample_epochs`` with the pixel cost, what a run trains) times the
    measured FLOPs per sample at its size."""
    cost = cost_from_table(per_size)
    return [se * cost(st.size) for se, st in zip(curriculum.sample_epochs(epochs, pixel_cost), curriculum.stages)]


def flop_saving(curriculum: Curriculum, epochs: float, baseline_epochs: Optional[float],
                per_size: Dict[int, float]) -> float:
    """The compute saving in measured FLOPs: ``baseline_epochs`` (default ``epochs``) at the final
    size over the curriculum's pixel-planned samples, each weighted by its size's FLOPs per sample.
    In ``epochs`` mode this equals ``curriculum.speedup(epochs, baseline_epochs, cost_from_table(per_size))``."""
    baseline_epochs = epochs if baseline_epochs is None else baseline_epochs
    return baseline_epochs * cost_from_table(per_size)(curriculum.final_size) / sum(
        stage_flops(curriculum, epochs, per_size))


def planned_savings(build: Build, curriculum: Curriculum, epochs: float, baseline_epochs: Optional[float],
                    in_chans: int = 3, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Both savings of a plan: ``pixel_saving`` (``curriculum.speedup``) and ``flops_saving``
    (:func:`flop_saving` over :func:`flops_per_sample` of ``build``), with ``flops_per_sample``
    (str size -> FLOPs) and ``flops_ratio`` (str size -> relative to the final size). A curriculum
    with one size needs no count: both savings are ``baseline_epochs / epochs`` there."""
    baseline_epochs = epochs if baseline_epochs is None else baseline_epochs
    pixel = curriculum.speedup(epochs, baseline_epochs)
    sizes = sorted({st.size for st in curriculum.stages})
    if len(sizes) == 1:
        return {"pixel_saving": pixel, "flops_saving": pixel, "flops_per_sample": {}, "flops_ratio": {}}
    per_size = flops_per_sample(build, sizes, in_chans=in_chans, log=log)
    return {"pixel_saving": pixel, "flops_saving": flop_saving(curriculum, epochs, baseline_epochs, per_size),
            "flops_per_sample": {str(s): v for s, v in per_size.items()},
            "flops_ratio": {str(s): r for s, r in flop_ratios(per_size, curriculum.final_size).items()}}


def format_savings(savings: Dict[str, Any], baseline_epochs: float, what: str = "this model") -> List[str]:
    """The lines a run logs: both savings, the per-size FLOP ratios, and a note when the two differ
    by more than :data:`DIFFERENCE_NOTE`. No lines for a plan that saves nothing (one input size and
    the baseline's budget: both would read 1.00x); a saving below 1 reads "1.10x more compute"."""
    pixel, flops = savings["pixel_saving"], savings["flops_saving"]
    if not savings["flops_ratio"] and abs(pixel - 1.0) < 0.005 and abs(flops - 1.0) < 0.005:
        return []

    def saving(x: float) -> str:            # a saving below 1 is a cost: worded the right way round
        return f"{x:.2f}x" if x >= 0.995 else f"{1.0 / x:.2f}x more compute"

    ratios = ", ".join(f"{s}px {r:.3f}" for s, r in savings["flops_ratio"].items())
    lines = [f"planned saving vs {baseline_epochs:g} epochs at the final size: {saving(pixel)} by pixel cost (B^2), "
             f"{saving(flops)} by {what}'s training FLOPs"
             + (f" (forward + backward per sample relative to the final size: {ratios})" if ratios
                else " (one input size: the same)")]
    if abs(flops / pixel - 1) > DIFFERENCE_NOTE:
        lines.append(f"note: the FLOP-based saving {flops:.2f}x differs from the pixel-planned {pixel:.2f}x by "
                     f"{flops / pixel - 1:+.0%}; the budget is planned in pixel cost, {what}'s compute follows the FLOPs")
    return lines


def log_planned_savings(build: Build, curriculum: Curriculum, epochs: float, baseline_epochs: Optional[float],
                        log: Callable[[str], None], what: str = "this model") -> Optional[Dict[str, Any]]:
    """What a training run calls where it states its plan: logs :func:`format_savings` of
    :func:`planned_savings` and returns that dict (None, with a line saying why, when the model
    cannot be counted: the run itself goes on unchanged). Draws no random numbers."""
    baseline_epochs = epochs if baseline_epochs is None else baseline_epochs
    try:
        savings = planned_savings(build, curriculum, epochs, baseline_epochs, log=log)
    except FlopsError as e:
        log(f"planned saving: {curriculum.speedup(epochs, baseline_epochs):.2f}x by pixel cost (B^2); "
            f"FLOP-based saving not available: {e}")
        return None
    for line in format_savings(savings, baseline_epochs, what):
        log(line)
    return savings


# ---- models prepared per size ------------------------------------------------------------------------
def is_swin(name: str) -> bool:
    """timm Swin Transformers (``swin_*``, ``swinv2_*``), which the official code trains at a smaller
    size with a smaller window."""
    return name.startswith("swin")


def swin_window(size: int) -> int:
    """The official EfficientTrain++ window rule for Swin: one window covers the last stage's map
    (input / 32): 3 at 96, 5 at 160, 6 at 192, 7 at 224, 12 at 384."""
    return size // 32


def timm_size_kwargs(name: str, size: int, accepts_img_size: bool, resize: str = "official") -> Dict[str, Any]:
    """``timm.create_model`` arguments that prepare ``name`` for ``size`` as the official code
    trains it: Swin ``img_size`` + ``window_size = size // 32`` (``resize='official'``); models
    built for an input size (ViT, DeiT, ...: ``accepts_img_size``) ``img_size``; ConvNets nothing."""
    if resize not in RESIZE_MODES:
        raise FlopsError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if is_swin(name) and resize == "official":
        return {"img_size": size, "window_size": swin_window(size)}
    return {"img_size": size} if accepts_img_size else {}


def check_timm_name(name: str) -> None:
    """Raise :class:`FlopsError` with close matches for a name timm does not know."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        raise FlopsError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                            "; see timm.list_models()"))


def _accepts_img_size(model: nn.Module) -> bool:
    """Whether the model's class (or a base it passes ``**kwargs`` on to, e.g. DeiT's distilled
    ViT) takes ``img_size``."""
    return any("img_size" in inspect.signature(cls.__init__).parameters
               for cls in type(model).__mro__ if issubclass(cls, nn.Module) and cls is not nn.Module)


def timm_builder(name: str, num_classes: int = 1000, resize: str = "official", **kwargs: Any) -> Build:
    """A :data:`Build` for the timm model ``name`` built for each size by :func:`timm_size_kwargs`
    (``kwargs`` go to every ``timm.create_model`` call; the size-specific ones win)."""
    import timm

    check_timm_name(name)
    accepts: List[bool] = []

    def build(size: int) -> Tuple[nn.Module, LossFn]:
        if not accepts:     # ask the model class once (a default build: cheap on meta)
            accepts.append(_accepts_img_size(timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)))
        extra = timm_size_kwargs(name, size, accepts[0], resize)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **{**kwargs, **extra})
        except Exception as e:       # noqa: BLE001 - say which arguments the size asked for
            shown = ", ".join(f"{k}={v}" for k, v in extra.items()) or "its defaults"
            raise FlopsError(f"timm.create_model({name!r}) with {shown} failed: {_why(e)}") from e
        return model, classifier_loss

    return build
