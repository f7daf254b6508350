"""engine.flops: training FLOPs per sample (meta device = CPU), the saving they imply, the
`show --model` command line (python -m evaluation.curriculum), the Swin window rule and the lines a run logs."""
import json

import pytest
import torch
import torch.nn as nn

from efficienttrain.curriculum import get_curriculum, pixel_cost
from engine.flops import (FlopsError, cost_from_table, flop_saving, flops_per_sample, format_savings,
                          log_planned_savings, swin_window, timm_builder, timm_size_kwargs)
from evaluation.curriculum import main as cli
from finetune.flops import classifier_builder
from pretrain.flops import mae_builder

SMALL_VIT = dict(depth=2, embed_dim=32, num_heads=2)
SMALL_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def _mae_cfg():
    from engine.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, None, [
        "data.path=x", "model.arch=mae_vit_tiny_patch16", "model.img_size=64", "model.patch_size=8",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=16",
        "model.decoder_depth=1", "model.decoder_num_heads=2"]).model


@pytest.mark.parametrize("name, kwargs, sizes", [
    ("vit_tiny_patch16_224", SMALL_VIT, [32, 64]),
    ("swin_tiny_patch4_window7_224", SMALL_SWIN, [64, 96]),
    ("resnet18", {}, [32, 64]),
])
def test_meta_count_equals_cpu_count(name, kwargs, sizes):
    build = timm_builder(name, num_classes=10, **kwargs)
    meta = flops_per_sample(build, sizes)
    assert meta == flops_per_sample(build, sizes, device="cpu")
    assert meta[sizes[0]] < meta[sizes[1]]


def test_meta_count_equals_cpu_count_for_mae_and_attention_is_counted():
    build = mae_builder(_mae_cfg())
    meta = flops_per_sample(build, [32, 64])
    assert meta == flops_per_sample(build, [32, 64], device="cpu")
    # a plain FlopCounterMode on the CPU misses the attention matmuls (the fused CPU kernel has no
    # FLOP formula); the count here has them: what the meta and CPU counts agree on
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_fn = timm_builder("vit_tiny_patch16_224", num_classes=10, **SMALL_VIT)(64)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, torch.zeros(2, 3, 64, 64)).backward()
    vit = flops_per_sample(timm_builder("vit_tiny_patch16_224", num_classes=10, **SMALL_VIT), [64], device="cpu")
    assert counter.get_total_flops() / 2 < vit[64]


def test_linear_and_conv_by_hand():
    # Linear(48, 7) -> Linear(7, 5): forward 2*in*out each; backward of the second layer 2x that
    # (grad of its input and of its weight); the first only needs its weight grad (the images
    # need none): 2 * 48 * 7 * 2 + 2 * 7 * 5 * 3
    mlp = lambda size: (nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 7), nn.Linear(7, 5)),
                        lambda m, x: m(x).sum())
    assert flops_per_sample(mlp, [4]) == {4: 2 * 48 * 7 * 2 + 2 * 7 * 5 * 3}
    # Conv2d(3, 4, 3, padding 1) at 8x8: forward 2 * 8 * 8 * 4 * 3 * 3 * 3, weight grad the same
    conv = lambda size: (nn.Conv2d(3, 4, 3, padding=1), lambda m, x: m(x).sum())
    assert flops_per_sample(conv, [8], device="cpu") == flops_per_sample(conv, [8]) == {8: 2 * 2 * 64 * 4 * 27}


def test_saving_formula_by_hand():
    table = {96: 5.0, 160: 12.0, 224: 20.0}
    etpp = get_curriculum("etpp")         # compute budget: the stages' samples come from the pixel plan
    by_hand = 300 * 20.0 / (2 * 20 * (224 / 96) ** 2 * 5.0 + 4 * 20 * (224 / 160) ** 2 * 12.0 + 4 * 20 * 20.0)
    assert flop_saving(etpp, 200, 300, table) == pytest.approx(by_hand)
    assert flop_saving(etpp, 200, 300, {s: pixel_cost(s) for s in table}) == pytest.approx(etpp.speedup(200, 300))
    et = get_curriculum("et")             # epochs budget: the same as speedup with the table as the cost
    table_et = {160: 3.0, 192: 4.0, 224: 5.0}
    assert flop_saving(et, 300, None, table_et) == pytest.approx(300 * 5.0 / (180 * 3.0 + 60 * 4.0 + 60 * 5.0))
    assert flop_saving(et, 300, None, table_et) == pytest.approx(et.speedup(300, cost=cost_from_table(table_et)))
    with pytest.raises(FlopsError, match="no FLOPs measured at size 192"):
        flop_saving(et, 300, None, table)


def test_swin_window_rule_and_official_numbers():
    assert [swin_window(s) for s in (96, 160, 192, 224, 384)] == [3, 5, 6, 7, 12]
    assert timm_size_kwargs("swin_tiny_patch4_window7_224", 96, False) == {"img_size": 96, "window_size": 3}
    assert timm_size_kwargs("deit_small_patch16_224", 96, True) == {"img_size": 96}
    assert timm_size_kwargs("resnet50", 96, False) == {}
    build = timm_builder("swin_tiny_patch4_window7_224")
    for size, window in ((96, 3), (160, 5), (224, 7)):
        with torch.device("meta"):
            model, _ = build(size)
        assert {tuple(b.window_size) for b in model.modules() if type(b).__name__ == "SwinTransformerBlock"} \
            == {(window, window)}
    # the numbers: Swin-T costs 0.179x / 0.502x of 224 at 96 / 160 (pixel model: 0.184x / 0.51x)
    per = flops_per_sample(build, [96, 160, 224])
    assert per[96] / per[224] == pytest.approx(0.179, abs=5e-4) and per[160] / per[224] == pytest.approx(0.502, abs=5e-4)
    assert flop_saving(get_curriculum("etpp"), 200, 300, per) >= 1.45


