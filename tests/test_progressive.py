"""Progressive growth in the training loop (engine/progressive.py): slot compaction, MoGrow at a
stage start against the momentum network by hand, Prog / AutoProg runs of python -m finetune and
python -m pretrain, exact resume across growth steps and inside a supernet phase, config errors."""
import json
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from torch import nn

from efficienttrain.fourier import low_frequency_crop
from efficienttrain.growth import SubNet, sample_candidate, snapshot_positions
from efficienttrain.growth_ops import compaction, permute_slots
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config
from engine.ema import WeightEma
from engine.data import FileSource, image_folder
from engine.distributed import DistInfo
from engine.progressive import GrowthConfig, GrowthController, search_subset, shrink_input, subset_line
from finetune.task import ClassificationTask
from pretrain.task import folder_labels
from finetune.config import FinetuneConfig
from finetune.main import run as run_finetune
from pretrain.config import PretrainConfig
from engine.demo_data import generate_demo_dataset
from pretrain.main import run as run_pretrain

VIT = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def scalar_blocks(values):
    blocks = nn.Sequential(*(nn.Linear(1, 1, bias=False) for _ in values))
    with torch.no_grad():
        for b, v in zip(blocks, values):
            b.weight.fill_(v)
    return blocks


def test_permute_slots_moves_weights_and_optimizer_state_not_modules():
    blocks = scalar_blocks([1.0, 2.0, 3.0])
    mom = scalar_blocks([10.0, 20.0, 30.0])
    params = [b.weight for b in blocks]
    opt = torch.optim.Adam(blocks.parameters(), lr=0.1)
    blocks[0].weight.grad = torch.tensor([[1.0]])
    blocks[2].weight.grad = torch.tensor([[-2.0]])
    opt.step()                                   # state for slots 0 and 2 only
    w = [b.weight.item() for b in blocks]
    st0, st2 = (opt.state[params[i]]["exp_avg"].clone() for i in (0, 2))
    assert compaction((2, 0), 3) == (2, 0, 1)
    permute_slots(blocks, (2, 0, 1), opt, [mom])
    assert [b.weight.item() for b in blocks] == [w[2], w[0], w[1]]
    assert [b.weight.item() for b in mom] == [30.0, 10.0, 20.0]
    assert [b.weight for b in blocks] == params                      # same parameter objects, same slots
    assert torch.equal(opt.state[params[0]]["exp_avg"], st2) and torch.equal(opt.state[params[1]]["exp_avg"], st0)
    assert params[2] not in opt.state
    with pytest.raises(Exception, match="each of 0..2 once"):
        permute_slots(blocks, (0, 0, 1))


def tiny_vit(drop_path=0.0):
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", img_size=32, num_classes=3, dynamic_img_size=True,
                             drop_path_rate=drop_path, **VIT)


