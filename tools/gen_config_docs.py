#!/usr/bin/env python
"""Write docs/config.md (every config key with type, default and meaning) from the config dataclasses.

    python tools/gen_config_docs.py            # rewrite docs/config.md
    python tools/gen_config_docs.py --check    # exit 1 if docs/config.md is out of date

The meanings are the comments on the dataclass fields (engine/config_doc.py reads them), so
change a comment there and rerun this; tests/test_config_docs.py fails while the file is stale.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from engine.config_doc import DOCS_PATH, reference_markdown  # noqa: E402


def schemas() -> Dict[str, type]:
    """Command -> its config schema, in the order docs/config.md lists them."""
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    return {"python -m pretrain": PretrainConfig, "python -m finetune": FinetuneConfig}


def render() -> str:
    return reference_markdown(schemas())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help=f"only check that {DOCS_PATH} is up to date (exit 1 if not)")
    args = ap.parse_args()
    path = os.path.normpath(os.path.join(ROOT, DOCS_PATH))
    text = render()
    try:
        with open(path, "r", encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if args.check:
        if current != text:
            print(f"{DOCS_PATH} is {'missing' if current is None else 'out of date'}: "
                  f"run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        print(f"{DOCS_PATH} is up to date")
        return 0
    if current == text:
        print(f"{DOCS_PATH} is already up to date")
        return 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