def test_classifier_swin_official_and_forward_resize():
    from finetune.config import ClassifierConfig

    cfg = ClassifierConfig(name="swin_tiny_patch4_window7_224", num_classes=10, img_size=224, kwargs=dict(SMALL_SWIN))
    official = flops_per_sample(classifier_builder(cfg), [96, 224])      # window 3 at 96
    object.__setattr__(cfg, "resize", "forward")       # window 7 kept, the 96 px maps padded to whole windows
    forward = flops_per_sample(classifier_builder(cfg), [96, 224])
    assert official[224] == forward[224] and forward[96] > official[96]


def test_show_model_prints_both_savings(capsys):
    assert cli(["show", "etpp", "--epochs", "200", "--final-size", "64", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "speedup vs baseline 300 epochs: 1.50x (pixel cost)" in out
    assert "FLOP-based speedup vs baseline 300 epochs: " in out and "resnet18" in out
    assert out.splitlines()[1].endswith("px cost FLOP cost")
    assert cli(["show", "etpp", "--epochs", "200", "--final-size", "64", "--json", "--model",
                "vit_tiny_patch16_224"]) == 0
    data = json.loads(capsys.readouterr().out)
    per = {int(k): v for k, v in data["flops"]["per_sample"].items()}
    assert data["speedup"] == pytest.approx(1.5) and data["flops"]["speedup"] == pytest.approx(
        flop_saving(get_curriculum("etpp", final_size=64), 200, 300, per))
    assert data["table"][-1]["flops_ratio"] == 1.0 and data["table"][0]["flops_ratio"] == per[32] / per[64]
    assert data["flops"]["speedup"] != pytest.approx(1.5, abs=0.01)   # a 2x2 grid's cls token is not free


def test_show_model_errors(capsys):
    assert cli(["show", "etpp", "--model", "swin_tiny_patch4_window7_22"]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'swin_tiny_patch4_window7_22'; did you mean swin_tiny_patch4_window7_224" in err
    assert cli(["show", "etpp", "--final-size", "32", "--model", "swin_tiny_patch4_window7_224"]) == 2
    err = capsys.readouterr().err
    assert "cannot be built or run at input size 16" in err and "window_size=0" in err


class _NeedsValues(nn.Module):
    """A model that reads a value in its forward pass: it cannot run on meta."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        assert x.abs().sum().item() >= 0
        return self.fc(x.flatten(1))


def test_cpu_fallback_and_no_rng_draws():
    logs = []
    state = torch.random.get_rng_state()
    per = flops_per_sample(lambda s: (_NeedsValues(), lambda m, x: m(x).sum()), [4], log=logs.append)
    assert per == {4: 2 * 48 * 2 * 2} and "counted on the CPU" in logs[0]
    cur = get_curriculum("etpp", final_size=64)
    savings = log_planned_savings(mae_builder(_mae_cfg()), cur, 2, 4, logs.append, "MAE")
    assert torch.equal(state, torch.random.get_rng_state())             # building and counting draw nothing
    assert savings["pixel_saving"] == pytest.approx(2.0) and set(savings["flops_ratio"]) == {"32", "48", "64"}
    assert logs[-1].startswith("planned saving vs 4 epochs at the final size: 2.00x by pixel cost (B^2), ")


def test_logged_lines_note_a_difference_over_5_percent():
    same = {"pixel_saving": 1.5, "flops_saving": 1.52, "flops_ratio": {"96": 0.179, "224": 1.0}}
    lines = format_savings(same, 300, "swin")
    assert len(lines) == 1 and "1.50x by pixel cost (B^2), 1.52x by swin's training FLOPs" in lines[0]
    lines = format_savings({**same, "flops_saving": 1.30}, 300, "swin")
    assert len(lines) == 2 and lines[1].startswith("note: the FLOP-based saving 1.30x differs from the pixel-planned "
                                                   "1.50x by -13%")
    logs = []
    assert log_planned_savings(timm_builder("swin_tiny_patch4_window7_224"), get_curriculum("etpp", final_size=32),
                               2, None, logs.append) is None
    assert "FLOP-based saving not available" in logs[0] and "input size 16" in logs[0]


def test_grouped_convolution_backward_is_counted_with_its_groups():
    # a depthwise 3x3 conv on 8 channels of 10x10, batch 2: forward 2 * 8 * 100 * 9 multiply-adds
    # (x2 FLOPs) = 28800; backward = input grad + weight grad = 2 x forward (torch's own formula
    # ignores groups and counts it 8x too high)
    from engine.flops import count_training_flops

    conv = torch.nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False)
    stem = torch.nn.Conv2d(3, 8, 1, bias=False)            # input grad of the depthwise conv is needed
    model = torch.nn.Sequential(stem, conv)
    per_sample = count_training_flops(model, lambda m, x: m(x).sum(), 10, batch=2)
    stem = 2 * 8 * 3 * 100            # per sample: 1x1 conv 3 -> 8 on 10x10, 2 FLOPs per multiply-add
    depthwise = 2 * 8 * 9 * 100       # per sample: 3x3 depthwise on 8 channels
    assert per_sample == 2 * stem + 3 * depthwise == 52800    # the stem has no input gradient to compute