def test_mogrow_stage_start_takes_the_interpolated_warmed_up_momentum_network_by_hand():
    model = tiny_vit(drop_path=0.1)
    ctl = GrowthController(GrowthConfig(schedule="prog"), model, final_size=32, patch_size=4, epochs=8,
                           embed_dim=32, drop_path=0.1, log=lambda m: None)
    assert ctl.space.sizes == (16, 20, 28, 32) and ctl.space.depths == (2, 3, 3, 4)
    plan = ctl.curriculum(9.0).plan(8, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl.prepare_stage(model, plan.stages[0], opt)
    assert model.blocks.active == (0, 1)
    info = ctl.before_step(model, plan.at(0))
    assert info.size == 16
    names = ("blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.bias",
             "blocks.1.norm1.weight", "patch_embed.proj.weight", "pos_embed", "head.weight", "norm.weight")
    ema = {n: model.state_dict()[n].clone() for n in names}
    for t in range(3):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        ctl.after_step(model)
        d = min(ctl.cfg.momentum, (1 + t) / (10 + t))   # the warm-up: 0.1, 2/11, 0.25 (not 0.9996)
        ema = {n: d * e + (1 - d) * model.state_dict()[n] for n, e in ema.items()}
    assert ctl.momentum.updates == 3
    assert not any(p in opt.state for p in model.blocks[2].parameters())      # inactive: never updated
    kept_state = opt.state[model.blocks[1].attn.qkv.weight]["exp_avg"].clone()
    ctl.prepare_stage(model, plan.stages[1], opt)
    # 2 -> 3 blocks: Interpolation inserts a copy of the last block after it (A B B'), from the momentum network
    assert model.blocks.active == (0, 1, 2)
    sd = model.state_dict()
    for name, e in ema.items():                                     # Eq. 4: all of it, the new block too
        assert torch.allclose(sd[name], e, atol=1e-6), name
        if name.startswith("blocks.1."):
            assert torch.allclose(sd[name.replace("blocks.1.", "blocks.2.")], e, atol=1e-6), name
    assert torch.equal(opt.state[model.blocks[1].attn.qkv.weight]["exp_avg"], kept_state)
    assert not any(p in opt.state for p in model.blocks[2].parameters())       # the new block starts fresh
    assert [model.blocks[i].drop_path1.drop_prob for i in (1, 2)] == pytest.approx([0.05, 0.1])   # 3-deep spread
    assert ctl.before_step(model, plan.at(plan.stages[1].start_step)).size == 20


def test_momentum_warmup_decay_by_hand():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEma(model, 0.2, warmup=True)
    expect = 0.0
    for t, (w, d) in enumerate(zip((1.0, 2.0, 3.0), (0.1, 2 / 11, 0.2))):   # min(0.2, 1/10), min(0.2, 2/11), min(0.2, 3/12)
        assert ema.decay_at(t) == pytest.approx(d)
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        expect = d * expect + (1 - d) * w
    assert ema.module.weight.item() == pytest.approx(expect) == pytest.approx(2.76)   # 0.9, 1.8, 2.76
    assert WeightEma(model, 0.998, warmup=True).decay_at(4490) == pytest.approx(0.998)   # (10 m - 1) / (1 - m)
    assert WeightEma(model, 0.998, warmup=True).decay_at(45) == pytest.approx(46 / 55)
    assert WeightEma(model, 0.998).decay_at(0) == 0.998                    # the trainer's weight EMA: constant


def test_growth_keeps_the_subset_loss_continuous_on_a_tiny_run():
    """After 20 steps MoGrow's grown model (stage 1: one more block, a larger input) measures within
    1.1x of the model before growth on the subset (measured: 0.451 vs 0.422); the constant-0.998 EMA
    (no warm-up) is 96 % initialisation then and does not (1.05)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    x = x + 2.0 * torch.nn.functional.one_hot(y, 3).float()[:, :, None, None]   # learnable: class = bright channel

    def subset_loss(model, size):
        return float(nn.functional.cross_entropy(model(nn.functional.interpolate(x, size=size, mode="bilinear")), y))

    ratios = {}
    for warmup in (True, False):
        logs = []
        model = tiny_vit()
        ctl = GrowthController(GrowthConfig(schedule="prog", momentum_warmup=warmup), model, final_size=32,
                               patch_size=4, epochs=8, embed_dim=32, subset_loss=subset_loss, log=logs.append)
        plan = ctl.curriculum(9.0).plan(8, 8, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ctl.prepare_stage(model, plan.stages[0], opt)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):                                   # minibatches of 8 at stage 0's 16 px
            i = torch.randint(0, 24, (8,), generator=g)
            nn.functional.cross_entropy(model(nn.functional.interpolate(x[i], size=16, mode="bilinear")),
                                        y[i]).backward()
            opt.step()
            opt.zero_grad()
            ctl.after_step(model)
        with torch.no_grad():
            before = subset_loss(model.eval(), 16)
        model.train()
        ctl.prepare_stage(model, plan.stages[1], opt)
        (rec,) = ctl.continuity
        assert rec["before"] == pytest.approx(before, rel=1e-6)
        line = [m for m in logs if "subset loss" in m]
        assert line == [f"growth stage 1: subset loss before {rec['before']:.4f}, after {rec['after']:.4f} "
                        f"(20px x 3 blocks)"]
        with torch.no_grad():
            assert rec["after"] == pytest.approx(subset_loss(model.eval(), 20), rel=1e-5)
        ratios[warmup] = rec["after"] / rec["before"]
    assert ratios[True] <= 1.1, ratios
    assert ratios[False] > 1.1, ratios


def ft(data, out, *extra):
    return load_config(FinetuneConfig, None, [
        f"data.path={data}", "data.num_workers=0", "mode=train", "model.name=vit_base_patch16_224",
        "model.num_classes=4", "model.img_size=32", "model.kwargs={patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2}",
        "model.resize=forward", "model.layer_decay=1.0", "model.drop_path=0.1", "curriculum.epochs=8",
        "train.batch_size=8", "train.warmup_epochs=1", "train.progress=false", "train.log_every=1",
        f"train.output_dir={out}", "train.device=cpu", "growth.search_epochs=1", "growth.search_images=12", "data.mixup=0",
        "data.cutmix=0", *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def loads_into_timm(path, depth=4):
    vit = timm.create_model("vit_base_patch16_224", img_size=32, num_classes=4, global_pool="avg",
                            **{**VIT, "depth": depth})
    vit.load_state_dict(load_checkpoint(str(path))["model"], strict=True)


def test_prog_run_grows_size_and_depth_and_ends_with_the_timm_model(data, tmp_path):
    out = tmp_path / "prog"
    res = run_finetune(ft(data, out, "growth.schedule=prog"))
    assert res["step"] == res["total_steps"]
    steps = [r["steps"] for r in json.loads((out / "plan.json").read_text())["rows"]]
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["size"] for r in rows] == sum(([s] * n for s, n in zip((16, 20, 28, 32), steps)), [])
    # the planned saving is the block-FLOPs one: sum over stages of depth * (12 N D^2 + 2 N^2 D), by hand
    cost = {s: d * (12 * (s / 4) ** 2 * 32 ** 2 + 2 * (s / 4) ** 4 * 32) for s, d in ((16, 2), (20, 3), (28, 3), (32, 4))}
    assert res["speed"]["planned_speedup"] == pytest.approx(4 * cost[32] / sum(cost.values()))
    # the measured wall time includes growing at the stage starts (the continuity checks), also reported apart
    sp = res["speed"]
    assert sp["stage_starts_measured"] and sp["stage_start_seconds"] > 0
    assert sp["measured_speedup"] == pytest.approx(sp["baseline_seconds_estimate"]
                                                   / (sp["step_seconds"] + sp["stage_start_seconds"]))
    assert "of growth and search at stage starts" in (out / "log.txt").read_text()
    ck = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    assert ck["task"]["current"] == [32, 4] and ck["meta"]["growth"]["subnets"] == [[16, 2], [20, 3], [28, 3], [32, 4]]
    loads_into_timm(out / "checkpoints" / "checkpoint-latest.pth")
    loads_into_timm(out / "checkpoints" / "checkpoint-best.pth")     # only the complete model competes


def test_autoprog_decides_logs_and_resumes_exactly_across_growth_and_inside_a_supernet(data, tmp_path):
    flops = "growth.runtime=flops"                                # deterministic choices: exact resume
    full = tmp_path / "full"
    res = run_finetune(ft(data, full, "growth.schedule=autoprog", flops))
    ck = load_checkpoint(str(full / "checkpoints" / "checkpoint-latest.pth"))
    auto = ck["task"]["autoprog"]
    assert len(auto["decisions"]) == 3 and len(ck["task"]["selections"]) == 3   # stages 0, 1, 2 searched
    sel = ck["task"]["selections"][0]
    # stage 0: the official {first, middle, last}^2 of sizes 16/20/28/32 and depths 2/3/4
    assert {(c["size"], c["depth"]) for c in sel["candidates"]} == {(s, d) for s in (16, 28, 32) for d in (2, 3, 4)}
    # Eq. 8's loss: the mean of the supernet phase's snapshots, each measured with the scoring EMA
    plan = json.loads((full / "plan.json").read_text())["rows"]
    n0 = plan[0]["end_step"] - plan[0]["start_step"]
    assert sel["snapshots"] == len(snapshot_positions(n0, n0)) and sel["runtime"] == "flops"
    for c in sel["candidates"]:
        assert len(c["snapshot_losses"]) == sel["snapshots"]
        assert c["loss"] == pytest.approx(sum(c["snapshot_losses"]) / sel["snapshots"])
        assert c["cost"] == pytest.approx(c["flops"])
    best = min(sel["candidates"], key=lambda c: (c["score"], c["cost"]))
    assert [best["size"], best["depth"]] == sel["choice"]
    loads_into_timm(full / "checkpoints" / "checkpoint-latest.pth")
    log = (full / "log.txt").read_text()
    assert log.count("search subset: 12 images, 4 classes, 3-3 per class") == 1
    assert ck["task"]["momentum_updates"] == ck["task"]["scorer_updates"] == res["step"]   # warm-up t, checkpointed
    assert ck["meta"]["growth"]["search_seconds"] > 0 and "s scoring candidates" in log
    # every later growth (the two supernets, the complete model) logs its continuity check
    assert [int(ln.split()[2].rstrip(":")) for ln in log.splitlines() if "subset loss before" in ln] == [1, 2, 3]
    # the supernet phase (plan stage 0): each step trains the seeded sample's size
    sup = range(plan[0]["start_step"], plan[0]["end_step"])
    rows = {r["step"]: r for r in metrics(full) if "loss" in r}
    cands = [SubNet(c["size"], c["depth"]) for c in sel["candidates"]]
    assert len(set(rows[s + 1]["size"] for s in sup)) > 1
    assert [rows[s + 1]["size"] for s in sup] == [sample_candidate(cands, s, 0).size for s in sup]
    # stop inside the first supernet phase (snapshots taken before the stop are kept), one step after
    # its choice, inside the second supernet phase, then finish
    part = tmp_path / "part"
    for stop in (plan[0]["start_step"] + 2, plan[1]["start_step"] + 1, plan[2]["start_step"] + 2):
        run_finetune(ft(data, part, "growth.schedule=autoprog", flops, f"train.max_steps={stop}"))
    res2 = run_finetune(ft(data, part, "growth.schedule=autoprog", flops))
    assert res2["step"] == res["step"]
    a = load_checkpoint(str(full / "checkpoints" / "checkpoint-latest.pth"))
    b = load_checkpoint(str(part / "checkpoints" / "checkpoint-latest.pth"))
    assert b["task"]["autoprog"] == a["task"]["autoprog"]
    for sa, sb in zip(a["task"]["selections"], b["task"]["selections"]):
        for ca, cb in zip(sa["candidates"], sb["candidates"]):
            assert ca["snapshot_losses"] == pytest.approx(cb["snapshot_losses"], rel=1e-6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for name in ("momentum", "scorer"):
        for k, v in a["task"][name].items():
            assert torch.equal(v, b["task"][name][k]), (name, k)


def test_snapshots_score_with_the_ema_in_train_mode_and_time_forward_backward():
    """The controller's Eq. 8 measurements, with a subset loss that reports what it was given: the
    scoring EMA (not the model) in train mode, each candidate's blocks and size, and T = the time of
    the backward pass it was asked for (here a sleep proportional to depth x size)."""
    import time as _time
    seen = []

    def subset_loss(net, size, backward=False):
        seen.append((net, net.training, len(list(net.blocks)), size, backward))
        if backward:
            _time.sleep(0.01 * len(list(net.blocks)) * size / 16)
        return 1.0 + 0.01 * size

    model = tiny_vit(drop_path=0.1)
    ctl = GrowthController(GrowthConfig(schedule="autoprog", search_epochs=1, search_images=10), model,
                           final_size=32, patch_size=4, epochs=8, embed_dim=32, drop_path=0.1,
                           subset_loss=subset_loss, log=lambda m: None)
    plan = ctl.curriculum(9.0).plan(8, 64, 8)                # 8 steps per epoch, 2-epoch stages
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl.prepare_stage(model, plan.stages[0], opt)
    assert ctl._positions == (0, 2, 4, 6, 8)
    ctl.before_step(model, plan.at(0))
    cands = ctl.supernet.candidates
    timed = [s for s in seen if s[4]]
    assert len(timed) == len(cands) + 1                       # one untimed warm-up pass, then each candidate
    assert all(net is ctl.scorer.module and training for net, training, *_ in seen)
    assert [(d, sz) for _, _, d, sz, _ in timed[1:]] == [(c.depth, c.size) for c in cands]
    snap = ctl.snapshots[0]
    assert snap["at"] == 0 and snap["losses"] == pytest.approx([1.0 + 0.01 * c.size for c in cands])
    expect = [0.01 * c.depth * c.size / 16 / 10 for c in cands]          # per image of the 10-image subset
    for got, want in zip(snap["times"], expect):              # a sleep lasts at least its time; a busy machine adds
        assert want <= got < want + 0.02, (got, want)
    assert not ctl.scorer.module.training and all(p.grad is None and not p.requires_grad
                                                  for p in ctl.scorer.module.parameters())
    assert all(p.grad is None for p in model.parameters())  # the model's gradients untouched
    seen.clear()
    ctl.before_step(model, plan.at(1))
    assert seen == [] and len(ctl.snapshots) == 1            # not a snapshot position
    ctl.before_step(model, plan.at(2))
    assert len(ctl.snapshots) == 2 and ctl.snapshots[1]["times"] is None and not any(s[4] for s in seen)


def _snapshot_worker(rank, world, port, out):
    import os
    import time as _time

    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        def subset_loss(net, size, backward=False):            # each rank measures something else
            if backward:
                _time.sleep(0.02 * (rank + 1))
            return 1.0 + rank + 0.01 * size

        torch.manual_seed(0)
        model = tiny_vit(drop_path=0.1)
        ctl = GrowthController(GrowthConfig(schedule="autoprog", search_epochs=1, search_images=10), model,
                               final_size=32, patch_size=4, epochs=8, embed_dim=32, drop_path=0.1,
                               subset_loss=subset_loss, log=lambda m: None, seed=0)
        plan = ctl.curriculum(9.0).plan(8, 64, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ctl.prepare_stage(model, plan.stages[0], opt)
        ctl.before_step(model, plan.at(0))
        torch.save([ctl.supernet.candidates, ctl.snapshots], os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_snapshots_are_averaged_over_ranks_so_every_rank_chooses_alike(tmp_path):
    """Two gloo processes whose subset losses and timings differ: every rank records the ranks' mean."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_snapshot_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    (cands, a), (_, b) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a == b and len(a) == 1
    assert a[0]["losses"] == pytest.approx([1.5 + 0.01 * c.size for c in cands])          # (1 + 2) / 2 + ...
    for t in a[0]["times"]:                                    # the mean of 0.02 s and 0.04 s, per image of 10
        assert 0.003 <= t < 0.003 + 0.02


def test_autoprog_measures_runtime_and_shrinks_bilinearly(data, tmp_path):
    """The default scoring: T is the measured forward+backward time per image (larger candidates
    take longer), and inputs shrink by bilinear interpolation without antialiasing (the official)."""
    out = tmp_path / "measured"
    run_finetune(ft(data, out, "growth.schedule=autoprog", "growth.stages=2"))
    sel = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))["task"]["selections"][0]
    assert sel["runtime"] == "measured"
    loss = np.array([c["loss"] for c in sel["candidates"]])
    t = np.array([c["cost"] for c in sel["candidates"]])
    assert (t > 0).all() and not np.allclose(t, [c["flops"] for c in sel["candidates"]])
    # Eq. 8 with the measured T, by numpy: alpha from the log-log least-squares trend, then argmin
    slope = np.polyfit(np.log(t), np.log(loss), 1)[0]
    assert sel["alpha"] == pytest.approx(max(-slope, 0.0), abs=1e-9)
    i = int(np.argmin(loss * t ** sel["alpha"]))
    assert [sel["candidates"][i]["size"], sel["candidates"][i]["depth"]] == sel["choice"]
    x = torch.rand(2, 3, 32, 32)
    ref = nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.equal(shrink_input(x, 20, "bilinear"), ref)
    assert torch.allclose(shrink_input(x, 20, "fourier"), low_frequency_crop(x, 20))


