"""DALI JPEG decoding: loader workers hand over file bytes and a crop box, a per-process NVIDIA DALI
pipeline decodes only the box, resizes it (cubic, antialiased when shrinking, as PIL's bicubic)
and flips it, one batch ahead of the training step.

Why: decoding and resizing in PIL costs a CPU core about 3-4 ms per ImageNet-sized JPEG, so the
loader cannot feed a GPU in the curriculum's cheap low-resolution stages. Reading the bytes and
the image size from the JPEG header costs the worker a small fraction of that (the crop box and
flip stay ours: drawn from the sample's stream position, so resume is exact and crops do not
depend on the worker or rank count). DALI decodes with nvJPEG (``device="mixed"``) on a GPU and
with libjpeg-turbo on its CPU backend; a thread of the training process feeds it the next batch
while the current one trains (:class:`DecodeAhead`), so the training thread does not decode.

Pixels: the box is decoded with the margin a bicubic filter reads around it, and the resize
takes the box as its region of interest, so the crop edges see the same neighbours as PIL's
``resize(box=...)``. Measured against PIL on the same boxes (tests/test_dali.py, CPU backend):
mean absolute difference about 0.2 levels, max a few levels (DALI resizes in float, PIL in two
8-bit fixed-point passes).

What goes to the PIL path instead (the same crop, in the worker or, for a refused decode, in the
training process): files that are not JPEG, JPEGs that are not 8-bit grayscale / YCbCr (CMYK,
YCCK, 12-bit, arithmetic coding), JPEGs without their end-of-image marker (truncated: PIL decides
whether to skip them), and JPEGs DALI refuses at decode time (corrupt data). Every such image is
counted (:attr:`DaliDecoder.worker_decoded`, :attr:`DaliDecoder.fallbacks`) and unreadable files
are skipped and counted as on the CPU path.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

DALI_PACKAGE = "nvidia-dali-cuda130==2.4.0"
DALI_INSTALL = (f"install it with `pip install {DALI_PACKAGE}` (tools/setup.sh installs it; without CUDA the "
                "same wheel runs DALI's CPU backend)")

# Start-of-frame markers with Huffman coding that the decoders handle (baseline, extended, progressive).
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    progressive: bool
    sof: int

    @property
    def device_decodable(self) -> bool:
        """8-bit Huffman-coded grayscale or 3-component images (CMYK and friends go to PIL)."""
        return self.sof in _SOF_DEVICE and self.precision == 8 and self.components in (1, 3) \
            and self.width > 0 and self.height > 0


def jpeg_header(data: bytes) -> Optional[JpegHeader]:
    """Size and coding of a JPEG from its start-of-frame segment, or None when ``data`` is not a
    JPEG or its header cannot be read (the caller then takes the CPU path, which decides whether
    the file is readable at all)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:                       # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):               # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_ALL:
            if length < 8 or pos + 10 > n:
                return None
            precision, height, width, comps = struct.unpack_from(">BHHB", data, pos + 4)
            return JpegHeader(width, height, comps, precision, marker == 0xC2, marker)
        pos += 2 + length
    return None


class EncodedBatch(NamedTuple):
    """What a worker sends for a device-decoded batch of N samples (all CPU tensors, so the
    DataLoader can pin them). Samples the worker decoded itself (the CPU path) arrive ready."""

    data: torch.Tensor        # uint8 [total bytes]: the JPEG files, concatenated
    offsets: torch.Tensor     # int64 [N + 1]: sample k's bytes are data[offsets[k]:offsets[k+1]] (empty: ready)
    boxes: torch.Tensor       # int64 [N, 4]: crop box (top, left, height, width)
    flips: torch.Tensor       # bool [N]: mirror horizontally after the resize
    index: torch.Tensor       # int64 [N]: the file actually used (after skipping unreadable ones)
    position: torch.Tensor    # int64 [N]: the sample's stream position (seeds its augmentation)
    ready: torch.Tensor       # uint8 [M, 3, S, S]: samples decoded by the worker
    ready_at: torch.Tensor    # int64 [M]: their places in the batch
    sizes: torch.Tensor       # int64 [N, 2]: image (height, width) from the JPEG header (0 for ready ones)
    bad: torch.Tensor         # int64 [N]: unreadable files skipped to produce each sample


