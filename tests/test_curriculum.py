"""efficienttrain.curriculum: the papers' schedules and numbers, plans, LR, errors."""
import math

import pytest
import torch

from efficienttrain.curriculum import (
    BUILTIN, Curriculum, CurriculumError, Stage, get_curriculum, model_flops_cost, pixel_cost,
    round_size, warmup_cosine, with_replay)


def sizes(cur):
    return [s.size for s in cur.stages]


def test_builtin_sizes_match_papers():
    assert sizes(get_curriculum("baseline")) == [224]
    assert sizes(get_curriculum("et")) == [160, 192, 224]
    assert sizes(get_curriculum("etpp")) == [96] * 2 + [160] * 4 + [224] * 4
    assert sizes(get_curriculum("etpp-deit")) == [96] * 2 + [160] * 4 + [192] * 2 + [224] * 2
    assert sizes(get_curriculum("etpp-convnext")) == [160] * 6 + [224] * 4
    etpp = get_curriculum("etpp")
    assert etpp.budget == "compute" and [s.magnitude for s in etpp.stages] == list(range(10))
    assert all(s.share == pytest.approx(0.1) for s in etpp.stages)


def test_et_table5_epochs_and_linear_randaug():
    et = get_curriculum("et")
    rows = et.table(300)
    assert [(r["data_epoch_start"], r["data_epoch_end"]) for r in rows] == [(0, 180), (180, 240), (240, 300)]
    # m = 9 t / T at any point of the run (Sec. 4.3)
    for t in [0, 30, 179.9, 180, 200, 240, 299, 300]:
        assert et.magnitude_at(t / 300) == pytest.approx(9 * t / 300)


def test_speedups_reproduce_the_papers():
    # Table 6 (ConvNets, pixel cost): 180*160^2 + 60*192^2 + 60*224^2 vs 300*224^2
    expected = 300 * 224 ** 2 / (180 * 160 ** 2 + 60 * 192 ** 2 + 60 * 224 ** 2)
    assert get_curriculum("et").speedup(300) == pytest.approx(expected)
    assert round(get_curriculum("et").speedup(300), 2) == 1.53
    # ET++: E=200 equivalent epochs vs the 300-epoch baseline
    assert get_curriculum("etpp").speedup(200, baseline_epochs=300) == pytest.approx(1.5)
    for name in ("etpp-deit", "etpp-convnext"):
        assert get_curriculum(name).speedup(100, 300) == pytest.approx(3.0)
    assert get_curriculum("baseline").speedup(300) == pytest.approx(1.0)
    # linear (Table 13(c)) is configured to the same cost as et
    assert get_curriculum("linear").speedup(300) == pytest.approx(get_curriculum("et").speedup(300), rel=0.02)
    lin = sizes(get_curriculum("linear"))
    assert lin == sorted(lin) and lin[-1] == 224 and len(set(lin)) > 4


def test_etpp_data_epochs_follow_equal_compute():
    # sub-stage k at size r runs (E/10) * (224/r)^2 data epochs (NOTES.md)
    rows = get_curriculum("etpp").table(200)
    for r in rows:
        assert r["data_epochs"] == pytest.approx(20 * (224 / r["size"]) ** 2)
    assert rows[0]["data_epochs"] == pytest.approx(108.888, abs=1e-3)


def test_adapting_to_other_final_sizes():
    assert sizes(get_curriculum("et", final_size=384, multiple_of=32)) == [160, 288, 384]  # 160,(160+384)/2,384
    assert sizes(get_curriculum("etpp", final_size=112, multiple_of=8)) == [48] * 2 + [80] * 4 + [112] * 4
    assert sizes(get_curriculum("etpp-deit", final_size=112, multiple_of=8))[6] == 96
    # 96*256/224 = 109.7 -> nearest multiple of 16 is 112; 160*256/224 = 182.9 -> 176
    assert sizes(get_curriculum("etpp", final_size=256, multiple_of=16))[:3] == [112, 112, 176]
    # below 224, et scales 160/192/224 instead of exceeding the final size
    assert sizes(get_curriculum("et", final_size=112, multiple_of=8)) == [80, 96, 112]
    for name in BUILTIN:
        cur = get_curriculum(name, final_size=320, multiple_of=32)
        assert all(s.size % 32 == 0 and s.size <= 320 for s in cur.stages) and cur.final_size == 320


def test_round_size_rule():
    assert round_size(100, 16, 224) == 96      # nearest multiple
    assert round_size(104, 16, 224) == 112     # halves round up
    assert round_size(3, 16, 224) == 16        # at least multiple_of
    assert round_size(300, 16, 224) == 224     # never above the final size
    with pytest.raises(CurriculumError, match="not a multiple of multiple_of=32"):
        round_size(100, 32, 200)


