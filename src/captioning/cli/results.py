"""`caption --out FILE`: the results file a long captioning job appends to and picks up from."""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path

from ..captioner import CaptionResult
from ..data.images import redact
from ..files import hold, write_atomic

HEADER = ["input", "caption", "error"]


class ResultsFile:
    """`caption --out FILE`: results appended as JSON Lines (`--json`'s objects) or CSV
    (input,caption,error), by extension, a whole line at a time, by one process at a time.

    A run that goes on skips every input already in the file (`done`), failed ones included;
    with `retry_errors` those that failed are taken out of it, to be captioned again.
    """

    def __init__(self, path: str | Path, retry_errors: bool = False):
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"--out {self.path}: expected a .jsonl or .csv file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--out {self.path}: "
                                    f"folder {self.path.parent} does not exist")
        self.csv = self.path.suffix.lower() == ".csv"
        with contextlib.ExitStack() as stack:
            stack.enter_context(hold(self.path, "results file"))
            self._cut_partial_line()
            last = self._read()                  # input -> whether its last row holds no error
            self.failed = {name for name, ok in last.items() if not ok}
            self.done = set(last) - (self.failed if retry_errors else set())
            if retry_errors and self.failed:
                self._drop(self.failed)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", newline="", encoding="utf-8")
            self._lock = stack.pop_all()
        self.writer = csv.writer(self.file) if self.csv else None
        if new and self.csv:
            self.writer.writerow(HEADER)

    def _cut_partial_line(self) -> None:
        """A run killed mid-write leaves at most a partial last line: truncate the file at its last
        newline, in place (one call: no moment where finished rows are gone)."""
        if not self.path.is_file():
            return
        size = end = self.path.stat().st_size
        with open(self.path, "rb") as f:
            while end > 0:
                start = max(0, end - (1 << 16))
                f.seek(start)
                i = f.read(end - start).rfind(b"\n")
                if i >= 0:
                    end = start + i + 1
                    break
                end = start
        if end < size:
            os.truncate(self.path, end)

    def _rows(self, f):
        """(line number, row) of the file; a row that is not a result: None."""
        if self.csv:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None and header != HEADER:
                raise ValueError(f"{self.path}: not a results file of caption --out (its header is "
                                 f"{','.join(header)}, expected {','.join(HEADER)}); "
                                 "give --out another file")
            for row in reader:
                yield reader.line_num, dict(zip(HEADER, row)) if len(row) == 3 else None
            return
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield number, row if isinstance(row, dict) and "input" in row \
                    and ("caption" in row or "error" in row) else None

    def _read(self) -> dict[str, bool]:
        if not self.path.is_file():
            return {}
        last = {}
        with open(self.path, newline="", encoding="utf-8") as f:
            for number, row in self._rows(f):
                if row is None:
                    what = "not a results file of caption --out" if number == 1 else \
                        "not a result of caption --out"
                    raise ValueError(f"{self.path}: line {number}: {what}; give --out another "
                                     "file, or remove the line")
                last[row["input"]] = not row.get("error")
        return last

    def _drop(self, inputs: set[str]) -> None:
        """The file without the rows of `inputs`, rewritten whole or not at all."""
        def write(out) -> None:
            with open(self.path, newline="", encoding="utf-8") as f:
                if self.csv:
                    out.write(f.readline())                          # the header
                for line in f:
                    row = next(csv.reader([line])) if self.csv else json.loads(line) if \
                        line.strip() else None
                    name = (row[0] if self.csv else row.get("input")) if row else None
                    if name not in inputs:
                        out.write(line)

        write_atomic(self.path, write, "w")

    def write(self, result: CaptionResult, source: str | None = None) -> None:
        """One result; `source`: the input as given (result.input may be shortened for display)."""
        name = redact(source if source is not None else result.input)
        if self.csv:
            self.writer.writerow([name, result.caption or "", result.error or ""])
        else:
            self.file.write(json.dumps({**result.to_dict(), "input": name}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self._lock.close()
