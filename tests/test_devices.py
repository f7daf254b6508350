"""Loud devices: a machine whose NVIDIA GPUs CUDA cannot use is an error (never a silent CPU run),
every run logs its versions, and loader workers that would not fit in /dev/shm are refused
before they start."""
import collections
import io
import shutil
import sys

import pytest
import torch

import engine.distributed as edist
from engine.data import DataError, check_shared_memory
from pretrain.main import main

from test_pretrain import images, tiny_overrides  # noqa: F401  (images: a fixture)


def tiny(data, out, *extra):
    return tiny_overrides(data, out, "curriculum.name=baseline", "curriculum.epochs=1", "train.device=auto", *extra)


def test_auto_with_gpus_cuda_cannot_use_exits_2_naming_both_versions(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(edist, "nvidia_devices", lambda: (["/dev/nvidia0", "/dev/nvidia1"], "535.104.05"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(tiny(images, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "train.device=auto: 2 NVIDIA GPU(s) are present (driver 535.104.05) but this torch cannot use CUDA" in err
    assert f"torch {torch.__version__}, built for CUDA {torch.version.cuda}" in err and "train.device=cpu" in err
    assert not (tmp_path / "run").exists()
    # on purpose: train.device=cpu trains on the CPU, and the run says what it runs on
    assert main(tiny(images, tmp_path / "run", "train.device=cpu", "train.max_steps=1")) == 0
    out = capsys.readouterr().out
    assert f"environment: torch {torch.__version__} (CUDA {torch.version.cuda}), NVIDIA driver 535.104.05" in out
    assert "training on cpu" in out and "DALI " in out and f"Python {sys.version.split()[0]}" in out


def test_nvidia_driver_version_is_read_from_the_kernel_module(monkeypatch):
    text = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n"
            "GCC version:  gcc version 12.3.0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(text)
                        if path == "/proc/driver/nvidia/version" else real_open(path, *a, **k))
    assert edist.nvidia_devices()[1] == "580.65.06"


def test_shared_memory_check(images, tmp_path, capsys, monkeypatch):
    # 2 workers x prefetch 4 x 8 samples x 3 KiB (32 px uint8) = 192 KiB per process
    assert check_shared_memory(2, 4, 8, 3 * 32 * 32) == 2 * 4 * 8 * 3072
    assert check_shared_memory(0, 4, 8, 3 * 32 * 32) == 0                   # no workers: no shared memory
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(64 << 20, 64 << 20, 100 << 10))
    with pytest.raises(DataError, match=r"need 0\.00 GiB of /dev/shm, which has 0\.00 GiB free.*--ipc=host"):
        check_shared_memory(2, 4, 8, 3 * 32 * 32)
    assert main(tiny(images, tmp_path / "run", "data.num_workers=2", "train.device=cpu")) == 2
    err = capsys.readouterr().err
    assert "shared memory: 2 loader worker(s) x prefetch 4 x 8 samples" in err and "--shm-size=1g" in err
    assert main(tiny(images, tmp_path / "run", "data.num_workers=0", "train.device=cpu", "train.max_steps=1")) == 0


def test_wall_efficiency_by_hand_and_in_every_run(images, tmp_path, capsys):
    from engine.speed import RunTiming, StageTiming, measured_saving

    # 16 px has a quarter of the FLOPs: 4x the final size's 100 img/s would be 1.0; 300 img/s is 0.75
    t = RunTiming({0: StageTiming(16, 0.5, 200, 2), 1: StageTiming(16, 0.5, 100, 2), 2: StageTiming(32, 2.0, 200, 4)})
    s = measured_saving(t, 32, 100, 1.0, 2.0, {"16": 0.25, "32": 1.0})
    assert s["wall_efficiency"] == {"16": 0.75, "32": 1.0}
    assert measured_saving(t, 32, 100, 1.0, 2.0)["wall_efficiency"] == {}          # no FLOP count: none
    out = tmp_path / "run"
    assert main(tiny(images, out, "curriculum.name=etpp", "curriculum.epochs=1.5", "train.device=cpu")) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    ratio = plan["planned_saving"]["flops_ratio"]
    ips = {}
    for r in summary["stages"]:
        n, sec = ips.get(r["size"], (0, 0))
        ips[r["size"]] = (n + r["images"], sec + r["seconds"])
    final = ips[32][0] / ips[32][1]
    for size, (n, sec) in ips.items():
        assert summary["wall_efficiency"][str(size)] == pytest.approx(n / sec / final * ratio[str(size)])
    assert "wall efficiency (images/s relative to the final size" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoint_copies_through_reused_page_locked_buffers():
    """The training thread only queues the copies: a weight changed right after submit is written
    with its value at submit time; the next checkpoint reuses the page-locked buffers."""
    from engine.checkpoint import CheckpointWriter

    w = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    written = []
    writer = CheckpointWriter()
    writer.submit({"w": w, "step": 1}, lambda st: written.append((st["w"].clone(), st["w"].is_pinned())))
    w.add_(1)                                            # the next step, queued after the copy
    writer.wait()
    assert torch.equal(written[0][0], torch.arange(1 << 20, dtype=torch.float32)) and written[0][1]
    buf = writer._pool[0]
    writer.submit({"w": w, "step": 2}, lambda st: written.append((st["w"].clone(), st["w"].data_ptr())))
    writer.wait()
    assert written[1][1] == buf.data_ptr() and torch.equal(written[1][0], w.cpu())


def test_cheap_stages_take_fewer_accumulation_steps(images, tmp_path, capsys):
    """Batch 8 in 4 micro-steps of 2 at 32 px: the 16 px stages hold 8 at once (8 x 16^2 = 2 x 32^2
    pixels), 24 px needs ceil(4 x 0.5625) = 3, which does not split 8: 4. The same samples per step;
    train.accum_by_stage=false keeps 4 everywhere."""
    import json

    out = tmp_path / "run"
    assert main(tiny(images, out, "curriculum.name=etpp", "curriculum.epochs=1.5", "train.accum_steps=4")) == 0
    rows = json.loads((out / "plan.json").read_text())["rows"]
    assert [(r["size"], r["accum_steps"]) for r in rows] == [(16, 1)] * 2 + [(24, 4)] * 4 + [(32, 4)] * 4
    assert "stage 0: input 16, batch 8 x accum 1" in capsys.readouterr().out
    fixed = tmp_path / "fixed"
    assert main(tiny(images, fixed, "curriculum.name=etpp", "curriculum.epochs=1.5", "train.accum_steps=4",
                     "train.accum_by_stage=false")) == 0
    assert {r["accum_steps"] for r in json.loads((fixed / "plan.json").read_text())["rows"]} == {4}
    from engine.checkpoint import load_checkpoint

    a, b = (load_checkpoint(str(d / "checkpoints" / "checkpoint-latest.pth")) for d in (out, fixed))
    assert a["samples_seen"] == b["samples_seen"] and a["step"] == b["step"]


def test_compile_mode_choices_are_checked(images, tmp_path, capsys):
    assert main(tiny(images, tmp_path / "a", "train.compile_mode=fast")) == 2
    assert "train.compile_mode: 'fast' is not allowed; allowed: default, reduce-overhead" in capsys.readouterr().err
    assert main(tiny(images, tmp_path / "b", "train.compile_mode=max-autotune", "train.compile_backend=eager")) == 2
    assert "is a mode of the inductor backend" in capsys.readouterr().err
    assert main(tiny(images, tmp_path / "c", "train.device=cpu", "train.compile=true",
                     "train.compile_mode=reduce-overhead")) == 2
    assert "captures CUDA graphs; this run is on cpu" in capsys.readouterr().err