def test_plan_steps_lr_and_stage_switches():
    cur = get_curriculum("etpp")
    plan = cur.plan(epochs=20, dataset_size=1000, batch_size=50)
    # steps per sub-stage = sample epochs * N / batch
    for ps, se in zip(plan.stages, cur.sample_epochs(20)):
        assert ps.steps == round(se * 1000 / 50)
    assert plan.total_steps == sum(p.steps for p in plan.stages)
    # stage switch: the step after a boundary uses the next size; progress is continuous
    b = plan.stages[2].start_step
    assert plan.at(b - 1).size == 96 and plan.at(b).size == 160
    assert plan.at(b).stage_step == 0 and plan.at(b).magnitude == 2.0
    assert plan.budget_fraction(b) == pytest.approx(0.2)
    assert plan.budget_fraction(0) == 0.0 and plan.budget_fraction(plan.total_steps) == 1.0
    fr = [plan.budget_fraction(s) for s in range(plan.total_steps + 1)]
    assert all(x < y for x, y in zip(fr, fr[1:]))
    # LR: one warmup + cosine over budget progress; no restart at stage boundaries
    base, warm = 1e-3, 2.0
    lrs = [plan.lr(s, base, warmup_epochs=warm, min_lr=1e-6) for s in range(plan.total_steps)]
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert all(x <= y for x, y in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(x >= y for x, y in zip(lrs[peak:], lrs[peak + 1:]))
    p = plan.budget_fraction(b)
    assert plan.lr(b, base, warm, 1e-6) == pytest.approx(1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9)))


def test_warmup_cosine_values():
    assert warmup_cosine(0.05, 1.0, warmup=0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 1.0, warmup=0.1) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 1.0, warmup=0.1, min_lr=0.0) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 1.0, warmup=0.1, min_lr=0.01) == pytest.approx(0.01)


def test_plan_batch_overrides_and_replay():
    cur = with_replay(get_curriculum("etpp-deit"), [4, 4, 2, 2, 2, 2, 1, 1, 1, 1], 64)
    cur = Curriculum(cur.name, (Stage(**{**cur.stages[0].__dict__, "batch_size": 256, "accum_steps": 1}),) + cur.stages[1:], cur.budget)
    plan = cur.plan(epochs=10, dataset_size=1280, batch_size=128, accum_steps=2)
    s0, s2, s9 = plan.stages[0], plan.stages[2], plan.stages[9]
    assert (s0.batch_size, s0.accum_steps, s0.loader_batch_size) == (256, 1, 64)
    assert (s2.batch_size, s2.accum_steps, s2.loader_batch_size) == (128, 2, 64)
    assert (s9.batch_size, s9.loader_batch_size) == (128, 128)
    # replay divides loader passes, not optimizer steps
    assert s0.data_epochs == pytest.approx(s0.sample_epochs / 4)
    info = plan.at(0)
    assert info.replay_times == 4 and info.replay_buffer == 64
    with pytest.raises(CurriculumError, match="not divisible by replay_times 4"):
        cur.plan(epochs=10, dataset_size=1280, batch_size=126, accum_steps=1)


def test_flops_cost_model():
    # Stride-1 padded convolutions cost exactly proportional to B^2: same answer as pixels.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    cost = model_flops_cost(net)
    assert cost(64) == pytest.approx(4 * cost(32))
    et = get_curriculum("et", final_size=64, multiple_of=8)
    assert et.speedup(300, cost=cost) == pytest.approx(et.speedup(300, cost=pixel_cost))
    # a fixed-cost head makes small inputs relatively dearer: less saving than pixels predict
    net2 = torch.nn.Sequential(net, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5000))
    assert et.speedup(300, cost=model_flops_cost(net2)) < et.speedup(300)
    # compute mode: the budget is exact under any cost model
    etpp = get_curriculum("etpp", final_size=64, multiple_of=8)
    assert etpp.compute(200, cost=model_flops_cost(net2)) == pytest.approx(200)


