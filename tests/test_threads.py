"""engine/threads.py: the CPU wait policy the entry points set before torch loads."""
import ast
import sys
from pathlib import Path

import pytest

from engine.threads import configure

ROOT = Path(__file__).resolve().parents[1]


def test_configure_sets_passive_only_when_unset_and_not_disabled(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)   # as in a fresh entry point
    env = {}
    assert configure(env) == "OMP_WAIT_POLICY=PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure(env) is None and env == {"OMP_WAIT_POLICY": "ACTIVE"}       # the user's choice wins
    for off in ("off", "0", "false"):
        env = {"ET_CPU_THREADS": off}
        assert configure(env) is None and "OMP_WAIT_POLICY" not in env


def test_configure_refuses_to_pretend_after_torch_loaded():
    import torch  # noqa: F401  (loaded: OpenMP has read its environment already)
    env = {}
    assert configure(env) is None and env == {}


@pytest.mark.parametrize("pkg", ["pretrain", "finetune", "evaluation"])
def test_entry_points_configure_before_importing_anything_else(pkg):
    tree = ast.parse((ROOT / pkg / "__main__.py").read_text())
    calls = [i for i, node in enumerate(tree.body)
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and getattr(node.value.func, "id", "") == "_configure_threads"]
    project_imports = [i for i, node in enumerate(tree.body)
                       if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module.split(".")[0] != "engine")]
    assert calls and project_imports and calls[0] < min(project_imports)
