"""The DALI data path (engine.decode.DaliDecoder, pretrain.data decode=dali) against the PIL path,
on DALI's CPU backend with train.device=cpu: same crops and flips, pixels within the stated
tolerance of PIL's bicubic, the same files skipped and counted, exact resume, worker-count
independence.

Tolerance (measured here, printed by the first test): DALI resizes in float with a cubic filter
antialiased like PIL's, PIL in two 8-bit fixed-point passes, and the decoded region differs at
its edges by libjpeg-turbo's cropped decode: mean absolute difference about 0.2 levels, max a
few levels. Asserted: mean <= 2 levels (the issue's acceptance), max <= 16.
"""
import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from engine.config import ConfigError, load_config  # noqa: E402
from engine.decode import (DaliDecoder, DecodeAhead, EncodedBatch, collate_encoded, jpeg_complete,  # noqa: E402
                           read_regions)
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import MAEPretrainDataset, rrc_params  # noqa: E402

from test_device_decode import jpeg_bytes, pil_reference, smooth_image  # noqa: E402
from test_pretrain import read_metrics, tiny_overrides  # noqa: E402

SHAPES = [(480, 640), (640, 427), (17, 33), (300, 7), (1000, 37), (64, 64), (90, 500), (333, 517)]
MEAN_LIMIT, MAX_LIMIT = 2.0, 16


def encoded_batch(datas, shapes, boxes, flips):
    """An EncodedBatch of JPEG bytes with the given boxes (what collate_encoded makes from workers)."""
    n = len(datas)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(d) for d in datas]).cumsum(0)
    return EncodedBatch(
        data=torch.from_numpy(np.concatenate([np.frombuffer(d, np.uint8) for d in datas])), offsets=offsets,
        boxes=torch.tensor(boxes, dtype=torch.int64), flips=torch.tensor(flips, dtype=torch.bool),
        index=torch.arange(n), position=torch.arange(n), ready=torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        ready_at=torch.zeros(0, dtype=torch.int64), sizes=torch.tensor(shapes, dtype=torch.int64), bad=None)


def no_fallback(idx, pos):
    raise AssertionError(f"unexpected PIL fallback for file {idx}")


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    arrays = [smooth_image(rng, h, w) for h, w in SHAPES for _ in range(3)]
    datas = [jpeg_bytes(a) for a in arrays]
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]   # what PIL trains on
    boxes, flips = [], []
    for k, a in enumerate(arrays):
        r = random.Random(k)
        boxes.append(rrc_params(r, a.shape[1], a.shape[0], (0.08, 1.0)))
        flips.append(r.random() < 0.5)
    return datas, decoded, [a.shape[:2] for a in arrays], boxes, flips


@pytest.mark.parametrize("size", [224, 96, 24])
def test_pixels_match_pil_bicubic_on_the_same_boxes(crops, size):
    datas, decoded, shapes, boxes, flips = crops
    dec = DaliDecoder(size, torch.device("cpu"), no_fallback)
    out, skipped = dec(encoded_batch(datas, shapes, boxes, flips))
    ref = pil_reference(decoded, boxes, flips, size)
    assert out.dtype == torch.uint8 and out.shape == ref.shape and skipped == 0
    d = (out.int() - ref.int()).abs().float()
    print(f"size {size}: mean |DALI - PIL| {d.mean():.3f} levels, max {d.max():.0f}, "
          f"> 2 levels on {(d > 2).float().mean():.3%} of values")
    assert d.mean() <= MEAN_LIMIT and d.max() <= MAX_LIMIT
    per_image = d.mean(dim=(1, 2, 3))
    assert per_image.max() <= MEAN_LIMIT                   # no image is off (a wrong box would be tens of levels)
    assert dec.fallbacks == 0 and dec.worker_decoded == 0


def test_read_regions_cover_the_box_plus_the_filter_margin():
    anchor, shape, r0, r1 = read_regions(np.array([100, 100]), np.array([80, 80]),
                                         np.array([[10, 20, 50, 40], [0, 0, 100, 80]]), 10)
    # shrinking 5x (rows) and 4x (cols): margins 11 and 9 taps, clipped to the image
    assert anchor.tolist() == [[0, 11], [0, 0]] and shape.tolist() == [[71, 58], [100, 80]]
    assert r0.tolist() == [[10, 9], [0, 0]] and r1.tolist() == [[60, 49], [100, 80]]


