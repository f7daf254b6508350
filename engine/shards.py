"""WebDataset-style tar shards as an :class:`~engine.data.ImageSource`, for cluster file systems
where 1.28M small files are slow: ~1000 big uncompressed tars, each read by (offset, size).

Shard layout (what :func:`write_shards` writes; any uncompressed tar can be read): files
``{prefix}-{n:06d}.tar``; a sample is the members sharing a key, ``000042.jpg`` (the original image
bytes, extension lowercased) and, for an ImageFolder source, ``000042.cls`` (the class index in
ASCII); ``classes.txt`` next to the shards lists the class names in index order. The images of a
shard are its regular members with an image extension (any case), in tar order; other members
(``.cls``, ``.json``, folders) are ignored.

Index ``<shard>.idx`` (e.g. ``shard-000000.tar.idx``), so opening 1000 shards does not scan them:
UTF-8 text, ``\\n``-terminated lines::

    #tarshard-index 1 <shard size in bytes> <image count>
    <data offset> <size> <member name>        (one line per image, tar order; the name is the
                                              rest of the line)

It is rebuilt by scanning the tar (and rewritten atomically when the folder is writable) when it
is missing, older than the shard, of another version or shard size, or corrupt (with a warning).
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
import warnings
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .images import IMAGE_EXTENSIONS, DataError, list_images

INDEX_TAG, INDEX_VERSION = "#tarshard-index", 1
_BRACE = re.compile(r"\{([^{}]*)\}")
Index = Tuple[np.ndarray, np.ndarray, List[str]]      # data offsets, sizes, member names


def expand_braces(pattern: str) -> List[str]:
    """WebDataset's shard notation: ``{000..146}`` zero-padded ranges (the width of a bound
    written with a leading zero) and ``{a,b}`` lists; several braces give their product."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        pad = any(len(x) > 1 and x[0] == "0" for x in (a, b))
        width = max(len(a), len(b)) if pad else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    else:
        items = body.split(",") if "," in body else ["{" + body + "}"]
    return [pattern[:m.start()] + x + rest for x in items for rest in expand_braces(pattern[m.end():])]


def is_shard_path(path: str) -> bool:
    """A ``.tar`` path or pattern, or a folder holding ``.tar`` files and neither images nor
    subfolders (an ImageFolder tree with a stray archive in it stays an image folder)."""
    if path.lower().endswith(".tar"):
        return True
    if not os.path.isdir(path):
        return False
    entries = list(os.scandir(path))
    names = [e.name.lower() for e in entries]
    return (any(n.endswith(".tar") for n in names) and not any(n.endswith(IMAGE_EXTENSIONS) for n in names)
            and not any(e.is_dir() for e in entries))


def _scan_tar(shard: str) -> Index:
    try:
        with tarfile.open(shard, "r:") as tf:
            members = [m for m in tf if m.isreg() and not m.issparse() and m.name.lower().endswith(IMAGE_EXTENSIONS)]
    except tarfile.TarError as e:
        raise DataError(f"cannot index tar shard {shard!r}: {e} (shards must be uncompressed tar files)") from e
    return (np.array([m.offset_data for m in members], np.int64), np.array([m.size for m in members], np.int64),
            [m.name for m in members])


def _parse_index(lines: List[str], tar_size: int) -> Index:
    """The lines of an index file checked against the format and the shard size (ValueError if not)."""
    head = lines[0].split(" ")
    rows = [ln.split(" ", 2) for ln in lines[1:-1]]
    offsets = np.array([int(r[0]) for r in rows], np.int64)
    sizes = np.array([int(r[1]) for r in rows], np.int64)
    if (len(head) != 4 or head[0] != INDEX_TAG or lines[-1] != "" or len(rows) != int(head[3])
            or any(len(r) != 3 for r in rows) or np.any(offsets % 512) or np.any(np.diff(offsets) <= 0)
            or np.any(offsets <= 0) or np.any(sizes < 0) or np.any(offsets + sizes > tar_size)):
        raise ValueError("not a valid index")
    return offsets, sizes, [r[2] for r in rows]


def _read_index(shard: str) -> Optional[Index]:
    """The index in ``<shard>.idx``, or None when it is missing, stale or corrupt (warned)."""
    try:
        idx_stat, tar_stat = os.stat(shard + ".idx"), os.stat(shard)
        if idx_stat.st_mtime_ns < tar_stat.st_mtime_ns:
            return None
        with open(shard + ".idx", encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    head = lines[0].split(" ")
    if head[0] == INDEX_TAG and len(head) > 2 and (head[1] != str(INDEX_VERSION) or head[2] != str(tar_stat.st_size)):
        return None                                  # another format version, or the shard changed
    try:
        return _parse_index(lines, tar_stat.st_size)
    except (ValueError, IndexError):
        warnings.warn(f"corrupt tar shard index {shard + '.idx'!r}; rebuilding it from the shard")
        return None


def _write_index(shard: str, index: Index) -> None:
    """Write ``<shard>.idx`` atomically (temp file + rename: concurrent ranks never see half of one)."""
    offsets, sizes, names = index
    if any("\n" in n for n in names):
        raise OSError("a member name contains a newline")
    lines = [f"{INDEX_TAG} {INDEX_VERSION} {os.path.getsize(shard)} {len(names)}"]
    lines += [f"{o} {s} {n}" for o, s, n in zip(offsets.tolist(), sizes.tolist(), names)]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(shard)), prefix=".idx-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, shard + ".idx")
    except BaseException:
        os.unlink(tmp)
        raise


