"""The generated config reference: docs/config.md is current, every key is documented, and the
comment reader (engine.config_doc) gets types, defaults and comments right on a known schema."""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import pytest

from engine.config_doc import KeyDoc, describe, reference_markdown, sections_summary
from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
POINTER = "every key with its default and meaning: docs/config.md"


def _tool():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_config_md_is_generated_from_the_schemas():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8") if (ROOT / "docs" / "config.md").exists() else ""
    assert text == _tool().render(), \
        "docs/config.md is out of date with the config dataclasses: run python tools/gen_config_docs.py"


def test_gen_config_docs_check_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    tool = _tool()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "config.md").write_text("# old\n")
    monkeypatch.setattr(tool, "ROOT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["gen_config_docs.py", "--check"])
    assert tool.main() == 1
    assert "out of date: run python tools/gen_config_docs.py" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["gen_config_docs.py"])
    assert tool.main() == 0 and (tmp_path / "docs" / "config.md").read_text() == tool.render()
    monkeypatch.setattr("sys.argv", ["gen_config_docs.py", "--check"])
    assert tool.main() == 0


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig], ids=lambda s: s.__name__)
def test_every_config_key_has_a_meaning(schema):
    docs = describe(schema)
    assert len(docs) > 20
    missing = [d.key for d in docs if not d.help.strip()]
    assert not missing, (f"{schema.__name__}: keys without a meaning (add a trailing # comment on the field's line "
                         f"in the dataclass): {missing}")


# ---- the reader on a hand-written schema -----------------------------------------------------------

@dataclass
class _Net:
    """The network."""

    depth: int = 2                        # blocks
    rate: Optional[float] = None          # learning rate; null: derived
                                          # from the batch size
    # a heading for the next fields, not a continuation of rate
    tags: List[str] = field(default_factory=lambda: ["a", "b"])
    mode: Literal["x", "y-z"] = "x"       # how to run | the other way

    scale: List[float] = field(default_factory=lambda: [0.2, 1.0])   # crop scale

    # a comment-only line after a blank line belongs to nobody
    extra: Dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        depth: int = 3                    # a local variable, not a field
        del depth


@dataclass
class _Job:
    name: str = ""                        # run name
    net: _Net = field(default_factory=_Net)   # the default network
    big: _Net = field(default_factory=lambda: _Net(   # the job's own network
        depth=12, rate=0.5))
    on: bool = True                       # top-level key after the sections


def test_describe_reads_types_defaults_and_comments():
    net = [
        ("depth", "int", "2", "blocks"),
        ("rate", "float | null", "null", "learning rate; null: derived from the batch size"),
        ("tags", "list[str]", "[a, b]", ""),
        ("mode", "x | y-z", "x", "how to run | the other way"),
        ("scale", "list[float]", "[0.2, 1.0]", "crop scale"),
        ("extra", "dict[str, int]", "{}", ""),
    ]
    expected = [KeyDoc("name", "str", "''", "run name")]
    expected += [KeyDoc(f"net.{k}", t, d, h) for k, t, d, h in net]
    expected += [KeyDoc(f"big.{k}", t, {"depth": "12", "rate": "0.5"}.get(k, d), h) for k, t, d, h in net]
    expected += [KeyDoc("on", "bool", "true", "top-level key after the sections")]
    assert describe(_Job) == expected


def test_reference_markdown_tables():
    md = reference_markdown({"python -m job": _Job})
    assert "## `python -m job`" in md and "--print-config" in md and "--dry-run" in md and "_base_" in md
    assert "### top level\n" in md and "### `net`\n\nthe default network\n" in md and "### `big`\n\nthe job's own network" in md
    assert "| `net.mode` | x \\| y-z | `x` | how to run \\| the other way |" in md
    assert "| `big.depth` | int | `12` | blocks |" in md
    assert md.index("| `on` |") < md.index("### `net`")   # top-level keys come first


def test_sections_summary_names_every_section_and_points_to_the_docs():
    text = sections_summary(PretrainConfig)
    lines = text.splitlines()
    assert lines[-1] == POINTER
    assert all(len(line) <= 100 for line in lines), text
    starts = [m.group(1) for m in (re.match(r"  ([\w.]+): ", line) for line in lines) if m]
    for section in ("model", "data", "curriculum", "train", "eval"):
        assert any(s == section or s.startswith(section + ".") for s in starts), f"{section} missing:\n{text}"
    words = set(re.findall(r"[\w]+", text))
    assert {d.key.rsplit(".", 1)[-1] for d in describe(PretrainConfig)} <= words
    assert "  train: batch_size, per_gpu_batch_size, accum_steps, blr" in text
    job = sections_summary(_Job).splitlines()
    assert job[0] == "  name, on" and job[1].startswith("  net: depth, rate, tags") and job[-1] == POINTER
