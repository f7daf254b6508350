"""AutoProg growth on a list of blocks: the growth operators, the elastic supernet and an
active-layer ``nn.Sequential`` that runs only the chosen blocks.

Representation. The model is built at full depth once; its block list has ``num_slots`` slots and
the optimizer holds every parameter from the start. A sub-network's depth is an *order*: the tuple
of active slot indices in execution order. Growing chooses free slots, initialises them (from the
source the operator names) and inserts them into the order; nothing is created or removed, so
there is no optimizer surgery, and (order, state dicts) resume a run exactly, growth steps
included. Inactive slots get no gradient (leave ``zero_grad(set_to_none=True)``, torch's default,
so AdamW neither decays nor updates them). After growth the order need not be sorted;
:func:`ordered_state_dict` writes the standard, renumbered layout (export, or a standalone
sub-network).

Operators (Sec. 3.3, Fig. 2), growing ``l_s`` -> ``l_l`` layers:
- ``interpolation``: new layers are inserted right after the layer they copy (nearest neighbour),
  one per original layer starting from the final layers and going backwards, round-robin when
  ``l_l > 2 l_s`` (6 -> 8: 0 1 2 3 4 4' 5 5'; 2 -> 4: A A' B B'; 5 -> 12 copies 2,2,2,3,3 times).
- ``stacking``: copies of the network stacked on top, from its first layer, cyclically
  (2 -> 4: A B A' B'; 6 -> 8: 0..5 0' 1').
- ``randinit``: new layers where Interpolation puts them, re-initialised (``init_fn``; default
  :func:`reset_block`, timm's ViT init) instead of copied, so the ablation isolates the init.
- ``mogrow``: Interpolation copying from the momentum network (Eq. 4,
  zeta_MoGrow(w) = zeta_Interpolation(w~)): new slots copy their source's momentum weights, and with
  ``copy_existing`` (default, Eq. 4 literally) the kept layers take their momentum weights too. The
  momentum network grows the same way (its new slots copy its sources), so its average stays
  meaningful. Eq. 4 covers the non-block parameters too (embeddings, norm, head): the caller loads
  those from the momentum network; this module only knows blocks. m = 0.998 (``MOGROW_MOMENTUM``).
- ``identity``: Interpolation + ReZero. ReZero scales a new layer's residual branches by a zero-
  initialised learnable factor, so growth preserves the function. On timm blocks it is realised with
  their LayerScale (``ls1.gamma``, ``ls2.gamma``, present when the model is built with
  ``init_values``, e.g. 1.0 which leaves the original layers' function unchanged): the new layers'
  gammas are set to zero. Unlike ReZero's single scalar this is one learnable factor per channel
  (a wrapper with a scalar would add parameters after the optimizer was built, or change the
  state-dict layout). Blocks without LayerScale are refused.

Elastic supernet (Sec. 4.3): :func:`build_supernet` grows the last chosen sub-network with an
interpolation-placed operator to the largest candidate depth; the original layers are always active
and the inserted ones optional, activated in insertion order (from the final layers). The
sub-network of depth d is therefore exactly the Interpolation growth to d (which the paper requires,
and which a "first d layers" elastic depth would break), and the supernet is weight-nesting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .growth import GrowthError, SubNet, sample_candidate

GROWTH_OPS = ("randinit", "stacking", "interpolation", "mogrow", "identity")
INTERPOLATING_OPS = ("randinit", "interpolation", "mogrow", "identity")
MOGROW_MOMENTUM = 0.998          # Eq. 3, m


def insertion_sources(prev_depth: int, extra: int) -> Tuple[int, ...]:
    """Interpolation: the position (in the smaller network) copied by the 1st, 2nd, ... inserted
    layer: the final layer first, then backwards, round-robin."""
    if prev_depth < 1 or extra < 0:
        raise GrowthError(f"cannot insert {extra} layers into a {prev_depth}-layer network")
    return tuple(prev_depth - 1 - (j % prev_depth) for j in range(extra))


def interpolation_sources(prev_depth: int, new_depth: int) -> Tuple[int, ...]:
    """Interpolation ``prev_depth`` -> ``new_depth``: for each layer of the grown network, the
    position in the smaller one it copies (its nearest neighbour)."""
    if new_depth < prev_depth:
        raise GrowthError(f"growth cannot shrink {prev_depth} -> {new_depth} layers")
    counts = [1] * prev_depth
    for p in insertion_sources(prev_depth, new_depth - prev_depth):
        counts[p] += 1
    return tuple(i for i in range(prev_depth) for _ in range(counts[i]))


@dataclass(frozen=True)
class GrowthPlan:
    """A growth step on slot indices: the new execution ``order``, the newly activated slots (in
    insertion order) and, per new slot, the old slot it copies or sits next to (``sources``)."""

    order: Tuple[int, ...]
    new_slots: Tuple[int, ...]
    sources: Tuple[Tuple[int, int], ...]   # (new slot, source slot)


def _check_order(order: Sequence[int], num_slots: int) -> Tuple[int, ...]:
    order = tuple(int(s) for s in order)
    if not order:
        raise GrowthError("active-layer order is empty; a sub-network needs at least one block")
    if len(set(order)) != len(order) or not all(0 <= s < num_slots for s in order):
        raise GrowthError(f"active-layer order {list(order)} must hold distinct slots in 0..{num_slots - 1}")
    return order


def plan_growth(order: Sequence[int], num_slots: int, new_depth: int, op: str) -> GrowthPlan:
    """Where operator ``op`` puts ``new_depth - len(order)`` new layers; free slots are used lowest first."""
    if op not in GROWTH_OPS:
        raise GrowthError(f"unknown growth operator {op!r}; allowed: {', '.join(GROWTH_OPS)}")
    order = _check_order(order, num_slots)
    prev = len(order)
    if not prev <= new_depth <= num_slots:
        raise GrowthError(f"cannot grow {prev} -> {new_depth} layers with {num_slots} slots "
                          f"(allowed depths: {prev}..{num_slots})")
    extra = new_depth - prev
    free = sorted(set(range(num_slots)) - set(order))
    if op == "stacking":
        srcs = [order[j % prev] for j in range(extra)]
        new_slots = tuple(free[:extra])
        new_order = order + new_slots
    else:
        pos = insertion_sources(prev, extra)
        groups: List[List[Tuple[str, int]]] = [[("old", s)] for s in order]
        for j, p in enumerate(pos):
            groups[p].append(("new", j))
        layout = [item for g in groups for item in g]
        # free slots go to the new layers by position, so the order stays sorted where it can
        slot_of = {j: free[i] for i, j in enumerate(v for kind, v in layout if kind == "new")}
        new_order = tuple(slot_of[v] if kind == "new" else v for kind, v in layout)
        new_slots = tuple(slot_of[j] for j in range(extra))
        srcs = [order[p] for p in pos]
    return GrowthPlan(new_order, new_slots, tuple(zip(new_slots, srcs)))


def copy_block(src: nn.Module, dst: nn.Module) -> None:
    """dst <- src in place (parameters keep their identity, so the optimizer still holds them)."""
    dst.load_state_dict(src.state_dict())


def _layer_scales(block: nn.Module) -> List[nn.Parameter]:
    return [m.gamma for m in block.modules() if isinstance(getattr(m, "gamma", None), nn.Parameter)]


def zero_residual_scales(block: nn.Module) -> None:
    """ReZero on a timm-style block: zero its LayerScale gammas (module docstring)."""
    gammas = _layer_scales(block)
    if not gammas:
        raise GrowthError(
            f"identity growth needs blocks with LayerScale (a learnable 'gamma' scaling each residual "
            f"branch); {type(block).__name__} has none. For timm ViTs build the model with init_values "
            f"(e.g. init_values=1.0), or use another operator ({', '.join(GROWTH_OPS)})")
    with torch.no_grad():
        for g in gammas:
            g.zero_()


def reset_block(block: nn.Module) -> None:
    """RandInit's default: timm's ViT init (Linear trunc-normal std 0.02 with zero bias, LayerNorm
    1/0, LayerScale back to its init_values, anything else with ``reset_parameters`` reset)."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif m is not block and hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
                m.reset_parameters()


