"""Project layout promises: core packages never import mm*, set-up rejects bad options."""
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]

BLOCK_MM = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mmcv', 'mmdet', 'mmengine'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import efficienttrain, efficienttrain.fourier, efficienttrain.curriculum, efficienttrain.replay
import efficienttrain.__main__, pretrain, finetune, engine.trainer, pretrain.main, pretrain.task, pretrain.checkpoints
assert not any(m.split('.')[0] in ('mmcv', 'mmdet', 'mmengine') for m in sys.modules)
print('ok')
"""


def test_core_packages_import_without_mm_libraries():
    r = subprocess.run([sys.executable, "-c", BLOCK_MM], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_core_dependencies_exclude_mm_libraries():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.lower().startswith(("mm", "pycocotools"))]
    det = " ".join(meta["optional-dependencies"]["det"])
    assert "mmdet==3.3.0" in det and "<2.2.0" in det


def test_setup_rejects_unknown_options():
    r = subprocess.run(["bash", str(ROOT / "tools" / "setup.sh"), "--gpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option '--gpu' (allowed: --core, --help)" in r.stderr


def test_constraints_pin_every_declared_dependency():
    pins = {line.split("==")[0].lower() for line in (ROOT / "tools" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + sum(meta["optional-dependencies"].values(), [])
    names = {d.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower() for d in declared}
    assert names <= pins, f"unpinned: {names - pins}"
