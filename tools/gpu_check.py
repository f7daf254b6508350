#!/usr/bin/env python
"""The GPU acceptance check: what to run first on a new node (under 8 minutes on one GPU).

    .venv/bin/python tools/gpu_check.py                  # MAE ViT-B at 96 / 160 / 224 on cuda
    .venv/bin/python tools/gpu_check.py --device cpu --tiny   # the same checks on a CPU (CI: < 2 min)
    .venv/bin/python tools/gpu_check.py --save           # also write benchmarks/results/gpu_check_<date>_<device>.json

Prints one JSON line: ``ok`` (every check passed), the device and the torch / CUDA / DALI
versions, and

- ``pixels_vs_pil``: the DALI decode of position-seeded crop boxes of synthetic JPEGs against
  the PIL path on the same boxes (mean and max absolute difference in 8-bit levels; check: mean
  <= 2);
- ``fft_crop_max_error``: the device low-frequency crop against numpy's float64 FFT formula
  (check: < 1e-3 on unit-variance images);
- ``replay_round_trip``: a batch through the replay buffer's host ring and back (check: every
  replayed chunk equals a stored one in float16, bit for bit) and its GB/s;
- ``model_only``: per-stage images/s of the MAE (forward + backward + AdamW step on device-resident
  batches, bf16 autocast on a GPU) and its FLOPs per image relative to the final size;
- ``end_to_end``: a real three-stage pretraining run (``python -m pretrain`` in process: synthetic
  JPEGs, DALI decode, low-frequency crop, the training loop) with per-stage steady-state images/s
  (the median of the logged windows after each stage's first), host CPU ms per image (this
  process and its loader workers) and the run's own per-stage wall efficiency;
- ``host_syncs_per_step``: host-device synchronisations in one steady-state training step
  (``torch.cuda.set_sync_debug_mode``; check on CUDA: 0; ``null`` on a CPU);
- ``model_only_cuda_graphs`` (CUDA): the same under ``torch.compile(mode="reduce-overhead")``,
  what ``train.compile=true train.compile_mode=reduce-overhead`` trains with;
- ``wall_efficiency``: per stage, (images/s at the stage / at the final size) / (FLOPs per image
  at the final size / at the stage), model-only (eager and with CUDA graphs) and end to end (check
  on CUDA: every stage >= 0.9 model-only, with CUDA graphs where measured, the goal of the GPU
  path; reported but not checked on a CPU).

Every figure is measured in this run on this machine; nothing is estimated.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.distributed import dali_version, describe_environment, resolve_device  # noqa: E402

FULL = {"arch": "mae_vit_base_patch16", "patch": 16, "sizes": [96, 160, 224], "batch": 256, "images": 1024,
        "steps": 40, "log_every": 5, "model_steps": 30, "workers": 8, "jpeg": (360, 520), "overrides": {}}
TINY = {"arch": "mae_vit_tiny_patch16", "patch": 8, "sizes": [16, 24, 32], "batch": 16, "images": 48,
        "steps": 8, "log_every": 2, "model_steps": 4, "workers": 0, "jpeg": (40, 72),
        "overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
                      "decoder_num_heads": 2}}


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def synthetic_jpegs(folder: str, n: int, sides: tuple, seed: int = 0) -> None:
    """``n`` JPEGs of varied sizes: smooth colour fields with edges and noise (natural-image-like
    spectra, so resize and decode errors show), a tenth of them grayscale."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(sides[0], sides[1], 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 4) * xx + rng.uniform(0.5, 4) * yy + rng.uniform()))
                         for _ in range(3)], -1)
        base += (xx[..., None] > rng.uniform(0.2, 0.8)) * rng.uniform(-1, 1, 3)
        img = np.clip(127 + 80 * base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        if i % 10 == 9:
            pil = pil.convert("L")
        pil.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def check_pixels(folder: str, size: int, device: torch.device, n: int) -> Dict[str, Any]:
    """DALI on the workers' encoded batches vs PIL on the same position-seeded boxes."""
    from engine.data import open_image_source
    from engine.decode import DaliDecoder, EncodedBatch
    from pretrain.data import MAEPretrainDataset

    source = open_image_source(folder)
    n = min(n, len(source))
    dali_ds = MAEPretrainDataset(source, size, decode="dali")
    pil_ds = MAEPretrainDataset(source, size, decode="cpu")
    keys = [(i, 1000 + i, 0.0, size) for i in range(n)]
    batch = dali_ds.collate([dali_ds[k] for k in keys])
    decoder = DaliDecoder(size, device, pil_ds.fallback)
    try:
        out, _ = decoder(EncodedBatch(*batch[:-1], bad=None))
    finally:
        decoder.close()
    ref = pil_ds.collate([pil_ds[k] for k in keys])[0]
    d = (out.cpu().int() - ref.int()).abs().float()
    return {"size": size, "images": n, "mean": round(float(d.mean()), 4), "max": int(d.max()),
            "fallbacks": decoder.fallbacks, "worker_decoded": decoder.worker_decoded, "backend": decoder.backend}


def check_fft(device: torch.device, size: int, stage: int) -> float:
    from efficienttrain.fourier import low_frequency_crop

    x = np.random.default_rng(1).standard_normal((4, 3, size, size))
    spec = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    top = size // 2 - stage // 2
    block = spec[..., top:top + stage, top:top + stage]
    ref = np.real(np.fft.ifft2(np.fft.ifftshift(block, axes=(-2, -1)))) * (stage * stage) / (size * size)
    out = low_frequency_crop(torch.from_numpy(x).float().to(device), stage).cpu().double().numpy()
    return float(np.abs(out - ref).max())


def check_replay(device: torch.device, size: int, batch: int) -> Dict[str, Any]:
    from efficienttrain.replay import ReplayBuffer

    chunks = 8 if batch % 8 == 0 else 1
    buf = ReplayBuffer(1, 2, chunks, store_dtypes=(torch.float16,), seed=0)
    x = torch.randn(batch, 3, size, size, device=device)
    sync(device)
    t0 = time.perf_counter()
    out = buf.step(x)[0]
    sync(device)
    seconds = time.perf_counter() - t0
    stored = x.half().float().split(batch // chunks)
    replayed = out[batch:].float().split(batch // chunks)
    exact = all(any(torch.equal(r, s) for s in stored) for r in replayed)
    moved = x.numel() * 2 * 2          # float16 to the host and back
    buf.clear()
    return {"exact": exact, "gb_per_s": round(moved / seconds / 1e9, 3)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(spec: Dict[str, Any], device: torch.device, cuda_graphs: bool = False) -> Dict[str, Any]:
    """images/s of forward + backward + AdamW step per stage size, on device-resident batches;
    ``cuda_graphs``: the model under ``torch.compile(mode="reduce-overhead")`` (train.compile=true
    train.compile_mode=reduce-overhead), warm-up steps compile and capture."""
    from pretrain.models_mae import create_mae

    model = create_mae(spec["arch"], img_size=spec["sizes"][-1], patch_size=spec["patch"],
                       **spec["overrides"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    amp = device.type == "cuda"
    fwd = torch.compile(model, dynamic=False, mode="reduce-overhead") if cuda_graphs else model
    warmup = 5 if cuda_graphs else 3
    rows = {}
    for size in spec["sizes"]:
        model.prepare_input_size(size)
        x = torch.randn(spec["batch"], 3, size, size, device=device)
        for step in range(warmup + spec["model_steps"]):
            if step == warmup:
                sync(device)
                t0 = time.perf_counter()
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _, _ = fwd(x, mask_ratio=0.75)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        rows[str(size)] = spec["batch"] * spec["model_steps"] / (time.perf_counter() - t0)
    return rows


def flops_ratio(spec: Dict[str, Any]) -> Dict[str, float]:
    from engine.flops import flop_ratios, flops_per_sample
    from pretrain.config import ModelConfig
    from pretrain.flops import mae_builder

    cfg = ModelConfig(arch=spec["arch"], img_size=spec["sizes"][-1], patch_size=spec["patch"], **spec["overrides"])
    per = flops_per_sample(mae_builder(cfg), spec["sizes"])
    return {str(s): r for s, r in flop_ratios(per, spec["sizes"][-1]).items()}


def efficiency(ips: Dict[str, float], ratio: Dict[str, float], final: str) -> Dict[str, float]:
    return {s: round(v / ips[final] * ratio[s], 3) for s, v in ips.items()}


def end_to_end(spec: Dict[str, Any], device: torch.device, folder: str, work: str) -> Dict[str, Any]:
    """A three-stage pretraining run through the real entry point; per-stage steady-state images/s,
    host CPU per image and host syncs in one steady-state step."""
    import pretrain.main as pmain
    from engine.trainer import CurriculumTrainer

    sizes, steps, batch = spec["sizes"], spec["steps"], spec["batch"]
    cur = os.path.join(work, "three_stages.yaml")
    with open(cur, "w") as f:
        f.write("name: gpu-check\nbudget: epochs\nstages:\n"
                + "".join(f"  - {{size: {s}, share: {1 / len(sizes)!r}}}\n" for s in sizes))
    n = len(os.listdir(folder))
    epochs = len(sizes) * steps * batch / n
    out = os.path.join(work, "run")
    argv = [f"data.path={folder}", "data.demo=false", "data.decode=dali", f"data.num_workers={spec['workers']}",
            f"model.arch={spec['arch']}", f"model.img_size={sizes[-1]}", f"model.patch_size={spec['patch']}",
            *[f"model.{k}={v}" for k, v in spec["overrides"].items()],
            f"curriculum.name={cur}", f"curriculum.epochs={epochs}", f"curriculum.multiple_of={spec['patch']}",
            "curriculum.baseline_epochs=null", f"train.batch_size={batch}", f"train.warmup_epochs={epochs / 20}",
            f"train.log_every={spec['log_every']}", "train.progress=false", "train.save_every_minutes=0",
            f"train.device={device}", f"train.output_dir={out}", "train.resume=never"]
    syncs: List[int] = []
    probe_step = 2 * steps + steps // 2 + (1 if (2 * steps + steps // 2 + 1) % spec["log_every"] == 0 else 0)
    train_step = CurriculumTrainer._train_step

    def counted(self, it, info):
        if self.step != probe_step or self.dist.device.type != "cuda":
            return train_step(self, it, info)
        torch.cuda.synchronize(self.dist.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                images = train_step(self, it, info)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        return images

    CurriculumTrainer._train_step = counted
    usage0 = [resource.getrusage(r) for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            rc = pmain.main(argv)
    finally:
        CurriculumTrainer._train_step = train_step
    usage1 = [resource.getrusage(r) for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    if rc != 0:
        raise RuntimeError(f"the end-to-end pretraining run failed (exit {rc}); its log:\n{log.getvalue()[-3000:]}")
    cpu = sum(u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime for u0, u1 in zip(usage0, usage1))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"loss"' in line]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    ips: Dict[str, float] = {}
    for s in sizes:
        windows = [r["images_per_s"] for r in recs if r["size"] == s]
        ips[str(s)] = statistics.median(windows[1:] or windows)      # the first window holds the stage start
    images = sum(r["images"] for r in summary["stages"])
    return {"images_per_s": {k: round(v, 1) for k, v in ips.items()},
            "host_cpu_ms_per_image": round(cpu * 1e3 / images, 4),
            "run_wall_efficiency": {k: round(v, 3) for k, v in (summary.get("wall_efficiency") or {}).items()},
            "syncs": syncs[0] if syncs else None,
            "decode": next((line for line in log.getvalue().splitlines() if line.startswith("decode on")), "")}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny MAE at 16/24/32 px and a few steps (CI, CPUs)")
    ap.add_argument("--save", action="store_true", help="also write the JSON into benchmarks/results/")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="skip the model-only measurement under torch.compile with CUDA graphs (saves its compile time)")
    args = ap.parse_args(argv)
    spec = TINY if args.tiny else FULL
    try:
        device = resolve_device(args.device)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dali_version() is None:
        print("error: NVIDIA DALI is not installed (bash tools/setup.sh installs it)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    res: Dict[str, Any] = {"ok": False, "date": datetime.date.today().isoformat(), "device": str(device),
                           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "cuda": torch.version.cuda, "dali": dali_version(),
                           "environment": describe_environment(device), "tiny": args.tiny, "model": spec["arch"],
                           "sizes": spec["sizes"], "batch": spec["batch"]}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        folder = os.path.join(work, "jpegs")
        say(f"{spec['images']} synthetic JPEGs")
        synthetic_jpegs(folder, spec["images"], spec["jpeg"])
        say("pixels vs PIL")
        res["pixels_vs_pil"] = check_pixels(folder, spec["sizes"][-1], device, 64)
        res["fft_crop_max_error"] = check_fft(device, spec["sizes"][-1], spec["sizes"][0])
        say("replay round trip")
        res["replay_round_trip"] = check_replay(device, spec["sizes"][0], spec["batch"])
        say("model-only throughput")
        ratio = flops_ratio(spec)
        model = model_only(spec, device)
        final = str(spec["sizes"][-1])
        res["model_only"] = {"images_per_s": {k: round(v, 1) for k, v in model.items()},
                             "flops_ratio": {k: round(v, 4) for k, v in ratio.items()}}
        graphs = device.type == "cuda" and not args.no_cuda_graphs
        if graphs:
            say("model-only throughput with CUDA graphs (torch.compile reduce-overhead)")
            compiled = model_only(spec, device, cuda_graphs=True)
            res["model_only_cuda_graphs"] = {"images_per_s": {k: round(v, 1) for k, v in compiled.items()}}
        say("end-to-end pretraining run")
        e2e = end_to_end(spec, device, folder, work)
        res["end_to_end"] = {k: v for k, v in e2e.items() if k != "syncs"}
        res["host_syncs_per_step"] = e2e["syncs"]
        res["wall_efficiency"] = {"model_only": efficiency(model, ratio, final),
                                  "end_to_end": efficiency(e2e["images_per_s"], ratio, final)}
        if graphs:
            res["wall_efficiency"]["model_only_cuda_graphs"] = efficiency(compiled, ratio, final)
    checks = {"pixels_mean_le_2": res["pixels_vs_pil"]["mean"] <= 2.0,
              "fft_crop_error_lt_1e-3": res["fft_crop_max_error"] < 1e-3,
              "replay_exact": res["replay_round_trip"]["exact"],
              "end_to_end_ran": bool(res["end_to_end"]["images_per_s"])}
    if device.type == "cuda":
        checks["no_host_sync_in_a_step"] = res["host_syncs_per_step"] == 0
        best = res["wall_efficiency"].get("model_only_cuda_graphs", res["wall_efficiency"]["model_only"])
        checks["model_only_wall_efficiency_ge_0.9"] = min(best.values()) >= 0.9
    res["checks"] = checks
    res["ok"] = all(checks.values())
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(res)
    print(line)
    if args.save:
        name = f"gpu_check_{res['date']}_{res['device_name'].replace(' ', '-')}{'_tiny' if args.tiny else ''}.json"
        path = os.path.join(ROOT, "benchmarks", "results", name)
        with open(path, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
        say(f"written to {path}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