def apply_growth(blocks: nn.Module, plan: GrowthPlan, op: str, momentum_blocks: Optional[nn.Module] = None,
                 init_fn: Optional[Callable[[nn.Module], None]] = None, copy_existing: bool = True) -> None:
    """Initialise the slots ``plan`` activates, as operator ``op`` says (module docstring).
    ``blocks`` / ``momentum_blocks`` are indexed by slot (ModuleList, Sequential, ElasticBlocks)."""
    if op not in GROWTH_OPS:
        raise GrowthError(f"unknown growth operator {op!r}; allowed: {', '.join(GROWTH_OPS)}")
    if op == "mogrow":
        if momentum_blocks is None:
            raise GrowthError("mogrow growth needs the momentum network's blocks (momentum_blocks)")
        if len(momentum_blocks) != len(blocks):
            raise GrowthError(f"momentum network has {len(momentum_blocks)} blocks, the model {len(blocks)}; "
                              f"they must have the same slots")
    if op == "identity":
        for dst, _ in plan.sources:
            if not _layer_scales(blocks[dst]):
                zero_residual_scales(blocks[dst])     # raises the explanatory error before any change
    for dst, src in plan.sources:
        if op in ("interpolation", "stacking", "identity"):
            copy_block(blocks[src], blocks[dst])
            if op == "identity":
                zero_residual_scales(blocks[dst])
        elif op == "randinit":
            (init_fn or reset_block)(blocks[dst])
        else:  # mogrow
            copy_block(momentum_blocks[src], momentum_blocks[dst])
            copy_block(momentum_blocks[src], blocks[dst])
    if op == "mogrow" and copy_existing:
        new = set(plan.new_slots)
        for s in plan.order:
            if s not in new:
                copy_block(momentum_blocks[s], blocks[s])


