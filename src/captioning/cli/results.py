"""`caption --out FILE`: the results file a long captioning job appends to and picks up from."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..captioner import CaptionResult


class ResultsFile:
    """`caption --out FILE`: results appended as JSON Lines (`--json`'s objects) or CSV
    (input,caption,error), by extension, a whole line at a time; a run that goes on skips the inputs
    already in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"--out {self.path}: expected a .jsonl or .csv file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--out {self.path}: "
                                    f"folder {self.path.parent} does not exist")
        self.csv = self.path.suffix.lower() == ".csv"
        self._drop_partial_line()
        self.done = self._read_done()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file) if self.csv else None
        if new and self.csv:
            self.writer.writerow(["input", "caption", "error"])

    def _drop_partial_line(self) -> None:
        """A run killed mid-write leaves at most a partial last line: cut it."""
        if self.path.is_file() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    def _read_done(self) -> set[str]:
        """The inputs whose last line holds a caption: those that failed are tried again."""
        if not self.path.is_file():
            return set()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f) if self.csv else \
                (json.loads(line) for line in f if line.strip())
            last = {row["input"]: bool(row.get("caption")) for row in rows if row.get("input")}
        return {name for name, captioned in last.items() if captioned}

    def write(self, result: CaptionResult, source: str | None = None) -> None:
        """One result; `source`: the input as given (result.input may be shortened for display)."""
        name = source if source is not None else result.input
        if self.csv:
            self.writer.writerow([name, result.caption or "", result.error or ""])
        else:
            self.file.write(json.dumps({**result.to_dict(), "input": name}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
