"""The layers hold (issue 26; ../shared/DESIGN.md, "Where the next parts go").

Bottom to top: ``efficienttrain`` (the curriculum library) -> ``engine`` (the loop, data,
checkpoints, the kNN monitor, FLOP counting) -> ``pretrain``, ``finetune`` (tasks, siblings) ->
``detection`` -> ``evaluation`` (drivers: study, search, run_eval, the engine-backed curriculum
CLI). A module imports only from its own layer or below; a lower layer that needs something of a
higher one takes it as an argument (e.g. the FLOP counter takes a model builder) or a registered
hook. And no two project modules import each other, directly or around a circle.

A static check: every ``.py`` under the packages is parsed with :mod:`ast`; imports count wherever
they are written (module level, inside functions, under ``if TYPE_CHECKING``) and relative imports
are resolved, so a lazy upward import is still an upward import. ``tools/`` and ``tests/`` sit on
top and are not checked.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

LAYERS: Dict[str, int] = {"efficienttrain": 0, "engine": 1, "pretrain": 2, "finetune": 2, "detection": 3,
                          "evaluation": 4}

# Imports between the same-rank siblings pretrain and finetune, each with its reason. Keep it empty:
# what both tasks need belongs in engine (or efficienttrain).
SIBLING_ALLOWED: Dict[Tuple[str, str], str] = {}

Edge = Tuple[str, str, int, bool]   # (importer module, imported module, line, at module level)


# ---- the static import graph ---------------------------------------------------------------------

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(name: str, modules: Set[str]) -> str:
    """``name`` (a module, or a module's attribute) -> the longest prefix that is a known module."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return parts[0]


def imports_of(source: str, module: str, is_package: bool, modules: Set[str]) -> List[Edge]:
    """Every project import in ``source`` (module ``module``): relative ones resolved, ``from a import b``
    counted as ``a.b`` when that is a module, flagged module-level (run on import: module and class
    bodies) or not (inside a function)."""
    tops = {m.split(".")[0] for m in modules}
    edges: List[Edge] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))   # a class body runs on import
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] in tops:
                        edges.append((module, _resolve(alias.name, modules), child.lineno, top_level))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] not in tops:
                    continue
                for alias in child.names:
                    full = f"{target}.{alias.name}"
                    edges.append((module, full if full in modules else _resolve(target, modules),
                                  child.lineno, top_level))
            visit(child, top_level and not inside)

    visit(ast.parse(source), True)
    return [e for e in edges if e[1] != module]