def grow(blocks: nn.Module, order: Sequence[int], new_depth: int, op: str, momentum_blocks: Optional[nn.Module] = None,
         init_fn: Optional[Callable[[nn.Module], None]] = None, copy_existing: bool = True) -> GrowthPlan:
    """Grow the sub-network ``order`` to ``new_depth`` layers with ``op``; returns the plan (its
    ``order`` is the new active-layer order; clear the optimizer state of ``plan.new_slots`` with
    :func:`reset_optimizer_state` if they were active before, e.g. as unchosen supernet layers)."""
    plan = plan_growth(order, len(blocks), new_depth, op)
    apply_growth(blocks, plan, op, momentum_blocks, init_fn, copy_existing)
    return plan


@dataclass(frozen=True)
class ElasticSupernet:
    """Elastic supernet with interpolation: ``base`` layers always active, ``optional`` layers
    activated in this order (the insertion order of Interpolation), ``order`` the full execution order."""

    base: Tuple[int, ...]
    order: Tuple[int, ...]
    optional: Tuple[int, ...]
    candidates: Tuple[SubNet, ...]

    @property
    def depths(self) -> Tuple[int, ...]:
        return tuple(range(len(self.base), len(self.order) + 1))

    def layers(self, depth: int) -> Tuple[int, ...]:
        """The active-layer order of the sub-network with ``depth`` layers."""
        if not len(self.base) <= depth <= len(self.order):
            raise GrowthError(f"supernet depth {depth} is outside {len(self.base)}..{len(self.order)}")
        active = set(self.base) | set(self.optional[:depth - len(self.base)])
        return tuple(s for s in self.order if s in active)

    def sample(self, step: int, seed: int = 0) -> Tuple[SubNet, Tuple[int, ...]]:
        """The sub-network trained at ``step`` (uniform over the candidates) and its layers."""
        sub = sample_candidate(self.candidates, step, seed)
        return sub, self.layers(sub.depth)


def build_supernet(blocks: nn.Module, order: Sequence[int], candidates: Sequence[SubNet], op: str = "mogrow",
                   momentum_blocks: Optional[nn.Module] = None, init_fn: Optional[Callable[[nn.Module], None]] = None,
                   copy_existing: bool = True) -> ElasticSupernet:
    """Grow the last chosen sub-network (``order``) into the elastic supernet holding ``candidates``
    (Lambda_k) with an interpolation-placed operator; see the module docstring."""
    if op not in INTERPOLATING_OPS:
        raise GrowthError(f"the elastic supernet inserts layers by interpolation; operator {op!r} is not "
                          f"allowed here (allowed: {', '.join(INTERPOLATING_OPS)})")
    cands = tuple(candidates)
    if not cands:
        raise GrowthError("build_supernet: no candidate sub-networks")
    order = _check_order(order, len(blocks))
    low = [str(c) for c in cands if c.depth < len(order)]
    if low:
        raise GrowthError(f"supernet candidates {low} are shallower than the {len(order)}-layer sub-network "
                          f"they grow from")
    plan = grow(blocks, order, max(c.depth for c in cands), op, momentum_blocks, init_fn, copy_existing)
    return ElasticSupernet(order, plan.order, plan.new_slots, cands)


class ElasticBlocks(nn.Sequential):
    """A block list that runs only its ``active`` slots, in that order (None: every slot in order).

    Iteration (``for blk in blocks``, and so ``forward``) follows the active order; indexing,
    ``len``, ``state_dict`` and module traversal see every slot, so the state-dict layout stays
    ``blocks.<slot>.*`` and ``.to()``/``.train()`` reach inactive slots too. timm's gradient
    checkpointing (``checkpoint_seq``) walks ``children()`` and would run every slot: not supported.
    """

    def __init__(self, blocks: Iterable[nn.Module], active: Optional[Sequence[int]] = None) -> None:
        super().__init__(*blocks)
        self.active: Optional[Tuple[int, ...]] = None
        self.set_active(active)

    def set_active(self, order: Optional[Sequence[int]]) -> None:
        self.active = None if order is None else _check_order(order, len(self))

    def __iter__(self):
        mods = list(self._modules.values())
        return iter(mods if self.active is None else [mods[i] for i in self.active])

    def extra_repr(self) -> str:
        return f"active={list(self.active) if self.active is not None else 'all'}"