def test_flip_mirrors_the_same_crop(crops):
    datas, _, shapes, boxes, _ = crops
    dec = DaliDecoder(48, torch.device("cpu"), no_fallback)
    plain, _ = dec(encoded_batch(datas, shapes, boxes, [False] * len(datas)))
    flipped, _ = dec(encoded_batch(datas, shapes, boxes, [True] * len(datas)))
    assert torch.equal(flipped, plain.flip(-1))


def test_jpeg_complete():
    data = jpeg_bytes(smooth_image(np.random.default_rng(5), 20, 30))
    assert jpeg_complete(data) and jpeg_complete(data + b"\0\0\0")
    assert not jpeg_complete(data[:-1]) and not jpeg_complete(data[: len(data) // 2]) and not jpeg_complete(b"")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """JPEGs (RGB, grayscale, progressive, CMYK), a PNG, a truncated JPEG, a JPEG whose scan data is
    corrupt (header and end marker intact: only the decoder can tell) and a non-image."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(2)
    files = {}
    for k, (h, w) in enumerate([(60, 80), (80, 50), (45, 45), (70, 90), (50, 100), (64, 48)]):
        files[f"a{k}.jpg"] = jpeg_bytes(smooth_image(rng, h, w))
    files["b_gray.jpg"] = jpeg_bytes(smooth_image(rng, 50, 70)[..., 1])
    files["c_prog.jpg"] = jpeg_bytes(smooth_image(rng, 66, 52), progressive=True)
    b = io.BytesIO()
    Image.fromarray(smooth_image(rng, 40, 60)).convert("CMYK").save(b, "JPEG")
    files["d_cmyk.jpg"] = b.getvalue()
    b = io.BytesIO()
    Image.fromarray(smooth_image(rng, 55, 44)).save(b, "PNG")
    files["e.png"] = b.getvalue()
    full = jpeg_bytes(smooth_image(rng, 60, 60))
    files["f_truncated.jpg"] = full[: len(full) // 2]
    files["h_corrupt.jpg"] = full.replace(b"\xff\xdb", b"\xff\xfe", 2)   # quantisation tables -> comments
    files["g_garbage.jpg"] = b"this is not an image"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(str(p) for p in root.iterdir())


def test_collate_packs_bytes_into_one_tensor(mixed_folder):
    ds = MAEPretrainDataset(mixed_folder[:3], 16, decode="dali")
    items = [ds[(i, i, 0.0, 16)] for i in range(3)]
    b = collate_encoded(items)
    assert b.sizes.tolist() == [[60, 80], [80, 50], [45, 45]]       # (height, width) from the headers
    assert b.data.dtype == torch.uint8 and b.data.dim() == 1
    assert b.offsets.tolist() == [0] + list(np.cumsum([len(it.data) for it in items]))
    assert bytes(b.data[b.offsets[1]:b.offsets[2]].numpy()) == Path(mixed_folder[items[1].index]).read_bytes()


def both_paths(files, keys, size=32):
    """Both paths on the same sample keys (warnings about unreadable files are silenced in the
    workers' share, not in the decoder's: tests check the decoder's own warnings)."""
    cpu = MAEPretrainDataset(files, size, decode="cpu", seed=3)
    dali = MAEPretrainDataset(files, size, decode="dali", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_imgs, ref_bad = cpu.collate([cpu[k] for k in keys])
        items = [dali[k] for k in keys]
        batch = dali.collate(items)
    decoder = DaliDecoder(size, torch.device("cpu"), dali.fallback)
    out, skipped = decoder(EncodedBatch(*batch))
    return dali, items, EncodedBatch(*batch), decoder, (ref_imgs, ref_bad), (out, skipped)


def test_odd_files_are_decoded_or_skipped_as_pil_decides(mixed_folder):
    n = len(mixed_folder)
    keys = [(i, 100 + 7 * i, 0.0, 32) for i in range(n)] + [(i, 999 + i, 0.0, 32) for i in range(n)]
    dali, items, batch, decoder, (ref, ref_bad), (out, skipped) = both_paths(mixed_folder, keys)
    names = [Path(mixed_folder[it.index]).name for it in items]
    ref_names = []
    for k in keys:       # the file the PIL path used for each sample
        ref_names.append(Path(mixed_folder[MAEPretrainDataset(mixed_folder, 32).load(k[0])[1]]).name)
    # the same files skipped, the same ones used (the corrupt JPEG's samples: PIL skips it in the
    # training process after DALI refused it, and takes the next file, a0.jpg, as the PIL path does)
    assert [nm if nm != "h_corrupt.jpg" else "a0.jpg" for nm in names] == ref_names
    # the box and flip of every JPEG sample come from its header, as PIL's from the decoded image
    for k, it in zip(keys, items):
        if it.image is None:
            with Image.open(mixed_folder[it.index]) as im:
                assert (it.box, it.flip) == dali.augmentation(im.width, im.height, k[1])
                assert it.hw == (im.height, im.width)
    # CMYK and PNG come ready from the worker (PIL); truncated files go there too (PIL skips them);
    # the non-image is skipped there; the corrupt JPEG reaches DALI, which refuses it
    ready = {names[k] for k in batch.ready_at.tolist()}
    assert ready == {"d_cmyk.jpg", "e.png"}
    assert "g_garbage.jpg" not in names and "f_truncated.jpg" not in names
    # truncated -> garbage -> corrupt: the samples of all three use the corrupt JPEG
    assert names.count("h_corrupt.jpg") == 6 and "b_gray.jpg" in names and "c_prog.jpg" in names
    assert decoder.worker_decoded == 4 and decoder.fallbacks == 6
    # skipped files counted as on the PIL path (worker skips + skips of the fallback)
    assert int(batch.bad.sum()) + skipped == int(ref_bad.sum())
    # pixels: ready ones are PIL's exactly; DALI's within the tolerance
    fb = [k for k, nm in enumerate(names) if nm == "h_corrupt.jpg"]
    exact = batch.ready_at.tolist() + fb
    assert torch.equal(out[exact], ref[exact])
    d = (out.int() - ref.int()).abs().float()
    print(f"mixed folder: mean |DALI - PIL| {d.mean():.3f} levels, max {d.max():.0f}")
    assert d.mean() <= MEAN_LIMIT and d.max() <= MAX_LIMIT
    gray = [k for k, nm in enumerate(names) if nm == "b_gray.jpg"]
    assert (out[gray].int() - ref[gray].int()).abs().float().mean() <= MEAN_LIMIT
    assert torch.equal(out[gray][:, 0], out[gray][:, 1])  # grayscale -> equal RGB channels, as PIL converts


def test_decode_ahead_and_worker_count_do_not_change_batches(mixed_folder):
    ds = MAEPretrainDataset(mixed_folder, 32, decode="dali", seed=1)
    sampler = [[(i % len(mixed_folder), i, 0.0, 32) for i in range(b, b + 4)] for b in range(0, 24, 4)]

    def run(workers, ahead):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=ds.collate)
        dec = DaliDecoder(32, torch.device("cpu"), ds.fallback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = DecodeAhead(loader, dec) if ahead else loader
            out = [dec(EncodedBatch(*b))[0] for b in batches]
        assert not dec._pending                            # every started decode was taken
        dec.close()
        return out, dec.fallbacks, dec.worker_decoded

    a, b, c = run(0, False), run(2, True), run(0, True)
    assert len(a[0]) == 6 and a[1:] == b[1:] == c[1:]
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a[0], b[0], c[0]))


def test_device_is_the_former_name_of_dali(tmp_path):
    cfg = load_config(PretrainConfig, None, [f"data.path={tmp_path}", "data.decode=device"])
    assert cfg.data.decode_on(torch.device("cpu")) == "dali"
    assert MAEPretrainDataset([], 32, decode="device").decode == "dali"
    auto = load_config(PretrainConfig, None, [f"data.path={tmp_path}"])
    assert auto.data.decode_on(torch.device("cpu")) == "cpu"      # auto: PIL on a CPU machine


def test_dali_missing_is_a_config_error_saying_how_to_install(tmp_path, monkeypatch):
    import pretrain.config as pc

    monkeypatch.setattr(pc, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match=r"data\.decode=dali: NVIDIA DALI is not installed; install it with "
                                          r"`pip install nvidia-dali-cuda130==2\.4\.0`.*or use data\.decode=cpu"):
        load_config(PretrainConfig, None, [f"data.path={tmp_path}", "data.decode=dali"])
    cfg = load_config(PretrainConfig, None, [f"data.path={tmp_path}", "data.decode=auto"])
    assert cfg.data.decode_on(torch.device("cuda")) == "cpu"      # auto without DALI: PIL
    with pytest.raises(ConfigError, match="cannot be combined with data.lowfreq=cpu-lanczos"):
        monkeypatch.setattr(pc, "dali_available", lambda: True)
        load_config(PretrainConfig, None, [f"data.path={tmp_path}", "data.decode=dali", "data.lowfreq=cpu-lanczos"])


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(7)
    for i in range(24):
        h, w = 36 + (i * 7) % 30, 40 + (i * 11) % 40
        (root / f"{i:03d}.jpg").write_bytes(jpeg_bytes(smooth_image(rng, h, w)))
    return str(root)


def test_dali_run_resumes_exactly_and_logs_the_decoder(jpeg_folder, tmp_path, capsys):
    from pretrain.main import main

    dali = ["data.decode=dali", "train.device=cpu"]
    assert main(tiny_overrides(jpeg_folder, tmp_path / "full", *dali)) == 0
    assert main(tiny_overrides(jpeg_folder, tmp_path / "part", *dali, "train.max_steps=5")) == 0
    assert main(tiny_overrides(jpeg_folder, tmp_path / "part", *dali)) == 0
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [r["step"] for r in a] and len(a) > 5
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
    assert a[-1]["decode_fallbacks"] == 0 and a[-1]["decode_worker_images"] == 0
    out = capsys.readouterr().out
    import nvidia.dali
    assert f"decode on dali: DALI {nvidia.dali.__version__} (CPU backend" in out


def test_a_jpeg_dali_refuses_is_decoded_by_pil_and_counted(mixed_folder, monkeypatch):
    """A refusal (e.g. a file nvJPEG cannot decode but PIL can) costs that image a PIL decode in
    the training process, warned about once and counted; the rest of the batch stays DALI's."""
    files = [f for f in mixed_folder if Path(f).name in ("a0.jpg", "c_prog.jpg", "a1.jpg")]
    prog = np.frombuffer(Path(files[2]).read_bytes(), np.uint8)
    real = DaliDecoder._run

    def picky(self, datas, shapes, boxes, flips):
        if any(len(d) == len(prog) and np.array_equal(d, prog) for d in datas):
            raise RuntimeError("Critical error in pipeline:\nFailed to decode sample #0 : progressive")
        return real(self, datas, shapes, boxes, flips)

    monkeypatch.setattr(DaliDecoder, "_run", picky)
    keys = [(i, 40 + i, 0.0, 32) for i in range(len(files))]
    with pytest.warns(UserWarning, match="DALI could not decode a JPEG .*Failed to decode sample"):
        _, items, batch, decoder, (ref, _), (out, skipped) = both_paths(files, keys)
    assert decoder.fallbacks == 1 and skipped == 0 and batch.ready_at.numel() == 0
    assert torch.equal(out[2], ref[2])                     # PIL's pixels for the refused one
    assert (out.int() - ref.int()).abs().float().mean() <= MEAN_LIMIT


def test_device_errors_are_raised_not_taken_for_bad_files(mixed_folder, monkeypatch):
    def oom(self, *a):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(DaliDecoder, "_run", oom)
    ds = MAEPretrainDataset(mixed_folder[:2], 32, decode="dali")
    dec = DaliDecoder(32, torch.device("cpu"), ds.fallback)
    with pytest.raises(RuntimeError, match="out of memory"):
        dec(EncodedBatch(*ds.collate([ds[(i, i, 0.0, 32)] for i in range(2)])))
    assert dec.fallbacks == 0
    with pytest.raises(RuntimeError, match="out of memory"):
        dec.check()
