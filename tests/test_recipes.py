"""recipe: official (the official EfficientTrain++ launchers): warmup and drop path per family
against the launchers' own schedule, deviations listed, torchvision ResNet-50, LAMB, replay in
32 chunks of stage-size float16 images with its memory, cpu-lanczos, stage-size validation."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from efficienttrain.curriculum import CurriculumError, get_curriculum
from efficienttrain.replay import ReplayBuffer, check_replay_memory, replay_memory
from engine.config import ConfigError, load_config
from finetune.config import FinetuneConfig
from finetune.recipes import OFFICIAL, drop_path_rate, warmup_epochs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "finetune"
SHIPPED = ["deit-t_etpp_200e", "deit-s_etpp_200e", "deit-s_etpp_200e_replay", "swin-t_etpp_200e", "swin-s_etpp_200e", "swin-b_etpp_200e",
           "resnet50_etpp_200e", "convnext-t_etpp_200e", "convnext-s_etpp_200e", "convnext-b_etpp_200e"]


def shipped(name, *overrides):
    return load_config(FinetuneConfig, str(CONFIGS / f"{name}.yaml"), ["data.path=/data", *overrides])


def launcher_lr(epochs, size, rt, warm_rule, n, batch=4096, lr=4e-3, min_lr=1e-6, final=224):
    """The first sub-stage's LR per step as the launcher sets it up (its command line and its
    utils.cosine_scheduler, re-derived here from their definitions)."""
    ratio = (final * final) / (size * size)
    sched_epochs = int(epochs * ratio / rt)
    warm = int(20 / rt) if warm_rule == "first-stage" else int(0.2 * epochs * ratio / rt)
    per_epoch = n // (batch // rt)                 # loader batch = batch / rt
    w_iters = warm * per_epoch
    warmup = np.linspace(0, lr, w_iters)
    rest = np.arange(sched_epochs * per_epoch - w_iters)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * rest / len(rest)))
    return np.concatenate([warmup, cosine]), int(sched_epochs / 10) * per_epoch    # schedule, first sub-stage steps


@pytest.mark.parametrize("name,curriculum", [("swin_tiny_patch4_window7_224", "etpp"),
                                             ("deit_small_patch16_224", "etpp-deit"),
                                             ("convnext_tiny", "etpp-convnext"),
                                             ("deit_small_patch16_224", "etpp-deit-replay")])
def test_warmup_reproduces_the_launchers_first_stage_schedule(name, curriculum):
    rec, E, n = OFFICIAL[name], 200.0, 4096 * 20
    cur = get_curriculum(curriculum, 224, 16)
    first = cur.stages[0]
    w = warmup_epochs(rec.warmup, E, 224, first.size, first.replay_times)
    theirs, steps = launcher_lr(E, first.size, first.replay_times, rec.warmup, n)
    plan = cur.plan(E, n, 4096)
    ours = np.array([plan.lr(k, 4e-3, w, 1e-6) for k in range(steps)])
    # the same curve step for step (the launchers' int() truncations move it by < 1 % of the peak)
    np.testing.assert_allclose(ours, theirs[:steps], atol=0.01 * 4e-3)
    # and the old 20-budget-epoch warmup would not be: it is 5x longer for Swin / ConvNeXt
    if rec.warmup == "first-stage":
        old = np.array([plan.lr(k, 4e-3, 20.0, 1e-6) for k in range(steps)])
        assert np.abs(old - theirs[:steps]).max() > 0.3 * 4e-3


def test_warmup_and_drop_path_values_per_family():
    # hand-computed from the launchers: int(20/rt) / int(E*(224/s)^2/rt) of E; DeiT int(0.2*E*ratio/rt)
    assert warmup_epochs("first-stage", 200, 224, 96) == pytest.approx(200 * 20 / 1088)
    assert warmup_epochs("first-stage", 200, 224, 160) == pytest.approx(200 * 20 / 392)      # ConvNeXt
    assert warmup_epochs("budget-share", 200, 224, 96) == pytest.approx(200 * 217 / 1088)
    assert warmup_epochs("first-stage", 200, 224, 96, 2) == pytest.approx(200 * 10 / 544)    # Swin-T replay
    expected_300 = {"deit-s": 0.15, "swin-t": 0.3, "swin-s": 0.45, "swin-b": 0.75, "resnet50": 0.0,
                    "convnext-t": 0.15, "convnext-s": 0.6, "convnext-b": 0.75}
    for short, dp in expected_300.items():
        cfg = shipped(f"{short}_etpp_200e", "curriculum.epochs=300")
        assert cfg.model.drop_path == pytest.approx(dp), short
        assert drop_path_rate(OFFICIAL[cfg.model.name], 300) == pytest.approx(dp)
    assert shipped("swin-t_etpp_200e", "curriculum.epochs=300").train.warmup_epochs == pytest.approx(300 * 20 / 1633)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_reproduces_its_launcher(name):
    report = shipped(name).recipe_report
    assert report[0].startswith("recipe official: _ET_pp_")
    assert report[-1] == "deviations from the launcher: none", report


def test_explicit_values_are_kept_and_listed_and_misuse_is_refused():
    cfg = shipped("swin-t_etpp_200e", "train.warmup_epochs=20", "model.drop_path=0.1", "data.lowfreq=fft")
    assert cfg.train.warmup_epochs == 20 and cfg.model.drop_path == 0.1
    dev = cfg.recipe_report[-1]
    assert "train.warmup_epochs=20 (official 3.676)" in dev and "model.drop_path=0.1 (official 0.2)" in dev
    assert "data.lowfreq='fft'" in dev
    with pytest.raises(ConfigError, match="no official EfficientTrain\\+\\+ launcher for model.name='resnet18'"):
        shipped("resnet50_etpp_200e", "model.name=resnet18", "model.builder=timm")
    with pytest.raises(ConfigError, match="recipe: official is the supervised .*mode=train"):
        shipped("deit-s_etpp_200e", "mode=finetune", "model.checkpoint=x.pth")
    with pytest.raises(ConfigError, match="no official replay launcher for convnext_tiny"):
        shipped("convnext-t_etpp_200e", "curriculum.name=etpp-replay")
    with pytest.raises(ConfigError, match="train.warmup_epochs is null"):
        shipped("deit-s_etpp_200e", "recipe=none")


def test_torchvision_resnet50_as_the_official_code_builds_it():
    from finetune.models import create_classifier

    cfg = shipped("resnet50_etpp_200e")
    assert cfg.model.builder == "torchvision" and cfg.train.amp == "off"
    model = create_classifier(cfg.model)
    import torchvision

    assert isinstance(model, torchvision.models.ResNet)
    gammas = [m.bn3.weight for m in model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(gammas) == 16 and all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    import timm

    timm_r50 = timm.create_model("resnet50")                     # what model.builder=timm would give
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in timm_r50.modules() if hasattr(b, "bn3"))
    with pytest.raises(ConfigError, match="torchvision models have no stochastic depth"):
        shipped("resnet50_etpp_200e", "model.drop_path=0.1")
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        shipped("resnet50_etpp_200e", "model.name=resnet_50")


def test_fp16_autocast_needs_cuda():
    from engine.trainer import amp_dtype

    cfg = shipped("deit-s_etpp_200e")
    assert cfg.train.amp == "fp16"
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA device"):
        amp_dtype(cfg.train, torch.device("cpu"))


def test_lamb_step_matches_the_formula():
    from engine.distributed import DistInfo
    from finetune.main import build_optimizer

    cfg = load_config(FinetuneConfig, None, ["mode=train", "data.path=/d", "model.name=resnet10t", "optimizer=lamb",
                                             "opt_eps=1e-6", "train.weight_decay=0.1", "train.lr=0.01"])
    model = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = torch.randn(2, 3), torch.randn(2)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    opt = build_optimizer(cfg, model, DistInfo())
    opt.step()
    # LAMB (NVLAMB as the official lamb.py): global grad-norm clip at 1, Adam moments, decay
    # added to the update, trust ratio |w| / |update| on decayed tensors only
    g = math.sqrt(float((gw ** 2).sum() + (gb ** 2).sum()))
    clip = g if g > 1 else 1.0
    b1, b2, eps, lr = 0.9, 0.999, 1e-6, 0.01

    def update(p, grad, wd):
        grad = grad / clip
        m, v = (1 - b1) * grad, (1 - b2) * grad * grad
        u = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
        if wd:
            u = u + wd * p
            u = u * (p.norm() / u.norm())
        return p - lr * u

    torch.testing.assert_close(model.weight.detach(), update(w0, gw, 0.1))
    torch.testing.assert_close(model.bias.detach(), update(b0, gb, 0.0))        # biases: no decay, no trust ratio


def test_replay_memory_per_process_and_host_check():
    cur = get_curriculum("etpp-deit-replay", 224, 16)
    plan = cur.plan(200, 1_281_167, 4096)
    need = replay_memory(plan, 8)
    # the official DeiT-S stage 0: 1920 loader batches of 128 per GPU, 3 x 96 x 96 float16
    assert need[0] == 1920 * 128 * 3 * 96 * 96 * 2 == 13_589_544_960
    assert need[2] == 256 * 256 * 3 * 160 * 160 * 2 and set(need) == {0, 1, 2, 3, 4, 5}
    assert check_replay_memory(plan, 8, 8, available=2 ** 40) == need
    with pytest.raises(CurriculumError, match=r"stage 0 \(size 96\): its replay buffer .* 12.66 GiB per process, "
                                              r"101.25 GiB for the 8 process\(es\) of this host, and 64.00 GiB"):
        check_replay_memory(plan, 8, 8, available=64 * 2 ** 30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from engine.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def tiny_run(data, out, *extra):
    from finetune.main import run

    return run(load_config(FinetuneConfig, None, [
        f"data.path={data}", "data.num_workers=0", "mode=train", "model.name=resnet10t", "model.num_classes=4",
        "model.img_size=32", "model.drop_path=0.0", "train.warmup_epochs=0.2", "train.progress=false",
        "train.log_every=1", f"train.output_dir={out}", "train.device=cpu", "data.mixup=0", "data.cutmix=0", *extra]))


def test_supervised_replay_keeps_stage_size_float16_chunks(data, tmp_path, monkeypatch):
    import engine.trainer as trainer

    seen = []

    class Spy(ReplayBuffer):
        def step(self, *tensors):
            out = super().step(*tensors)
            seen.append((self.chunks_per_batch, self._slabs[0].tensor.dtype, tuple(self._slabs[0].tensor.shape),
                         tensors[0].shape[0], out[0].shape[0]))
            return out

    monkeypatch.setattr(trainer, "ReplayBuffer", Spy)
    cur = tmp_path / "replay.yaml"
    cur.write_text(yaml.safe_dump({"name": "tiny-replay", "budget": "compute", "final_size": 32, "stages": [
        {"size": 16, "share": 0.5, "replay_times": 2, "replay_buffer": 2}, {"size": 32, "share": 0.5}]}))
    res = tiny_run(data, tmp_path / "r", f"curriculum.name={cur}", "curriculum.epochs=2", "train.batch_size=64",
                   "data.lowfreq=cpu-lanczos", "curriculum.multiple_of=16")
    assert res["step"] == res["total_steps"] and seen
    chunks, dtype, shape, fresh, total = seen[0]
    # 32 chunks per loader batch (the official split), stored as stage-size float16 images
    assert chunks == 32 and dtype == torch.float16 and shape == (2, 32, 3, 16, 16)
    assert fresh == 32 and total == 64                             # the fresh batch + (rt - 1) x 32 one-sample chunks
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "buffer: 2 loader batches in 32 chunks each, 0.00 GiB per process when full" in log


def test_cpu_lanczos_is_pil_lanczos_after_randaug(data):
    from engine.data import image_folder
    from finetune.data import CurriculumTrainDataset

    import os

    files, labels, _ = image_folder(os.path.join(data, "train"), "train")
    kw = dict(scale=(0.08, 1.0), hflip=0.5, seed=3)
    full = CurriculumTrainDataset(files, labels, 32, "rand-m9-mstd0.5-inc1", **kw)
    small = CurriculumTrainDataset(files, labels, 32, "rand-m9-mstd0.5-inc1", lanczos_to_stage=True, **kw)
    for key in [(0, 7, 4.0, 16), (5, 11, 9.0, 16), (2, 1, 0.0, 32)]:
        img = full[key][0]
        ref = np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((key[3], key[3]), Image.LANCZOS))
        assert torch.equal(small[key][0], torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_convnets_validate_at_the_stage_size_and_only_final_size_competes(data, tmp_path):
    import json

    res = tiny_run(data, tmp_path / "v", "curriculum.name=etpp", "curriculum.epochs=2", "train.batch_size=8",
                   "curriculum.multiple_of=16")
    evals = [json.loads(line) for line in open(tmp_path / "v" / "metrics.jsonl") if "top1" in line]
    log = (tmp_path / "v" / "log.txt").read_text()
    assert "validation at 32px" in log and res["best"] is not None
    sizes = {e.get("eval_size") for e in evals}
    assert sizes >= {16, 32}, evals