def make_elastic(model: nn.Module, attr: str = "blocks", active: Optional[Sequence[int]] = None) -> ElasticBlocks:
    """Replace ``model.<attr>`` (a ModuleList/Sequential of blocks, e.g. a timm ViT's or the MAE
    encoder's) by an :class:`ElasticBlocks` holding the same modules: parameters, state-dict keys and
    the optimizer are unaffected; the model's own forward then runs only the active slots."""
    old = getattr(model, attr, None)
    if not isinstance(old, (nn.ModuleList, nn.Sequential)):
        raise GrowthError(f"{type(model).__name__}.{attr} must be an nn.ModuleList or nn.Sequential of blocks, "
                          f"got {type(old).__name__}")
    if isinstance(old, ElasticBlocks):
        old.set_active(active)
        return old
    new = ElasticBlocks(list(old._modules.values()), active)
    setattr(model, attr, new)
    return new


def set_drop_path(blocks: nn.Module, order: Sequence[int], rate: float) -> None:
    """Stochastic depth of the sub-network ``order`` as a standalone network of that depth would
    have it (timm: linear 0..rate over the blocks' positions). Blocks need DropPath modules (timm:
    built with drop_path_rate > 0), since their probability is set, not their presence."""
    order = _check_order(order, len(blocks))
    n = len(order)
    for pos, slot in enumerate(order):
        prob = float(rate * pos / (n - 1)) if n > 1 else 0.0
        mods = [m for m in blocks[slot].modules() if hasattr(m, "drop_prob")]
        if not mods and prob > 0:
            raise GrowthError(f"block {slot} has no DropPath module to set to {prob:g}; build the model with "
                              f"drop_path_rate > 0 (timm leaves the first block without one; it stays first)")
        for m in mods:
            m.drop_prob = prob


def ordered_state_dict(state_dict: Mapping[str, torch.Tensor], order: Sequence[int],
                       prefix: str = "blocks.") -> dict:
    """The state dict of the standalone network that ``order`` runs: ``<prefix><order[i]>.*`` is
    renamed ``<prefix><i>.*``, inactive slots are dropped, other keys kept (export after growth)."""
    pos = {int(s): i for i, s in enumerate(order)}
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            head, _, rest = k[len(prefix):].partition(".")
            if head.isdigit():
                if int(head) in pos:
                    out[f"{prefix}{pos[int(head)]}.{rest}"] = v
                continue
        out[k] = v
    return out


def reset_optimizer_state(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module]) -> int:
    """Forget the optimizer state (e.g. Adam moments) of re-initialised blocks; the parameters stay
    in their groups. Returns how many parameters had state."""
    n = 0
    for m in modules:
        for p in m.parameters():
            if optimizer.state.pop(p, None) is not None:
                n += 1
    return n


def permute_slots(blocks: nn.Module, perm: Sequence[int], optimizer: Optional[torch.optim.Optimizer] = None,
                  others: Iterable[nn.Module] = ()) -> None:
    """Move contents between slots: slot ``i`` gets what slot ``perm[i]`` held (weights, buffers and,
    with ``optimizer``, the per-parameter optimizer state), in ``blocks`` and in every block list of
    ``others`` (e.g. the momentum network's). Modules and parameter objects stay where they are, so
    the optimizer's parameter groups, the state-dict names and a resumed run's fresh model all keep
    matching: compacting the active order to slots 0..d-1 this way needs nothing replayed on resume.
    Slots must be interchangeable (same structure), as a transformer's blocks are."""
    n = len(blocks)
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(n)):
        raise GrowthError(f"slot permutation {perm} must hold each of 0..{n - 1} once")
    if perm == list(range(n)):
        return
    for bl in (blocks, *others):
        states = [{k: v.clone() for k, v in bl[p].state_dict().items()} for p in perm]
        for i, st in enumerate(states):
            bl[i].load_state_dict(st)
    if optimizer is not None:
        params = [list(blocks[i].parameters()) for i in range(n)]
        old = [[optimizer.state.pop(p, None) for p in ps] for ps in params]
        for i, p in enumerate(perm):
            for dst, st in zip(params[i], old[p]):
                if st is not None:
                    optimizer.state[dst] = st


def compaction(order: Sequence[int], num_slots: int) -> Tuple[int, ...]:
    """The slot permutation (for :func:`permute_slots`) that puts ``order`` at slots 0..len-1 in
    execution order, the other slots after it in ascending order."""
    order = _check_order(order, num_slots)
    return order + tuple(s for s in range(num_slots) if s not in set(order))
