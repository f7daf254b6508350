"""Device-side JPEG decoding: loader workers hand over file bytes and a crop box, the training
process decodes the batch on its device and crops, resizes and flips it in a few batched kernels.

Why: decoding and resizing in PIL costs a CPU core about 3 ms per ImageNet-sized JPEG, so the
loader cannot feed a GPU in the curriculum's cheap low-resolution stages. Reading the bytes and
the image size from the JPEG header costs the worker a small fraction of that; the decode runs
through ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU, which gives
PIL's pixels exactly) and the crop + resize through :func:`engine.resample.resized_crops`.

What goes to the CPU path instead (PIL, the same crop, in the worker or, for a failed device
decode, in the training process): files that are not JPEG, JPEGs that are not 8-bit grayscale /
YCbCr (CMYK, YCCK, 12-bit, arithmetic coding), and JPEGs the device decoder refuses (for example
progressive files nvJPEG cannot decode, or corrupt data). Every such image is counted
(:attr:`DeviceDecoder.worker_decoded`, :attr:`DeviceDecoder.fallbacks`) and unreadable files are
skipped and counted as on the CPU path.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .resample import resized_crops, to_device

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
        bad=torch.tensor([it.skipped for it in items], dtype=torch.int64))


def _decode_jpeg(datas: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """The one call into the decoder (torchvision; if image decoding ever moves to another
    package, this is the line to change)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def _is_device_failure(err: BaseException) -> bool:
    """Errors of the device or the process, never of one file: they must stop the run."""
    return isinstance(err, (torch.OutOfMemoryError, torch.AcceleratorError))


class DeviceDecoder:
    """Turns an :class:`EncodedBatch` into uint8 [N, 3, size, size] on ``device``.

    ``fallback(index, position)`` runs the CPU path for one sample (PIL decode of file ``index``,
    skipping onward if it is unreadable, with the crop seeded by ``position``) and returns
    ``(uint8 [3, size, size], files skipped)``; it is used for images the device decoder refuses.

    On CUDA the decode runs under a side stream: torchvision allocates its outputs on the current
    stream and decodes on nvJPEG's own stream, so on the training stream a new output could reuse
    memory that queued kernels of the previous step still read. From the side stream's pool it
    cannot; the training stream then waits for the side stream (torchvision returns only once its
    decode is done, so the host waits for the decode itself, never for the queued training work).
    """

    def __init__(self, size: int, device: torch.device,
                 fallback: Callable[[int, int], Tuple[torch.Tensor, int]],
                 dtype: Optional[torch.dtype] = None) -> None:
        self.size, self.device, self.fallback = size, torch.device(device), fallback
        self.dtype = dtype if dtype is not None else (torch.float32 if self.device.type == "cpu" else torch.float16)
        self.fallbacks = 0          # images the device decoder refused (decoded by PIL instead)
        self.worker_decoded = 0     # images the workers sent ready (not JPEG, CMYK, ...)
        self._warned = False
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def check(self) -> None:
        """Decode a tiny JPEG on the device; raises ``RuntimeError`` saying why it cannot (e.g. a
        torchvision built without nvJPEG), so a run fails or picks the CPU path at its start."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            img = self._decode([data])[0]
        except RuntimeError as e:
            if _is_device_failure(e):
                raise
            raise RuntimeError(f"torchvision cannot decode JPEGs on {self.device}: {e}") from None
        if tuple(img.shape) != (3, 16, 16):
            raise RuntimeError(f"torchvision decoded a 16x16 test JPEG on {self.device} to shape {tuple(img.shape)}")

    def _decode(self, datas: List[torch.Tensor]) -> List[torch.Tensor]:
        if self._stream is None:
            return _decode_jpeg(datas, self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            imgs = _decode_jpeg(datas, self.device)
        main.wait_stream(self._stream)
        for img in imgs:                       # the training stream uses them from here on
            img.record_stream(main)
        return imgs

    def _decode_all(self, datas: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Decode a list; if the batched call fails, find the culprits one by one. Out-of-memory
        and device errors are raised, not taken for a bad file."""
        if not datas:
            return []
        try:
            return list(self._decode(datas))
        except RuntimeError as e:
            if _is_device_failure(e):
                raise
        out: List[Optional[torch.Tensor]] = []
        for d in datas:
            try:
                out.append(self._decode([d])[0])
            except RuntimeError as e:
                if _is_device_failure(e):
                    raise
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"device JPEG decode failed ({e}); decoding such images with PIL on "
                                  "the CPU instead (counted as decode_fallbacks in the metrics)")
                out.append(None)
        return out

    def __call__(self, batch: EncodedBatch) -> Tuple[torch.Tensor, int]:
        """(uint8 [N, 3, S, S] on the device, files skipped by fallbacks in this call)."""
        n = batch.offsets.shape[0] - 1
        S = self.size
        offsets = batch.offsets.tolist()
        jpeg_ids = [k for k in range(n) if offsets[k + 1] > offsets[k]]
        decoded = self._decode_all([batch.data[offsets[k]:offsets[k + 1]] for k in jpeg_ids])
        out = torch.empty(n, 3, S, S, dtype=torch.uint8, device=self.device)
        ok = [k for k, img in zip(jpeg_ids, decoded) if img is not None]
        if ok:
            sel = torch.tensor(ok)
            out[to_device(sel, self.device)] = resized_crops([img for img in decoded if img is not None],
                                                             batch.boxes[sel], S, batch.flips[sel], dtype=self.dtype)
        skipped = 0
        for k, img in zip(jpeg_ids, decoded):
            if img is None:
                self.fallbacks += 1
                image, extra = self.fallback(int(batch.index[k]), int(batch.position[k]))
                out[k] = to_device(image, self.device)
                skipped += extra
        if batch.ready_at.numel():
            self.worker_decoded += batch.ready_at.numel()
            out[to_device(batch.ready_at, self.device)] = to_device(batch.ready, self.device)
        return out, skipped