def project_sources(root: Path = ROOT, packages: Iterable[str] = LAYERS) -> Dict[str, Tuple[str, bool]]:
    """module name -> (source, is_package) for every .py under the layered packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(path, root)] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    return out


def import_edges(sources: Dict[str, Tuple[str, bool]]) -> List[Edge]:
    """Every import of every module, once per (importer, imported, line)."""
    modules = set(sources)
    edges = [e for mod, (src, pkg) in sources.items() for e in imports_of(src, mod, pkg, modules)]
    return sorted(set(edges), key=lambda e: (e[0], e[2], e[1]))


# ---- the two rules -------------------------------------------------------------------------------

def layer_violations(edges: Iterable[Edge], layers: Dict[str, int] = LAYERS,
                     allowed: Dict[Tuple[str, str], str] = SIBLING_ALLOWED) -> List[str]:
    """Imports of a higher layer, and of a same-rank sibling package not in ``allowed``."""
    bad = []
    for src, dst, line, top in edges:
        a, b = src.split(".")[0], dst.split(".")[0]
        if a == b or a not in layers or b not in layers:
            continue
        where = f"{src}:{line} imports {dst}{'' if top else ' (inside a function)'}"
        if layers[b] > layers[a]:
            bad.append(f"{where}: {b} (layer {layers[b]}) is above {a} (layer {layers[a]})")
        elif layers[b] == layers[a] and (src, dst) not in allowed:
            bad.append(f"{where}: {a} and {b} are siblings (layer {layers[a]}); neither imports the other")
    return bad


def import_cycles(edges: Iterable[Edge], module_level_only: bool = False) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: Dict[str, Set[str]] = {}
    for src, dst, _, top in edges:
        if top or not module_level_only:
            graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


# ---- the repository ------------------------------------------------------------------------------

def test_every_layered_package_is_parsed():
    sources = project_sources()
    assert {m.split(".")[0] for m in sources} == set(LAYERS)
    assert len(sources) > 50 and "engine.knn" in sources and "efficienttrain.__main__" in sources


def test_no_module_imports_a_higher_layer_or_a_sibling():
    bad = layer_violations(import_edges(project_sources()))
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_sibling_allow_list_has_reasons_and_is_used():
    edges = {(s, d) for s, d, _, _ in import_edges(project_sources())}
    for pair, reason in SIBLING_ALLOWED.items():
        assert reason.strip(), f"{pair}: give the reason"
        assert pair in edges, f"{pair} is allowed but no longer imported: drop it from SIBLING_ALLOWED"


def test_no_import_cycles_at_module_level_or_inside_functions():
    cycles = import_cycles(import_edges(project_sources()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ---- the checkers can fail -----------------------------------------------------------------------

def _fake(**modules: str) -> Dict[str, Tuple[str, bool]]:
    """In-memory sources: module name (dots as ``__``) -> source; packages get an empty ``__init__``."""
    out = {name.replace("__", "."): (src, False) for name, src in modules.items()}
    for name in list(out):
        for i in range(1, name.count(".") + 1):
            out.setdefault(".".join(name.split(".")[:i]), ("", True))
    return out


def test_layer_checker_flags_upward_lazy_and_sibling_imports():
    edges = import_edges(_fake(
        efficienttrain__curriculum="def f():\n    from engine.trainer import X\n",    # lazy, upward
        engine__trainer="from efficienttrain.curriculum import C\nfrom . import data\n",  # downward, own layer
        engine__data="",
        engine__shards="import evaluation.study\n",                                   # two floors up
        pretrain__task="from finetune.models import M\n",                            # sibling
        finetune__models="from engine import trainer\nfrom ..engine import data\n",  # downward
        evaluation__study="from pretrain.task import T\n"))                          # downward
    assert ("engine.trainer", "engine.data", 2, True) in edges          # `from . import data`: the module
    assert ("finetune.models", "engine.trainer", 1, True) in edges      # `from engine import trainer` likewise
    assert ("finetune.models", "engine.data", 2, True) in edges         # relative beyond the package
    assert ("efficienttrain.curriculum", "engine.trainer", 2, False) in edges
    bad = layer_violations(edges)
    assert bad == [
        "efficienttrain.curriculum:2 imports engine.trainer (inside a function): engine (layer 1) is above "
        "efficienttrain (layer 0)",
        "engine.shards:1 imports evaluation.study: evaluation (layer 4) is above engine (layer 1)",
        "pretrain.task:1 imports finetune.models: pretrain and finetune are siblings (layer 2); neither imports "
        "the other"], bad
    assert layer_violations(edges, allowed={("pretrain.task", "finetune.models"): "a reason"}) == bad[:2]


def test_cycle_checker_flags_direct_circular_and_lazy_cycles():
    edges = import_edges(_fake(
        engine__data="from .shards import S\n",                                  # data <-> shards
        engine__shards="from engine.data import D\n",
        detection__checkpoint_io="def f():\n    from .vit import V\n",          # lazy: still a cycle
        detection__vit="from .runner import R\n",
        detection__runner="from detection.checkpoint_io import read\n",
        finetune__config="from .recipes import apply\n",                         # one way only: fine
        finetune__recipes="from engine.data import D\n"))
    assert import_cycles(edges) == [["detection.checkpoint_io", "detection.runner", "detection.vit"],
                                    ["engine.data", "engine.shards"]]
    assert import_cycles(edges, module_level_only=True) == [["engine.data", "engine.shards"]]
    assert import_cycles([e for e in edges if e[0] != "engine.shards"]) == [
        ["detection.checkpoint_io", "detection.runner", "detection.vit"]]
