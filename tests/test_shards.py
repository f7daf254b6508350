"""Tar shards: write_shards round trip, splitting, the .idx index (missing, stale, corrupt), foreign
tars, forked DataLoader workers, errors, determinism and tools/make_shards.py."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import shards as shards_mod
from engine.data import list_images, open_image_source
from engine.shards import TarShardSource, expand_braces, is_shard_path, write_shards

ROOT = Path(__file__).resolve().parents[1]
FILES = ["cat/a.jpg", "cat/b.PNG", "cat/c.jpeg", "dog/d.png", "dog/e.jpg", "dog/sub/f.jpg"]


@pytest.fixture
def src(tmp_path):
    """An ImageFolder with 2 classes: JPEG and PNG noise images of different sizes."""
    rng = np.random.RandomState(0)
    for k, rel in enumerate(FILES):
        p = tmp_path / "src" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.randint(0, 256, (24 + 4 * k, 20 + 2 * k, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p, format="PNG" if p.suffix.lower() == ".png" else "JPEG")
    return str(tmp_path / "src")


def originals(src):
    return [Path(f).read_bytes() for f in list_images(src)]


def read_all(source):
    return [source.read(i) for i in range(len(source))]


def test_round_trip_bytes_names_and_labels(src, tmp_path):
    out = tmp_path / "out"
    shards = write_shards(src, str(out), max_count=4)
    assert [os.path.basename(s) for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert all(os.path.isfile(s + ".idx") for s in shards)
    source = open_image_source(str(out))
    assert isinstance(source, TarShardSource) and source.describe() == "6 images in 2 tar shards"
    assert read_all(source) == originals(src)
    assert [source.members[i] for i in range(6)] == ["000000.jpg", "000001.png", "000002.jpeg", "000003.png",
                                                     "000004.jpg", "000005.jpg"]
    assert source.name(5) == f"{shards[1]}:000005.jpg"
    assert (out / "classes.txt").read_text() == "cat\ndog\n"
    labels = []
    for s in shards:
        with tarfile.open(s) as tf:
            labels += [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]
    assert labels == [0, 0, 0, 1, 1, 1]
    source.max_open = 1                               # least recently used shard file is closed
    assert [source.read(i) for i in (0, 5, 1, 4)] == [originals(src)[i] for i in (0, 5, 1, 4)]
    assert len(source._fds) == 1
    with open(shards[1], "r+b") as f:                 # truncated after indexing: a clear OSError
        f.truncate(1024)
    with pytest.raises(OSError, match="shard-000001.tar:000004.jpg"):
        source.read(4)
    source.close()


def expected_counts(src, max_bytes):
    """Greedy packing by the tar size: 512-byte header + padded data + a 1024-byte .cls member each,
    2 end blocks, 10240-byte records."""
    counts, used = [0], 0
    for data in originals(src):
        need = 512 + -(-len(data) // 512) * 512 + 1024
        if counts[-1] and -(-(used + need + 1024) // 10240) * 10240 > max_bytes:
            counts.append(0)
            used = 0
        counts[-1] += 1
        used += need
    return counts


@pytest.mark.parametrize("max_count,max_bytes", [(2, 1 << 30), (100, 20480), (100, 10240), (100, 1)])
def test_split_by_count_and_bytes(src, tmp_path, max_count, max_bytes):
    shards = write_shards(src, str(tmp_path / "out"), max_count=max_count, max_bytes=max_bytes)
    counts = [len(TarShardSource([s])) for s in shards]
    want = [2, 2, 2] if max_count == 2 else expected_counts(src, max_bytes)
    assert counts == want and sum(counts) == 6 and (max_bytes == 1 << 30 or 1 < len(want))
    assert all(os.path.getsize(s) <= max_bytes or c == 1 for s, c in zip(shards, counts))
    assert read_all(TarShardSource(shards)) == originals(src)


def test_paths_patterns_and_folder_open_the_same(src, tmp_path):
    out, single = tmp_path / "out", tmp_path / "single"
    write_shards(src, str(out), max_count=2)
    write_shards(src, str(single), prefix="train")
    forms = [str(out), str(out / "shard-{000000..000002}.tar"), str(out / "shard-{000000,000001,000002}.tar"),
             str(out / "shard-00000{0..2}.tar"), str(single / "train-000000.tar")]
    assert all(is_shard_path(p) for p in forms)
    sources = [TarShardSource.open(p) for p in forms]
    assert [len(s.shards) for s in sources] == [3, 3, 3, 3, 1]
    assert all(read_all(s) == originals(src) for s in sources)
    (tmp_path / "list.txt").write_text("src/cat/a.jpg\n")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "x.tar").write_bytes(b"")
    (tmp_path / "mixed" / "x.jpg").write_bytes(b"")
    (tmp_path / "tree" / "cat").mkdir(parents=True)                   # ImageFolder root with a stray archive
    (tmp_path / "tree" / "backup.tar").write_bytes(b"")
    for p in [src, str(tmp_path / "list.txt"), str(tmp_path / "mixed"), str(tmp_path / "tree"),
              str(tmp_path / "nowhere")]:
        assert not is_shard_path(p), p


def test_expand_braces():
    assert expand_braces("a{00..02}b{x,y}.tar") == ["a00bx.tar", "a00by.tar", "a01bx.tar", "a01by.tar",
                                                    "a02bx.tar", "a02by.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("x{y}.tar") == ["x{y}.tar"]


def test_index_missing_stale_corrupt_and_readonly(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shard = write_shards(src, str(out), max_count=100)[0]
    idx = Path(shard + ".idx")
    good = idx.read_text()
    assert good.startswith(f"#tarshard-index 1 {os.path.getsize(shard)} 6\n") and good.count("\n") == 7
    offset, size, name = good.split("\n")[1].split(" ")
    with open(shard, "rb") as f:
        f.seek(int(offset))
        assert (f.read(int(size)), name) == (originals(src)[0], "000000.jpg")

    idx.unlink()                                                   # missing: built and written
    assert read_all(TarShardSource.open(shard)) == originals(src) and idx.read_text() == good

    lines = good.split("\n")                                       # stale: valid but older than the shard
    idx.write_text(f"#tarshard-index 1 {os.path.getsize(shard)} 5\n" + "\n".join(lines[1:-2]) + "\n")
    assert len(TarShardSource.open(shard)) == 5                   # (a fresh one is trusted)
    os.utime(idx, ns=(0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(TarShardSource.open(shard)) == 6
    assert idx.read_text() == good
    idx.write_text(good.replace("#tarshard-index 1", "#tarshard-index 0"))   # another version: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(TarShardSource.open(shard)) == 6
    assert idx.read_text() == good

    for bad in [good[: len(good) // 2], good.replace(f"\n{offset} ", "\n13 ", 1),
                good.replace(" 6\n", " 7\n", 1), "garbage\n", ""]:
        idx.write_text(bad)
        with pytest.warns(UserWarning, match="corrupt tar shard index .*shard-000000.tar.idx"):
            source = TarShardSource.open(shard)
        assert read_all(source) == originals(src) and idx.read_text() == good

    def no_temp(*a, **k):
        raise PermissionError("read-only")
    shards = write_shards(src, str(tmp_path / "ro"), max_count=2)
    for s in shards:
        os.remove(s + ".idx")
    monkeypatch.setattr(shards_mod.tempfile, "mkstemp", no_temp)
    with pytest.warns(UserWarning, match="could not write the index of 3 tar shard") as rec:
        source = TarShardSource(shards)
    assert len([w for w in rec if "could not write" in str(w.message)]) == 1
    assert read_all(source) == originals(src) and not any(os.path.exists(s + ".idx") for s in shards)


def test_index_of_a_foreign_tar(tmp_path):
    """A tar written by tarfile: folders, non-image members, a symlink, a PAX long name."""
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (9, 7), (1, 2, 3)).save(jpg, format="JPEG")
    Image.new("RGB", (5, 5), (9, 8, 7)).save(png, format="PNG")
    long_name = "imgs/" + "x" * 150 + ".jpeg"
    members = [("imgs/", None), ("imgs/a.JPG", jpg.getvalue()), ("imgs/a.json", b'{"k": 1}'),
               ("notes.txt", b"hello"), ("imgs/link.jpg", "link"), (long_name, png.getvalue()),
               ("imgs/b.png", png.getvalue()[:-3])]
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, "a.JPG"
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else None)
    source = TarShardSource.open(str(path))
    assert source.members == ["imgs/a.JPG", long_name, "imgs/b.png"]
    assert read_all(source) == [jpg.getvalue(), png.getvalue(), png.getvalue()[:-3]]
    gz = tmp_path / "packed.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(path, arcname="x.jpg")
    with pytest.raises(ValueError, match="uncompressed"):
        TarShardSource.open(str(gz))


class SourceDataset(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        data = self.source.read(i)
        return i, data, os.getpid(), self.source._pid


def test_forked_dataloader_workers_read_the_same_bytes(src, tmp_path):
    write_shards(src, str(tmp_path / "out"), max_count=2)
    source = TarShardSource.open(str(tmp_path / "out"))
    assert source.read(3) == originals(src)[3]                   # the parent holds an open shard file
    loader = torch.utils.data.DataLoader(SourceDataset(source), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = sorted(loader)
    assert [g[0] for g in got] == list(range(6))
    assert all(pid == reopened_in != os.getpid() for _, _, pid, reopened_in in got)
    assert [g[1] for g in got] == originals(src)
    assert source.read(2) == originals(src)[2]


def test_errors_name_the_path(src, tmp_path):
    out = tmp_path / "out"
    write_shards(src, str(out), max_count=2)
    with pytest.raises(FileNotFoundError, match=r"3 of 6 tar shard.*shard-000003\.tar"):
        TarShardSource.open(str(out / "shard-{000000..000005}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tar shards in folder .*empty"):
        TarShardSource.open(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no tar shards given"):
        TarShardSource([])
    with tarfile.open(tmp_path / "text.tar", "w") as tf:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(FileNotFoundError, match=r"text\.tar' holds no images"):
        TarShardSource.open(str(tmp_path / "text.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_shards(str(tmp_path / "nowhere"), str(tmp_path / "o2"))
    with pytest.raises(FileExistsError, match="already holds 3 tar shard"):
        write_shards(src, str(out))
    with pytest.raises(ValueError, match="max_count"):
        write_shards(src, str(tmp_path / "o3"), max_count=0)
    assert write_shards(src, str(out), overwrite=True) == [str(out / "shard-000000.tar")]
    assert sorted(os.listdir(out)) == ["classes.txt", "shard-000000.tar", "shard-000000.tar.idx"]


def test_output_is_deterministic(src, tmp_path):
    a = write_shards(src, str(tmp_path / "a"), max_count=4)
    b = write_shards(src, str(tmp_path / "b"), max_count=4)
    for x, y in zip(a, b):
        assert Path(x).read_bytes() == Path(y).read_bytes()
        assert Path(x + ".idx").read_bytes() == Path(y + ".idx").read_bytes()
    with tarfile.open(a[0]) as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tf} == {(0, 0, 0, "", 0o644)}


def tool(*args):
    return subprocess.run([sys.executable, "tools/make_shards.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_make_shards_tool(src, tmp_path):
    out = tmp_path / "out"
    r = tool(src, out, "--max-count", "4", "--prefix", "train")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 shards, 6 images with class labels" in r.stdout
    path = next(ln for ln in r.stdout.splitlines() if ln.startswith("data.path="))[len("data.path="):]
    assert path == str(out / "train-{000000..000001}.tar")
    assert read_all(open_image_source(path)) == originals(src)
    r = tool(src, out)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "already holds 2 tar shard" in r.stderr
    r = tool(src, tmp_path / "o2", "--max-size", "12XB")
    assert r.returncode == 2 and "invalid size '12XB'" in r.stderr


def test_make_shards_parse_size():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [mod.parse_size(s) for s in ["1073741824", "500MB", "1GB", "1.5g", "64KiB", "2 M"]] == \
        [1 << 30, 500 << 20, 1 << 30, 3 << 29, 64 << 10, 2 << 20]
    for bad in ["", "GB", "-1MB", "0", "1PB"]:
        with pytest.raises(Exception, match="invalid size"):
            mod.parse_size(bad)
