"""efficienttrain.growth / growth_ops: AutoProg's growth space, Prog/AutoProg schedules, Eq. 8,
AdaReg, the growth operators, the elastic supernet and active-layer execution of a timm ViT."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from efficienttrain.curriculum import CurriculumError
from efficienttrain.growth import (AutoProg, GrowthError, GrowthSpace, Prog, SubNet, adareg, balance_alpha,
                                   sample_candidate, select_subnet, snapshot_positions, stage_fraction, vit_cost)
from efficienttrain.growth_ops import (ElasticBlocks, build_supernet, grow, interpolation_sources, make_elastic,
                                       ordered_state_dict, plan_growth, reset_optimizer_state, set_drop_path)


# ---- growth space ---------------------------------------------------------------------------------

def test_growth_space_half_omega_rounds_patches_and_depth():
    sp = GrowthSpace.omega("0.5", 224, 12)                     # DeiT: patch 16, 12 blocks
    assert sp.ratios == pytest.approx((0.5, 2 / 3, 5 / 6, 1.0))
    # n = s * 14 patches per side, rounded: 7, 9.33->9, 11.67->12, 14  => sizes n * 16
    assert sp.sizes == (112, 144, 192, 224)
    assert sp.depths == (6, 8, 10, 12)
    # the official code's multiples of 32
    assert GrowthSpace.omega("0.5", 224, 12, multiple_of=32).sizes == (128, 160, 192, 224)


def test_growth_space_04_omega_and_half_up_rounding():
    sp = GrowthSpace.omega("0.4", 224, 12)
    # s = 0.4, 0.6, 0.8, 1: n = 5.6->6, 8.4->8, 11.2->11, 14; l = 4.8->5, 7.2->7, 9.6->10, 12
    assert sp.sizes == (96, 128, 176, 224) and sp.depths == (5, 7, 10, 12)
    half = GrowthSpace.build(64, 5, s1=0.5, num_stages=2, multiple_of=16)
    assert half.depths == (3, 5)                              # 2.5 rounds up
    assert half.sizes == (32, 64)


def test_growth_space_errors_and_candidates():
    with pytest.raises(GrowthError, match="allowed: 0.5, 0.4"):
        GrowthSpace.omega("0.3", 224, 12)
    with pytest.raises(GrowthError, match=r"s1.*\(0, 1\]"):
        GrowthSpace.build(224, 12, s1=1.5)
    assert issubclass(GrowthError, CurriculumError)           # user error -> exit 2 in every CLI
    sp = GrowthSpace.omega("0.5", 224, 12)
    assert len(sp.candidates()) == 16


def grid(sizes, depths):
    return {SubNet(s, d) for s in sizes for d in depths}


def test_search_space_is_the_official_candidate_set_by_hand():
    # changlin31/AutoProg main_prog.py: stage 0 searches {first, middle, last} of the distinct sizes
    # and depths; stage k > 0 sizes[r:r+2] x depths[l+1:l+4] around the last choice (r, l)
    sp = GrowthSpace.omega("0.5", 224, 12)                     # sizes 112/144/192/224, depths 6/8/10/12
    assert set(sp.search_space(None)) == grid((112, 192, 224), (6, 10, 12))
    assert set(sp.search_space(SubNet(112, 6))) == grid((112, 144), (8, 10, 12))
    assert set(sp.search_space(SubNet(144, 8))) == grid((144, 192), (10, 12))
    assert set(sp.search_space(SubNet(192, 12))) == grid((192, 224), (12,))   # depth complete: it stays
    assert sp.search_space(SubNet(224, 12)) == (SubNet(224, 12),)
    # repeated values count once: depths 2,3,3,4 -> 2/3/4
    tiny = GrowthSpace.build(32, 4, 0.5, 4, 4)
    assert tiny.sizes == (16, 20, 28, 32) and tiny.depths == (2, 3, 3, 4)
    assert set(tiny.search_space(None)) == grid((16, 28, 32), (2, 3, 4))
    assert set(tiny.search_space(SubNet(20, 3))) == grid((20, 28), (4,))
    with pytest.raises(GrowthError, match="not a sub-network of this growth space"):
        sp.search_space(SubNet(100, 6))


# ---- Prog -----------------------------------------------------------------------------------------

def test_prog_is_the_uniform_linear_schedule():
    sp = GrowthSpace.omega("0.5", 224, 12)
    prog = Prog(sp)
    assert prog.schedule() == (SubNet(112, 6), SubNet(144, 8), SubNet(192, 10), SubNet(224, 12))
    got = [(g.stage_index, g.size, g.depth, g.phase) for g in (prog.at(p) for p in (0, 0.2499, 0.25, 0.6, 0.99, 1.0))]
    assert got == [(0, 112, 6, "train"), (0, 112, 6, "train"), (1, 144, 8, "train"), (2, 192, 10, "train"),
                   (3, 224, 12, "train"), (3, 224, 12, "train")]
    cur = prog.curriculum(magnitude=9)
    assert [s.size for s in cur.stages] == [112, 144, 192, 224] and cur.budget == "epochs"
    assert [s.share for s in cur.stages] == [0.25] * 4
    # tokens x blocks: (6*49 + 8*81 + 10*144 + 12*196) / 4 / (12*196)
    assert prog.compute(vit_cost(16)) == pytest.approx(4734 / 4 / 2352)


# ---- AutoProg schedule ------------------------------------------------------------------------------

def test_autoprog_stages_supernet_phases_and_decisions():
    sp = GrowthSpace.omega("0.5", 224, 12)
    ap = AutoProg(sp, epochs=100, search_first=False)          # 25-epoch stages, 2 supernet epochs
    assert ap.searched_stages == (1, 2) and ap.pending == 1
    assert ap.at(0.1).subnet == SubNet(112, 6) and ap.at(0.1).phase == "train"
    st = ap.at(0.26)                                           # epoch 26: supernet of stage 1
    assert st.phase == "supernet" and st.stage_index == 1
    assert set(st.candidates) == grid((112, 144), (8, 10, 12))  # Lambda_1 around the smallest
    assert st.subnet == SubNet(144, 12) and st.reg_fraction == 1.0   # its largest extent; full AdaReg
    with pytest.raises(GrowthError, match="stage 1.*epoch 27"):
        ap.at(0.28)
    ap = ap.decide(SubNet(144, 8))
    assert ap.at(0.28).subnet == SubNet(144, 8) and ap.at(0.28).phase == "train"
    assert ap.at(0.28).reg_fraction == pytest.approx(1 / 3)   # AdaReg by stage index
    st2 = ap.at(0.505)
    assert st2.phase == "supernet" and set(st2.candidates) == grid((144, 192), (10, 12))
    with pytest.raises(GrowthError, match="not in its growth space"):
        ap.decide(SubNet(112, 12))                             # size would shrink
    with pytest.raises(GrowthError, match="not in its growth space"):
        ap.decide(SubNet(192, 8))                              # depth must grow
    ap = ap.decide(SubNet(192, 10))
    assert ap.pending is None and ap.at(0.8).subnet == SubNet(224, 12)   # last stage: complete model
    assert ap.schedule() == (SubNet(112, 6), SubNet(144, 8), SubNet(192, 10), SubNet(224, 12))
    with pytest.raises(GrowthError, match="already decided"):
        ap.decide(SubNet(224, 12))
    assert AutoProg.from_dict(ap.to_dict()) == ap
    # planned compute (tokens x blocks), by hand: per stage 25 epochs, supernet phases 2 epochs
    c = vit_cost(16)
    full = c(sp.full)
    lam1 = grid((112, 144), (8, 10, 12))
    lam2 = grid((144, 192), (10, 12))
    by_hand = (25 * c(SubNet(112, 6)) + 2 * np.mean([c(x) for x in lam1]) + 23 * c(SubNet(144, 8))
               + 2 * np.mean([c(x) for x in lam2]) + 23 * c(SubNet(192, 10)) + 25 * full) / (100 * full)
    assert ap.compute(c) == pytest.approx(by_hand)


def test_autoprog_errors_and_search_first():
    sp = GrowthSpace.omega("0.5", 224, 12)
    with pytest.raises(GrowthError, match="shorter than a stage"):
        AutoProg(sp, epochs=8)                                 # 2-epoch stages cannot hold 2 supernet epochs
    ap = AutoProg(sp, epochs=40)                               # the official default: stage 0 searched too
    assert ap.searched_stages == (0, 1, 2) and ap.at(0.0).phase == "supernet"
    assert set(ap.at(0.0).candidates) == grid((112, 192, 224), (6, 10, 12))


def test_sample_candidate_is_a_pure_function_of_seed_and_step():
    cands = GrowthSpace.omega("0.5", 224, 12).candidates()
    draws = [sample_candidate(cands, s, seed=3) for s in range(400)]
    assert draws == [sample_candidate(cands, s, seed=3) for s in range(400)]
    assert set(draws) == set(cands)                            # uniform over 16: all drawn in 400 steps
    assert draws != [sample_candidate(cands, s, seed=4) for s in range(400)]


# ---- Eq. 8 and AdaReg ----------------------------------------------------------------------------

def test_select_subnet_on_an_exact_power_law_balances_to_a_tie():
    cands = [SubNet(112, 6), SubNet(144, 8), SubNet(192, 10), SubNet(224, 12)]
    costs = {c: t for c, t in zip(cands, (1.0, 2.0, 3.0, 4.0))}
    losses = {c: 2.0 * costs[c] ** -0.3 for c in cands}        # L = 2 T^-0.3: alpha balances to 0.3
    sel = select_subnet(losses, costs)
    assert sel.alpha == pytest.approx(0.3)
    assert all(v == pytest.approx(2.0) for v in sel.scores.values())
    assert sel.choice == SubNet(112, 6)                        # a tie goes to the cheapest


def test_select_subnet_picks_the_candidate_below_the_trend():
    cands = [SubNet(112, 6), SubNet(144, 8), SubNet(192, 10), SubNet(224, 12)]
    costs = dict(zip(cands, (1.0, 2.0, 3.0, 4.0)))
    losses = {c: 2.0 * costs[c] ** -0.3 for c in cands}
    losses[SubNet(192, 10)] *= 0.9                             # 10% better than its peers' trend
    sel = select_subnet(losses, costs)
    xs, ys = np.log([costs[c] for c in cands]), np.log([losses[c] for c in cands])
    assert sel.alpha == pytest.approx(-np.polyfit(xs, ys, 1)[0])   # independent least-squares fit
    assert sel.choice == SubNet(192, 10)
    # a fixed alpha: hand-computed scores L * T^a
    sel0 = select_subnet({SubNet(1, 1): 3.0, SubNet(2, 2): 2.0}, {SubNet(1, 1): 1.0, SubNet(2, 2): 4.0}, alpha=0.5)
    assert sel0.scores == {SubNet(1, 1): 3.0, SubNet(2, 2): 4.0} and sel0.choice == SubNet(1, 1)
    assert select_subnet({SubNet(1, 1): 3.0, SubNet(2, 2): 2.0}, {SubNet(1, 1): 1.0, SubNet(2, 2): 4.0},
                         alpha=0.0).choice == SubNet(2, 2)


def test_select_subnet_random_against_brute_force_and_errors():
    rng = np.random.default_rng(0)
    cands = [SubNet(16 * i, j) for i in range(1, 4) for j in range(1, 4)]
    for _ in range(20):
        costs = dict(zip(cands, rng.uniform(0.5, 5, len(cands)).tolist()))
        losses = dict(zip(cands, rng.uniform(0.5, 3, len(cands)).tolist()))
        sel = select_subnet(losses, costs)
        a = max(-np.polyfit(np.log(list(costs.values())), np.log(list(losses.values())), 1)[0], 0.0)
        assert sel.alpha == pytest.approx(a, abs=1e-9)
        assert sel.choice == min(cands, key=lambda c: losses[c] * costs[c] ** a)
    assert balance_alpha({SubNet(1, 1): 2.0, SubNet(1, 2): 1.0}, {SubNet(1, 1): 3.0, SubNet(1, 2): 3.0}) == 0.0
    with pytest.raises(GrowthError, match=r"loss of .* finite number > 0"):
        select_subnet({SubNet(1, 1): float("nan")}, {SubNet(1, 1): 1.0})
    with pytest.raises(GrowthError, match="no cost"):
        select_subnet({SubNet(1, 1): 1.0}, {})


def test_adareg_matches_the_paper_formula():
    # Sec. 5.3: RandAug magnitude 0.5x -> 1x, stochastic depth and random erase 0 -> 1x, linearly
    for f in (0.0, 0.25, 1 / 3, 1.0):
        r = adareg(f, magnitude=9.0, drop_path=0.1, reprob=0.25)
        assert (r.magnitude, r.drop_path, r.reprob) == pytest.approx((9 * (0.5 + 0.5 * f), 0.1 * f, 0.25 * f))
    with pytest.raises(GrowthError, match=r"\[0, 1\]"):
        adareg(1.5, 9, 0.1, 0.25)
    sp = GrowthSpace.omega("0.5", 224, 12)
    # the official progressive_schedule: np.linspace(0.5, 1, 4) * 9 for RandAug, linspace(0, 1, 4) for the rest
    assert [stage_fraction(k, 4) for k in range(4)] == pytest.approx(list(np.linspace(0, 1, 4)))
    assert [s.magnitude for s in Prog(sp).curriculum(9, adaptive=True).stages] == pytest.approx(
        list(np.linspace(0.5, 1, 4) * 9))
    assert [Prog(sp).at(p).reg_fraction for p in (0.1, 0.3, 0.6, 0.9)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with pytest.raises(GrowthError, match="outside"):
        stage_fraction(4, 4)


def test_snapshot_positions_by_hand():
    # the official code: the last search epoch's start, then every quarter of it (5 measurements)
    assert snapshot_positions(40, 40) == (0, 10, 20, 30, 40)
    assert snapshot_positions(80, 40) == (40, 50, 60, 70, 80)          # 2 search epochs: the last one
    assert snapshot_positions(30, 40) == (0, 8, 15, 22, 30)            # a phase shorter than an epoch: all of it
    assert snapshot_positions(3, 3) == (0, 1, 2, 3)                    # too short for 5 distinct positions
    with pytest.raises(GrowthError, match="phase_steps >= 1"):
        snapshot_positions(0, 10)


# ---- growth operators -----------------------------------------------------------------------------

def scalar_blocks(values):
    """Blocks whose whole state is one number, so every copy can be checked by hand."""
    blocks = nn.ModuleList(nn.Linear(1, 1, bias=False) for _ in values)
    with torch.no_grad():
        for b, v in zip(blocks, values):
            b.weight.fill_(v)
    return blocks


def weights(blocks, order):
    return [blocks[s].weight.item() for s in order]


def test_interpolation_placement_by_hand():
    assert interpolation_sources(2, 4) == (0, 0, 1, 1)                     # A A' B B'
    assert interpolation_sources(6, 8) == (0, 1, 2, 3, 4, 4, 5, 5)         # from the final layers
    assert interpolation_sources(5, 12) == (0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4)
    assert interpolation_sources(3, 3) == (0, 1, 2)


def test_mogrow_places_new_layers_where_interpolation_says_and_copies_the_momentum_network():
    # online A=1, B=2 in slots 0, 1; slots 2, 3 inactive (junk 9); momentum A~=10, B~=20
    online, momentum = scalar_blocks([1, 2, 9, 9]), scalar_blocks([10, 20, 90, 90])
    interp = scalar_blocks([1, 2, 9, 9])
    p_int = grow(interp, (0, 1), 4, "interpolation")
    p_mo = grow(online, (0, 1), 4, "mogrow", momentum_blocks=momentum)
    assert p_int.order == p_mo.order == (0, 2, 1, 3)                      # A A' B B'
    assert p_mo.new_slots == (3, 2) and p_mo.sources == ((3, 1), (2, 0))   # B' is inserted first
    assert weights(interp, p_int.order) == [1, 1, 2, 2]                   # Interpolation: online copies
    assert weights(online, p_mo.order) == [10, 10, 20, 20]                # MoGrow: Eq. 4, all from momentum
    assert weights(momentum, p_mo.order) == [10, 10, 20, 20]              # the momentum network grew too
    only_new = scalar_blocks([1, 2, 9, 9])
    grow(only_new, (0, 1), 4, "mogrow", momentum_blocks=scalar_blocks([10, 20, 90, 90]), copy_existing=False)
    assert weights(only_new, (0, 2, 1, 3)) == [1, 10, 2, 20]


def test_stacking_randinit_and_errors():
    b = scalar_blocks([1, 2, 9, 9])
    p = grow(b, (0, 1), 4, "stacking")
    assert p.order == (0, 1, 2, 3) and weights(b, p.order) == [1, 2, 1, 2]  # A B A' B'
    b = scalar_blocks([1, 2, 3, 9, 9, 9, 9, 9])
    p = grow(b, (0, 2, 1), 8, "stacking")                                  # 3 -> 8, cyclic from the bottom
    assert weights(b, p.order) == [1, 3, 2, 1, 3, 2, 1, 3]
    b = scalar_blocks([1, 2, 9, 9])
    p = grow(b, (0, 1), 3, "randinit", init_fn=lambda m: nn.init.constant_(m.weight, 7.0))
    assert p.order == (0, 1, 2) and weights(b, p.order) == [1, 2, 7]      # next to B, re-initialised
    with pytest.raises(GrowthError, match="allowed depths: 2..4"):
        grow(scalar_blocks([1, 2, 9, 9]), (0, 1), 5, "interpolation")
    with pytest.raises(GrowthError, match="shrink|allowed depths"):
        grow(scalar_blocks([1, 2, 9, 9]), (0, 1, 2), 2, "interpolation")
    with pytest.raises(GrowthError, match="allowed: randinit, stacking"):
        plan_growth((0,), 2, 2, "net2net")
    with pytest.raises(GrowthError, match="momentum_blocks"):
        grow(scalar_blocks([1, 2, 9, 9]), (0, 1), 4, "mogrow")


def tiny_vit(depth=6, **kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=5,
                             dynamic_img_size=True, **kw).eval()


def test_identity_growth_preserves_the_function_via_layerscale():
    model = tiny_vit(init_values=1.0)
    blocks = make_elastic(model, active=(0, 1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        p = grow(blocks, (0, 1), 4, "identity")
        blocks.set_active(p.order)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-6)
    assert float(blocks[2].ls1.gamma.detach().abs().sum()) == 0.0
    assert float(blocks[0].ls1.gamma.detach().sum()) == 16.0
    plain = tiny_vit()
    with pytest.raises(GrowthError, match="init_values"):
        grow(plain.blocks, (0, 1), 3, "identity")


# ---- elastic supernet ------------------------------------------------------------------------------

def standalone(model, order, depth):
    ref = tiny_vit(depth=depth)
    ref.load_state_dict(ordered_state_dict(model.state_dict(), order), strict=True)
    return ref


def test_supernet_is_weight_nesting_and_subnets_equal_standalone_networks():
    model = tiny_vit(depth=7)
    blocks = make_elastic(model)
    base = (0, 2, 1)                                          # a 3-layer sub-network after earlier growth
    before = copy.deepcopy(model)
    cands = [SubNet(s, d) for s in (16, 24, 32) for d in (3, 4, 5, 6)]
    sn = build_supernet(blocks, base, cands, op="interpolation")
    assert sn.order == (0, 3, 2, 4, 1, 5)                     # a copy after each layer
    assert sn.optional == (5, 4, 3)                           # activated from the final layers
    assert sn.layers(4) == (0, 2, 1, 5) and sn.layers(5) == (0, 2, 4, 1, 5)
    all_params = {d: {id(p) for s in sn.layers(d) for p in blocks[s].parameters()} for d in sn.depths}
    for da in sn.depths:                                      # Definition 1: |w_a| <= |w_b| => w_a in w_b
        for db in sn.depths:
            if da <= db:
                assert all_params[da] <= all_params[db]
    for d in sn.depths:
        # each sub-network is exactly the Interpolation growth of the base to d layers
        ref = copy.deepcopy(before)
        p = grow(ref.blocks, base, d, "interpolation")
        for s_super, s_ref in zip(sn.layers(d), p.order):
            for a, b in zip(blocks[s_super].parameters(), ref.blocks[s_ref].parameters()):
                assert torch.equal(a, b)
    torch.manual_seed(1)
    for c in cands:
        layers = sn.layers(c.depth)
        blocks.set_active(layers)
        x = torch.randn(2, 3, c.size, c.size)
        with torch.no_grad():
            assert torch.allclose(model(x), standalone(model, layers, c.depth)(x), atol=1e-5)
    sub, layers = sn.sample(step=11, seed=0)
    assert sub in cands and layers == sn.layers(sub.depth)


def test_supernet_with_mogrow_copies_the_momentum_network_and_refuses_stacking():
    model = tiny_vit(depth=4)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    sn = build_supernet(model.blocks, (0, 1), [SubNet(32, 2), SubNet(32, 3), SubNet(32, 4)], "mogrow", ema.blocks)
    assert sn.order == (0, 2, 1, 3)
    for s, src in zip(sn.order, (0, 0, 1, 1)):
        for a, b in zip(model.blocks[s].parameters(), ema.blocks[src].parameters()):
            assert torch.equal(a, b)
    with pytest.raises(GrowthError, match="interpolation"):
        build_supernet(tiny_vit(depth=4).blocks, (0, 1), [SubNet(32, 4)], "stacking")


# ---- active-layer execution, helpers, exact resume ----------------------------------------------------

def test_elastic_blocks_keep_the_timm_layout_and_run_only_active_layers():
    model = tiny_vit(depth=4)
    keys = list(model.state_dict())
    blocks = make_elastic(model, active=(3, 0))
    assert isinstance(model.blocks, ElasticBlocks) and model.blocks is blocks
    assert list(model.state_dict()) == keys and len(blocks) == 4
    assert [id(b) for b in blocks] == [id(blocks[3]), id(blocks[0])]   # MAE-style `for blk in blocks`
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), standalone(model, (3, 0), 2)(x), atol=1e-6)
    sd = ordered_state_dict({"blocks.3.w": 3, "blocks.0.w": 0, "blocks.1.w": 1, "norm.w": 9}, (3, 0))
    assert sd == {"blocks.0.w": 3, "blocks.1.w": 0, "norm.w": 9}
    with pytest.raises(GrowthError, match="distinct slots"):
        blocks.set_active((0, 0))


def test_set_drop_path_and_reset_optimizer_state():
    model = tiny_vit(depth=4, drop_path_rate=0.3)
    set_drop_path(model.blocks, (0, 3, 1), 0.2)               # like a standalone 3-block ViT: 0, 0.1, 0.2
    assert [model.blocks[s].drop_path2.drop_prob for s in (3, 1)] == pytest.approx([0.1, 0.2])
    assert model.blocks[2].drop_path1.drop_prob == pytest.approx(0.2)      # inactive: untouched (2/3 * 0.3)
    with pytest.raises(GrowthError, match="no DropPath module"):
        set_drop_path(model.blocks, (1, 0), 0.2)               # slot 0 has none (timm: rate 0 there)
    with pytest.raises(GrowthError, match="drop_path_rate > 0"):
        set_drop_path(tiny_vit(depth=2).blocks, (0, 1), 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.blocks[0].attn.qkv.weight.sum().backward()
    model.blocks[1].attn.qkv.weight.sum().backward()
    opt.step()
    assert reset_optimizer_state(opt, [model.blocks[1]]) == 1
    assert model.blocks[1].attn.qkv.weight not in opt.state and model.blocks[0].attn.qkv.weight in opt.state


def _train(model, ema, opt, blocks, steps, seed):
    for step in steps:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(model)


def _run(stop_at=None, resume=None):
    """Train 2 layers, MoGrow to 4 at step 3, train on; optionally checkpoint/resume at ``stop_at``."""
    from timm.utils import ModelEmaV3

    model = tiny_vit(depth=4).train()
    blocks = make_elastic(model, active=(0, 1))
    ema = ModelEmaV3(model, decay=0.998)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.module.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        blocks.set_active(resume["order"])
        ema.module.blocks.set_active(resume["order"])
        start = resume["step"]
    for step in range(start, 6):
        if step == stop_at:
            return {"model": copy.deepcopy(model.state_dict()), "ema": copy.deepcopy(ema.module.state_dict()),
                    "opt": copy.deepcopy(opt.state_dict()), "order": list(blocks.active), "step": step}
        if step == 3:
            plan = grow(blocks, blocks.active, 4, "mogrow", momentum_blocks=ema.module.blocks)
            blocks.set_active(plan.order)
            ema.module.blocks.set_active(plan.order)
        _train(model, ema, opt, blocks, [step], seed=0)
    return model.state_dict()


@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_growth_then_resume_continues_exactly(stop_at):
    straight = _run()
    resumed = _run(resume=_run(stop_at=stop_at))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