def test_mae_pretraining_grows_the_encoder_and_exports_a_full_encoder(data, tmp_path):
    out = tmp_path / "mae"
    cfg = load_config(PretrainConfig, None, [
        f"data.path={data}/train", "data.num_workers=0", "model.arch=mae_vit_tiny_patch16", "model.img_size=32",
        "model.patch_size=4", "model.depth=4", "model.embed_dim=32", "model.num_heads=2", "model.decoder_embed_dim=16",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "curriculum.name=baseline", "curriculum.epochs=4",
        "train.batch_size=12", "train.warmup_epochs=1", "train.progress=false", "train.log_every=1",
        f"train.output_dir={out}", "growth.schedule=prog"])
    res = run_pretrain(cfg)
    assert res["step"] == res["total_steps"]
    sizes = sorted({r["size"] for r in metrics(out) if "loss" in r})
    assert sizes == [16, 20, 28, 32]
    enc = load_checkpoint(str(out / "encoder.pth"))["model"]
    assert sorted({int(k.split(".")[1]) for k in enc if k.startswith("blocks.")}) == [0, 1, 2, 3]
    ck = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    assert ck["task"]["current"] == [32, 4] and ck["meta"]["growth"]["schedule"] == "prog"


@pytest.mark.parametrize("extra, match", [
    (["curriculum.name=etpp"], "curriculum.name must be baseline"),
    (["data.lowfreq=cpu-lanczos"], "cpu-lanczos"),
    (["data.lowfreq=downsample"], "growth.shrink"),
    (["growth.runtime=guess"], "allowed: measured, flops"),
    (["growth.shrink=nearest"], "allowed: bilinear, fourier"),
    (["growth.score_momentum=1.0"], "score_momentum must be in"),
    (["train.ema_decay=0.99"], "ema_decay"),
    (["model.resize=official"], "model.resize=forward"),
    (["model.layer_decay=0.75"], "layer_decay=1.0"),
    (["growth.search_epochs=2"], "shorter than a growth stage"),
    (["growth.operator=stacking"], "interpolation"),
    (["growth.omega=1.5"], r"growth.omega must be in \(0, 1\]"),
    (["mode=finetune", "model.checkpoint=x.pth"], "mode=train"),
])
def test_growth_config_errors(data, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        ft(data, tmp_path / "x", "growth.schedule=autoprog", *extra)


def test_growth_refuses_models_it_cannot_grow(data, tmp_path):
    with pytest.raises(ConfigError, match="timm VisionTransformer"):
        run_finetune(ft(data, tmp_path / "r", "growth.schedule=prog", "model.name=resnet18", "model.kwargs={}"))
    with pytest.raises(ConfigError, match="LayerScale"):
        run_finetune(ft(data, tmp_path / "i", "growth.schedule=prog", "growth.operator=identity"))


def test_search_subset_is_seeded_class_stratified_and_logged():
    labels = [0] * 10 + [1] * 3 + [2] * 7                 # class-sorted, as a folder listing is
    idx = search_subset(labels, 12, seed=0)
    counts = Counter(labels[i] for i in idx)
    assert counts[1] == 3 and sorted((counts[0], counts[2])) == [4, 5]   # 12 / 3 = 4; class 1 gives its 3, the spare 1 goes on
    assert idx == sorted(set(idx)) and search_subset(labels, 12, seed=0) == idx     # the same for the same seed (resume)
    assert search_subset(labels, 12, seed=1) != idx
    assert subset_line(idx, labels) == f"search subset: 12 images, 3 classes, 3-{max(counts.values())} per class"
    assert search_subset(labels, 50, seed=0) == list(range(20))                     # more than there are: all
    assert subset_line(search_subset(labels, 2, seed=0), labels).endswith("2 classes, 0-1 per class")
    flat = search_subset(None, 5, seed=0, total=100)
    assert len(set(flat)) == 5 and flat == sorted(flat) and flat == search_subset(None, 5, seed=0, total=100)
    assert subset_line(flat, None) == "search subset: 5 images, a seeded uniform sample (no class labels)"


def test_finetune_and_mae_tasks_sample_the_subset_over_all_classes(data, tmp_path):
    files, labels, classes = image_folder(f"{data}/train")
    cfg = ft(data, tmp_path / "t", "growth.schedule=autoprog", "growth.search_images=8")
    task = ClassificationTask(cfg, files, labels, [], [], DistInfo())
    counts = Counter(labels[i] for i in task.search_indices)
    assert len(task.search_indices) == 8 and sorted(counts) == [0, 1, 2, 3] and set(counts.values()) == {2}
    assert task.search_subset_line == "search subset: 8 images, 4 classes, 2-2 per class"
    assert task.search_indices == ClassificationTask(cfg, files, labels, [], [], DistInfo()).search_indices
    assert labels[:8] == [0] * 8                          # the first N files, the old subset: one class
    src = FileSource(files)
    assert folder_labels(src, f"{data}/train") == labels                          # ImageFolder: the folder labels
    assert folder_labels(src, f"{data}/train/{classes[0]}") is None               # files outside the root: none
    assert folder_labels(FileSource(files[:3]), f"{data}/train/{classes[0]}") is None   # a flat folder: none
