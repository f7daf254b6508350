"""Per-rank state across a resume: every rank continues with its own random generators (MAE
masks, Python / numpy streams), two gloo processes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from engine.checkpoint import load_checkpoint

from test_pretrain import images, tiny_overrides  # noqa: F401  (images: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def tiny(data, out, *extra):
    return tiny_overrides(data, out, "train.keep_last=0", *extra)


def two_ranks(tmp_path, tag, args):
    """Run ``args`` as two gloo processes; returns each rank's recorded masks (one per training step)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "tests/_record_masks.py", str(tmp_path / f"{tag}{r}.pt"), *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return [torch.load(tmp_path / f"{tag}{r}.pt") for r in range(2)], logs[0]


def test_per_rank_rng_survives_a_resume(images, tmp_path):
    """Stopped at step 4 (inside a stage) and resumed: after the resume each rank draws the masks
    the uninterrupted run drew, and the two ranks' masks differ (before per-rank states, every
    rank restored rank 0's generators and drew rank 0's masks)."""
    full, _ = two_ranks(tmp_path, "full", tiny(images, tmp_path / "full", "train.max_steps=7"))
    part, _ = two_ranks(tmp_path, "part", tiny(images, tmp_path / "part", "train.max_steps=4"))
    rest, log = two_ranks(tmp_path, "rest", tiny(images, tmp_path / "part", "train.max_steps=7"))
    assert "resumed from" in log and "at step 4/" in log
    assert [len(m) for m in full] == [7, 7] and [len(m) for m in part] == [4, 4] and [len(m) for m in rest] == [3, 3]
    for r in range(2):
        for a, b in zip(full[r], part[r] + rest[r]):
            assert torch.equal(a, b), f"rank {r}"
    assert not any(torch.equal(a, b) for a, b in zip(rest[0], rest[1]))
    ck = load_checkpoint(str(tmp_path / "part" / "checkpoints" / "checkpoint-00000004.pth"))
    assert len(ck["rng_ranks"]) == 2 and not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"])


def test_rng_is_derived_per_rank_when_the_process_count_changes(images, tmp_path, capsys):
    from pretrain.main import main

    out = tmp_path / "one"
    assert main(tiny(images, out, "train.max_steps=4")) == 0
    ck = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    assert len(ck["rng_ranks"]) == 1 and torch.equal(ck["rng_ranks"][0]["torch"], ck["rng"]["torch"])
    capsys.readouterr()
    masks, log = two_ranks(tmp_path, "two", tiny(images, out, "train.max_steps=5", "train.per_gpu_batch_size=4"))
    assert "holds the random states of 1 process(es), this run has 2" in log
    assert not torch.equal(masks[0][0], masks[1][0])