@dataclass
class EncodedSample:
    """One worker result: JPEG bytes and the crop to apply (``image`` is None), or a ready
    uint8 [3, S, S] image from the CPU path."""

    data: Optional[np.ndarray]
    box: Tuple[int, int, int, int]
    flip: bool
    index: int
    position: int
    skipped: int
    image: Optional[torch.Tensor] = None
    hw: Tuple[int, int] = (0, 0)          # the JPEG's (height, width), from its header


def collate_encoded(items: Sequence[EncodedSample]) -> EncodedBatch:
    """Pack worker results into one :class:`EncodedBatch` (one byte tensor, not one per image:
    every tensor crossing the worker boundary costs a shared-memory segment)."""
    lengths = [0 if it.image is not None else len(it.data) for it in items]
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    chunks = [it.data for it in items if it.image is None]
    data = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, dtype=torch.uint8)
    ready_at = [k for k, it in enumerate(items) if it.image is not None]
    ready = (torch.stack([items[k].image for k in ready_at]) if ready_at
             else torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    return EncodedBatch(
        data=data, offsets=offsets,
        boxes=torch.tensor([it.box for it in items], dtype=torch.int64).reshape(-1, 4),
        flips=torch.tensor([it.flip for it in items], dtype=torch.bool),
        index=torch.tensor([it.index for it in items], dtype=torch.int64),
        position=torch.tensor([it.position for it in items], dtype=torch.int64),
        ready=ready, ready_at=torch.tensor(ready_at, dtype=torch.int64),
        sizes=torch.tensor([it.hw for it in items], dtype=torch.int64).reshape(-1, 2),
        bad=torch.tensor([it.skipped for it in items], dtype=torch.int64))


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (trailing zero padding allowed). A
    truncated file does not: it goes to PIL in the worker, which decides (as on the CPU path)
    whether it is readable, instead of DALI, which refuses what PIL may accept and vice versa."""
    end = len(data)
    while end > 2 and data[end - 1] == 0:
        end -= 1
    return end >= 4 and data[end - 2] == 0xFF and data[end - 1] == 0xD9


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (without importing it: the import takes a second)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def dali_version() -> str:
    """The installed DALI's version (imports it; raises ImportError when it is missing)."""
    import nvidia.dali

    return str(nvidia.dali.__version__)


def read_regions(heights: np.ndarray, widths: np.ndarray, boxes: np.ndarray, size: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What to decode for each crop box: the box plus the margin a bicubic filter reads around it
    (2 taps at the output scale, antialiased: 2 x box / size input pixels when shrinking, plus one),
    clipped to the image, so the resize sees the pixels beyond the box edges that PIL's
    ``resize(box=...)`` sees. Returns int32 (y, x) anchors and (h, w) shapes of the decoded regions,
    and float32 (y, x) starts and ends of the box inside them (the resize's region of interest)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    start, length = boxes[:, :2], boxes[:, 2:]
    full = np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], 1)
    margin = np.ceil(2.0 * np.maximum(1.0, length / size)).astype(np.int64) + 1
    lo = np.maximum(0, start - margin)
    hi = np.minimum(full, start + length + margin)
    roi_start = (start - lo).astype(np.float32)
    return lo.astype(np.int32), (hi - lo).astype(np.int32), roi_start, roi_start + length.astype(np.float32)


def _is_device_failure(err: BaseException) -> bool:
    """Errors of the device or the process, never of one file: they must stop the run."""
    if isinstance(err, (torch.OutOfMemoryError, torch.AcceleratorError, MemoryError)):
        return True
    msg = str(err).lower()
    return any(s in msg for s in ("out of memory", "cuda error", "cudaerror", "cuda_error", "cuda driver"))


def _reason(err: BaseException) -> str:
    """The line of a DALI pipeline error that names the failure (its message repeats a traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("Failed to decode")), lines[0] if lines else repr(err))[:200]


class _Decoded(NamedTuple):
    images: torch.Tensor      # uint8 [N, 3, S, S] on the device
    skipped: int              # files skipped by PIL fallbacks
    fallbacks: int            # JPEGs DALI refused (PIL decoded them in the training process)
    worker_decoded: int       # samples the workers sent ready


class DaliDecoder:
    """Turns an :class:`EncodedBatch` into uint8 [N, 3, size, size] on ``device`` with a DALI pipeline.

    ``fallback(index, position)`` runs the CPU path for one sample (PIL decode of file ``index``,
    skipping onward if it is unreadable, with the crop seeded by ``position``) and returns
    ``(uint8 [3, size, size], files skipped)``; it is used for JPEGs DALI refuses.

    The pipeline (external_source -> decoders.image_slice -> resize -> flip -> transpose) runs on
    DALI's CPU backend when ``device`` is the CPU and with ``device="mixed"`` (nvJPEG) + GPU resize
    on CUDA. It is used from one thread of its own: :meth:`submit` starts a batch there (see
    :class:`DecodeAhead`), the call returns its result. On CUDA the output is copied into a torch
    tensor on a side stream (DALI reuses its buffers at the next run), which the training stream
    then waits for, so the copy never races the previous step's kernels.
    """

    def __init__(self, size: int, device: torch.device,
                 fallback: Callable[[int, int], Tuple[torch.Tensor, int]],
                 num_threads: Optional[int] = None) -> None:
        if not dali_available():
            raise RuntimeError(f"NVIDIA DALI is not installed; {DALI_INSTALL}")
        self.size, self.device, self.fallback = size, torch.device(device), fallback
        self.num_threads = num_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.fallbacks = 0          # JPEGs DALI refused (decoded by PIL instead)
        self.worker_decoded = 0     # images the workers sent ready (not JPEG, CMYK, truncated, ...)
        self.version = dali_version()
        self._warned = False
        self._pipe: Any = None
        self._batch = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dali-decode")
        self._pending: List[Tuple[EncodedBatch, "concurrent.futures.Future[_Decoded]"]] = []
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def backend(self) -> str:
        """What decodes: ``DALI 2.4.0 (mixed: nvJPEG on cuda:0)`` or ``DALI 2.4.0 (CPU backend)``."""
        if self.device.type == "cuda":
            return f"DALI {self.version} (mixed: nvJPEG + GPU resize on {self.device})"
        return f"DALI {self.version} (CPU backend, {self.num_threads} threads)"

    # -- the pipeline ------------------------------------------------------------------------
    def _build(self, batch: int) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        cuda = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        pipe = Pipeline(batch_size=batch, num_threads=self.num_threads, device_id=device_id, exec_dynamic=True,
                        prefetch_queue_depth=1, seed=0)
        with pipe:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            # PIL's choices: no EXIF rotation (the CPU path ignores it), libjpeg's fancy upsampling
            img = fn.decoders.image_slice(data, anchor, shape, device="mixed" if cuda else "cpu",
                                          output_type=types.RGB, axis_names="HW", normalized_anchor=False,
                                          normalized_shape=False, adjust_orientation=False,
                                          jpeg_fancy_upsampling=True)
            img = fn.resize(img, size=[self.size, self.size], roi_start=roi_start, roi_end=roi_end,
                            roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.flip(img, horizontal=flip)
            pipe.set_outputs(fn.transpose(img, perm=[2, 0, 1]))
        pipe.build()
        self._pipe, self._batch = pipe, batch

    def _run(self, datas: List[np.ndarray], shapes: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """One pipeline run: uint8 [M, 3, S, S] on the device. ``shapes``: int [M, 2] (height, width)."""
        m = len(datas)
        if self._pipe is None or m > self._batch:
            self._build(max(m, self._batch))
        anchor, shape, r0, r1 = read_regions(shapes[:, 0], shapes[:, 1], boxes, self.size)
        p = self._pipe
        p.feed_input("data", datas)
        p.feed_input("anchor", list(anchor))
        p.feed_input("shape", list(shape))
        p.feed_input("roi_start", list(r0))
        p.feed_input("roi_end", list(r1))
        p.feed_input("flip", [np.array(int(f), dtype=np.int32) for f in flips])
        (out,) = p.run()
        t = out.as_tensor()
        if self._stream is None:
            return torch.from_numpy(np.array(t))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        with torch.cuda.stream(self._stream):
            dst = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, dst, cuda_stream=self._stream)
        return dst

    def check(self) -> None:
        """Decode a tiny JPEG through the pipeline; raises ``RuntimeError`` saying why it cannot
        (e.g. a DALI without nvJPEG support for this GPU), so a run fails or picks PIL at its start."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
        data = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        try:
            img = self._pool.submit(self._run, [data], np.array([[16, 16]]), np.array([[0, 0, 16, 16]]),
                                    np.zeros(1, bool)).result()
        except RuntimeError as e:
            if _is_device_failure(e):
                raise
            raise RuntimeError(f"DALI {self.version} cannot decode JPEGs on {self.device}: {_reason(e)}") from None
        if tuple(img.shape) != (1, 3, self.size, self.size):
            raise RuntimeError(f"DALI decoded a 16x16 test JPEG on {self.device} to shape {tuple(img.shape)}")

    # -- one batch -----------------------------------------------------------------------------
    def _decode(self, batch: EncodedBatch) -> _Decoded:
        """Runs in the decoder's thread: DALI for the JPEGs, PIL for those it refuses."""
        n = batch.offsets.shape[0] - 1
        S = self.size
        offsets = batch.offsets.tolist()
        jpeg_ids = [k for k in range(n) if offsets[k + 1] > offsets[k]]
        raw = batch.data.numpy()
        datas = [raw[offsets[k]:offsets[k + 1]] for k in jpeg_ids]
        sizes = batch.sizes.numpy()
        boxes, flips = batch.boxes.numpy(), batch.flips.numpy()
        out = torch.empty(n, 3, S, S, dtype=torch.uint8, device=self.device)
        refused: List[int] = []
        if jpeg_ids:
            sel = np.asarray(jpeg_ids)
            try:
                out[torch.as_tensor(sel, device=self.device)] = self._run(datas, sizes[sel], boxes[sel], flips[sel])
            except RuntimeError as e:
                if _is_device_failure(e):
                    raise
                for j, k in enumerate(jpeg_ids):          # find the culprits one by one
                    try:
                        out[k] = self._run([datas[j]], sizes[k:k + 1], boxes[k:k + 1], flips[k:k + 1])[0]
                    except RuntimeError as e1:
                        if _is_device_failure(e1):
                            raise
                        if not self._warned:
                            self._warned = True
                            warnings.warn(f"DALI could not decode a JPEG ({_reason(e1)}; DALI's log above says "
                                          "why); decoding such images with PIL in the training process instead "
                                          "(counted as decode_fallbacks in the metrics)")
                        refused.append(k)
        skipped = 0
        for k in refused:
            image, extra = self.fallback(int(batch.index[k]), int(batch.position[k]))
            out[k] = image.to(self.device)
            skipped += extra
        if batch.ready_at.numel():
            out[batch.ready_at.to(self.device)] = batch.ready.to(self.device)
        if self._stream is not None:
            self._stream.synchronize()        # the result is complete when the future is
        return _Decoded(out, skipped, len(refused), int(batch.ready_at.numel()))

    def submit(self, batch: EncodedBatch) -> None:
        """Start decoding ``batch`` in the decoder's thread; the call with this batch takes the result."""
        with self._lock:
            self._pending.append((batch, self._pool.submit(self._decode, batch)))

    def _take(self, batch: EncodedBatch) -> "concurrent.futures.Future[_Decoded]":
        with self._lock:
            for i, (b, fut) in enumerate(self._pending):
                if b.data is batch.data and b.offsets is batch.offsets:
                    del self._pending[:i + 1]        # earlier ones were never asked for: dropped
                    return fut
        return self._pool.submit(self._decode, batch)

    def __call__(self, batch: EncodedBatch) -> Tuple[torch.Tensor, int]:
        """(uint8 [N, 3, S, S] on the device, files skipped by fallbacks in this call)."""
        res = self._take(batch).result()
        self.fallbacks += res.fallbacks
        self.worker_decoded += res.worker_decoded
        if self._stream is not None:
            res.images.record_stream(torch.cuda.current_stream(self.device))
        return res.images, res.skipped

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._pipe = None


class DecodeAhead:
    """A loader of encoded batches whose decode starts one batch early: batch k+1 goes to the
    decoder's thread before batch k is handed to the training step, so the step never waits for
    a decode that could have run during the previous step. Batches are yielded unchanged."""

    def __init__(self, loader: Any, decoder: DaliDecoder) -> None:
        self.loader, self.decoder = loader, decoder

    def __iter__(self):
        held = None
        for batch in self.loader:
            self.decoder.submit(EncodedBatch(*batch))
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