class TarShardSource:
    """Images stored as members of uncompressed tar shards, read with one ``os.pread`` each.

    ``pread`` does not move a shared file offset, and descriptors are reopened in each process
    (a forked DataLoader worker never uses its parent's). At most ``max_open`` stay open per
    process (least recently used closed): random reads over 1000 shards would otherwise hold
    1000 descriptors in every worker."""

    max_open = 128

    def __init__(self, shards: Sequence[str]) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise FileNotFoundError("no tar shards given")
        parts, unwritten = [], []
        for shard in self.shards:
            index = _read_index(shard)
            if index is None:
                index = _scan_tar(shard)
                try:
                    _write_index(shard, index)
                except OSError as e:
                    unwritten.append(f"{shard}: {e}")
            if not index[2]:
                raise FileNotFoundError(f"tar shard {shard!r} holds no images (members ending in "
                                        f"{', '.join(IMAGE_EXTENSIONS)})")
            parts.append(index)
        if unwritten:
            warnings.warn(f"could not write the index of {len(unwritten)} tar shard(s) ({unwritten[0]}); "
                          "kept in memory, they will be scanned again next time")
        self.offsets = np.concatenate([p[0] for p in parts])
        self.sizes = np.concatenate([p[1] for p in parts])
        self.shard_ids = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p[2]) for p in parts])
        self.members = [n for p in parts for n in p[2]]
        self._pid, self._fds = os.getpid(), OrderedDict()

    @classmethod
    def open(cls, path: str) -> "TarShardSource":
        """Shards of a ``data.path``: a folder's ``*.tar`` (sorted), or a ``.tar`` path or brace
        pattern (in pattern order)."""
        if os.path.isdir(path):
            shards = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(".tar"))
        else:
            shards = expand_braces(path)
        if not shards:
            raise FileNotFoundError(f"no tar shards in folder {path!r} (looked for *.tar files at its top level)")
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} tar shard(s) of {path!r} not found, first "
                                    f"{missing[0]!r} (give a .tar file, a folder of .tar files or a pattern like "
                                    f"shard-{{000000..000009}}.tar)")
        return cls(shards)

    def __len__(self) -> int:
        return len(self.members)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():                 # forked: these descriptors are the parent's
            self.close()
            self._pid = os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._fds[shard] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, i: int) -> bytes:
        offset, size = int(self.offsets[i]), int(self.sizes[i])
        fd = self._fd(int(self.shard_ids[i]))
        if hasattr(os, "pread"):
            data = os.pread(fd, size, offset)
        else:                                        # no fork there, and fds are per process
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, size)
        if len(data) != size:
            raise OSError(f"short read from {self.name(i)}: {len(data)} of {size} bytes "
                          "(shard truncated or changed after indexing?)")
        return data

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.shard_ids[i])]}:{self.members[i]}"

    def describe(self) -> str:
        n = len(self.shards)
        return f"{len(self)} images in {n} tar shard{'s' if n != 1 else ''}"

    def close(self) -> None:
        """Close this process's open shard files (reopened on the next read)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_fds": OrderedDict()}   # descriptors do not travel


def _tar_size(used: int) -> int:
    """The tar file size for members taking ``used`` bytes: plus 2 end blocks, padded to 10 KiB records."""
    return -(-(used + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)                     # defaults: mtime 0, mode 0o644, uid/gid 0, no owner names
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(src: str, out_dir: str, prefix: str = "shard", max_count: int = 10000,
                 max_bytes: int = 1 << 30, overwrite: bool = False) -> List[str]:
    """Pack the images of ``src`` (a folder tree or a ``.txt`` list; ImageFolder class subfolders
    give ``.cls`` members and ``classes.txt``) into shards of at most ``max_count`` images and
    ``max_bytes`` bytes (one larger image gets a shard alone). Byte-identical on every run;
    ``overwrite`` deletes the ``*.tar`` already in ``out_dir`` first. Returns the shard paths."""
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count} and {max_bytes}")
    files = list_images(src)
    rel = [os.path.relpath(f, src).split(os.sep) for f in files] if os.path.isdir(src) else []
    classes = sorted({r[0] for r in rel}) if rel and all(len(r) > 1 for r in rel) else []
    class_index = {c: k for k, c in enumerate(classes)}
    os.makedirs(out_dir, exist_ok=True)
    old = sorted(n for n in os.listdir(out_dir) if n.lower().endswith(".tar"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir!r} already holds {len(old)} tar shard(s) ({old[0]}, ...); "
                              "pass overwrite=True (--overwrite) to replace them")
    for n in old + [n + ".idx" for n in old] + ["classes.txt"]:
        if os.path.exists(os.path.join(out_dir, n)):
            os.remove(os.path.join(out_dir, n))
    width = max(6, len(str(len(files) - 1)))
    shards: List[str] = []
    tf, used, count = None, 0, 0
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            data = fh.read()
        need = 512 + -(-len(data) // 512) * 512 + (1024 if classes else 0)
        if tf is None or count == max_count or _tar_size(used + need) > max_bytes:
            if tf is not None:
                _finish(tf, shards[-1])
            shards.append(os.path.join(out_dir, f"{prefix}-{len(shards):06d}.tar"))
            tf, used, count = tarfile.open(shards[-1] + ".tmp", "w", format=tarfile.USTAR_FORMAT), 0, 0
        key = str(i).zfill(width)
        _add(tf, f"{key}{os.path.splitext(f)[1].lower()}", data)
        if classes:
            _add(tf, f"{key}.cls", str(class_index[rel[i][0]]).encode("ascii"))
        used, count = used + need, count + 1
    _finish(tf, shards[-1])
    if classes:
        with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(classes) + "\n")
    return shards


def _finish(tf: tarfile.TarFile, shard: str) -> None:
    """Close a shard, rename it into place (readers never see half a shard), then index it."""
    tf.close()
    os.replace(shard + ".tmp", shard)
    _write_index(shard, _scan_tar(shard))
