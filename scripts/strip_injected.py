"""Remove papermill's `injected-parameters` cells from a notebook, keeping every other cell as it is.

    python scripts/strip_injected.py IN [OUT]      # OUT defaults to IN (rewritten in place)

papermill runs a notebook with its parameters by inserting a cell tagged `injected-parameters` after
the cell tagged `parameters`. Left in a committed notebook, that cell runs after the parameters cell
whenever a reader runs it in Jupyter and silently replaces what they typed there. `make demo` strips it
from the notebooks it executes; the other cells keep their outputs and execution counts. The notebook is
written the way nbformat writes it (one-space indent, sorted keys, UTF-8, a final newline). Standard
library only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TAG = "injected-parameters"


def strip_injected(notebook: dict) -> int:
    """Drop the cells tagged `injected-parameters` from `notebook` in place; returns how many were dropped."""
    cells = notebook.get("cells", [])
    kept = [c for c in cells if TAG not in (c.get("metadata", {}).get("tags") or [])]
    notebook["cells"] = kept
    return len(cells) - len(kept)


def dumps(notebook: dict) -> str:
    """nbformat's layout, so a stripped notebook diffs cleanly against one Jupyter saved."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) == 2 else src
    notebook = json.loads(src.read_text(encoding="utf-8"))
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        print(f"{src}: not a notebook (no list of cells)", file=sys.stderr)
        return 1
    dropped = strip_injected(notebook)
    dst.write_text(dumps(notebook), encoding="utf-8")
    print(f"{src}: removed {dropped} injected-parameters cell(s)" + (f", wrote {dst}" if dst != src else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