def test_yaml_round_trip_and_errors(tmp_path):
    cur = get_curriculum("etpp-deit")
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cur.to_dict()))
    back = get_curriculum(str(p))
    assert back == cur
    assert sizes(get_curriculum(str(p), final_size=112, multiple_of=8)) == sizes(get_curriculum("etpp-deit", 112, 8))

    def bad(text, match):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(CurriculumError, match=match):
            get_curriculum(str(f))

    bad("stages: [{size: 224, share: 1.0, speed: 3}]", r"unknown key\(s\) \['speed'\]; allowed")
    bad("stages: [{size: 224, share: 1.0}]\ncolour: red", r"unknown key\(s\) \['colour'\]")
    bad("stages: [{size: 100, share: 0.5}, {size: 224, share: 0.5}]", "size 100 is not a multiple of 16")
    bad("stages: [{size: 96, share: 0.5}, {size: 224, share: 0.4}]", "shares sum to 0.9; they must sum to 1")
    bad("budget: flops\nstages: [{size: 224, share: 1}]", "budget must be one of")
    bad("stages: [{size: 224, share: 0.5}, {size: 96, share: 0.5}]", "last stage .* must use the final")
    bad("stages: [{share: 1.0}]", "'size' and 'share' are required")
    bad("stages: [{size: 224, share: 1.0, replay_times: 2}]", "needs replay_buffer")
    bad("stages: {size: 224}", "non-empty list")
    bad("stages: [", "not valid YAML")


def test_unknown_names_and_bad_queries():
    with pytest.raises(CurriculumError, match="unknown curriculum 'fast'; allowed: baseline, et, etpp"):
        get_curriculum("fast")
    with pytest.raises(CurriculumError, match="does not exist"):
        get_curriculum("/no/such/file.yaml")
    cur = get_curriculum("et")
    with pytest.raises(CurriculumError, match=r"budget position must be in \[0, 1\]"):
        cur.stage_at(1.5)
    plan = cur.plan(1, 100, 10)
    with pytest.raises(CurriculumError, match="outside the plan"):
        plan.at(plan.total_steps)
    with pytest.raises(CurriculumError, match="budget \\(epochs\\) must be > 0"):
        cur.sample_epochs(0)


def test_bundled_yaml_curricula():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "curricula"
    official = get_curriculum(str(folder / "et-official-5stage.yaml"))
    assert official.speedup(300) == pytest.approx(get_curriculum("et").speedup(300))
    replay = get_curriculum(str(folder / "etpp-deit-replay.yaml"))
    assert sizes(replay) == sizes(get_curriculum("etpp-deit"))
    assert replay.speedup(200, 300) == pytest.approx(1.5)
    plan = replay.plan(epochs=200, dataset_size=1_281_167, batch_size=4096)
    assert plan.stages[0].loader_batch_size == 1024 and plan.stages[0].data_epochs == pytest.approx(108.888 / 4, abs=1e-3)


def test_stage_accumulation_follows_pixels_and_even_splits():
    """ET++ at 224 with 8 micro-steps on 8 processes (batch 4096): 96 px needs
    ceil(8 * (96/224)^2) = ceil(1.47) = 2 micro-steps; 160 px ceil(4.08) = 5, but 4096 does not
    split into 5, 6 or 7 x 8 processes: 8. A stage's own accum_steps is kept; accum 1 changes nothing."""
    from dataclasses import replace

    from efficienttrain.curriculum import get_curriculum, with_stage_accumulation

    cur = get_curriculum("etpp", 224, 16)
    got = with_stage_accumulation(cur, 8, 4096, 8)
    assert [(s.size, s.accum_steps) for s in got.stages] == [(96, 2)] * 2 + [(160, 8)] * 4 + [(224, 8)] * 4
    assert with_stage_accumulation(cur, 1, 4096, 8) is cur
    own = replace(cur, stages=(replace(cur.stages[0], accum_steps=8), *cur.stages[1:]))
    assert with_stage_accumulation(own, 8, 4096, 8).stages[0].accum_steps == 8
    # batch 1200 on one process, accum 6: 96 px ceil(1.10) = 2 (1200 / 2 = 600 per micro-step, 600 x 96^2
    # pixels <= 200 x 224^2); 160 px ceil(3.06) = 4 (1200 / 4 = 300)
    got = with_stage_accumulation(cur, 6, 1200, 1)
    assert [s.accum_steps for s in got.stages] == [2] * 2 + [4] * 4 + [6] * 4
    for st in got.stages:                                   # never more pixels per micro-step than at 224
        assert 1200 // st.accum_steps * st.size ** 2 <= 1200 // 6 * 224 ** 2
    plan = got.plan(10, 5000, 1200, 6)
    assert [ps.accum_steps for ps in plan.stages] == [2] * 2 + [4] * 4 + [6] * 4
    # a replay stage's loader micro-batch must also split into the replay chunks: batch 1200 with
    # replay 4 loads 300; 300 / 2 = 150 is not a multiple of 32 chunks, 300 / 3 neither ... 6: 50 no -> 6
    rep = replace(cur, stages=(replace(cur.stages[0], replay_times=4, replay_buffer=2), *cur.stages[1:]))
    assert with_stage_accumulation(rep, 6, 1200, 1, replay_chunks=32).stages[0].accum_steps == 6
    assert with_stage_accumulation(rep, 6, 1200, 1, replay_chunks=2).stages[0].accum_steps == 2
