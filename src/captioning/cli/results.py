"""`caption --out FILE`: the results file a long captioning job appends to and picks up from."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from pathlib import Path

from ..captioner import CaptionResult
from ..data.images import redact
from ..files import content_hash, hold, write_atomic

HEADER = ["input", "caption", "error", "model"]
OLD_HEADER = HEADER[:3]             # files of earlier versions: no model column (rows kept as done)


def model_identity(path: str | Path) -> str:
    """What made a row: the model's file name and the hash of its bytes ('best.pt@1a2b...'); a
    folder (an export, a model folder) hashes its files, so a renamed copy is the same model."""
    path = Path(path)
    if path.is_file():
        return f"{path.name}@{content_hash(path)}"
    parts = [f"{f.name}:{content_hash(f)}" for f in sorted(path.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.suffix != ".md"]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{path.resolve().name}/@{digest}"


class ResultsFile:
    """`caption --out FILE`: results appended as JSON Lines (`--json`'s objects) or CSV
    (input,caption,error), by extension, a whole line at a time, by one process at a time.

    A run that goes on skips every input already in the file (`done`), failed ones included;
    with `retry_errors` those that failed are taken out of it, to be captioned again. Each row
    records its `model` (model_identity): a run with another model is refused, unless `redo`,
    which takes that model's rows out to caption them again.
    """

    def __init__(self, path: str | Path, retry_errors: bool = False, model: str | None = None,
                 redo: bool = False):
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"--out {self.path}: expected a .jsonl or .csv file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--out {self.path}: "
                                    f"folder {self.path.parent} does not exist")
        self.csv = self.path.suffix.lower() == ".csv"
        self.model, self.unrecorded, self.redone = model, 0, 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(hold(self.path, "results file"))
            self._cut_partial_line()
            last, made_by = self._read()   # input -> its last row holds no error / its model
            others = {name for name, m in made_by.items() if m and model and m != model}
            if others and not redo:
                raise ValueError(self._other_model(others, made_by))
            self.redone, self.unrecorded = len(others), sum(not m for m in made_by.values())
            self.failed = {name for name, ok in last.items() if not ok} - others
            self.done = set(last) - others - (self.failed if retry_errors else set())
            if set(last) - self.done or (self.csv and self.path.is_file() and self._old_header()):
                self._drop(set(last) - self.done)   # (an old CSV gains the model column)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.file = open(self.path, "a", newline="", encoding="utf-8")
            self._lock = stack.pop_all()
        self.writer = csv.writer(self.file) if self.csv else None
        if new and self.csv:
            self.writer.writerow(HEADER)

    def _other_model(self, others: set[str], made_by: dict[str, str]) -> str:
        names = sorted({made_by[name] for name in others})
        return (f"{self.path}: {len(others)} row(s) made by another model ({', '.join(names)}), "
                f"not this run's {self.model}: give --out a new file, or add --redo to caption "
                "those inputs again with this model")

    def _old_header(self) -> bool:
        with open(self.path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == OLD_HEADER

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
            if header is not None and header not in (HEADER, OLD_HEADER):
                raise ValueError(f"{self.path}: not a results file of caption --out (its header is "
                                 f"{','.join(header)}, expected {','.join(HEADER)}); "
                                 "give --out another file")
            for row in reader:
                yield reader.line_num, dict(zip(HEADER, row)) if len(row) == len(header) else None
            return
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield number, row if isinstance(row, dict) and "input" in row \
                    and ("caption" in row or "error" in row) else None

    def _read(self) -> tuple[dict[str, bool], dict[str, str]]:
        """input -> whether its last row holds no error, and input -> the model that made it."""
        last, made_by = {}, {}
        if not self.path.is_file():
            return last, made_by
        with open(self.path, newline="", encoding="utf-8") as f:
            for number, row in self._rows(f):
                if row is None:
                    what = "not a results file of caption --out" if number == 1 else \
                        "not a result of caption --out"
                    raise ValueError(f"{self.path}: line {number}: {what}; give --out another "
                                     "file, or remove the line")
                last[row["input"]] = not row.get("error")
                made_by[row["input"]] = row.get("model") or ""
        return last, made_by

    def _drop(self, inputs: set[str]) -> None:
        """The file without the rows of `inputs`, rewritten whole or not at all."""
        def write(out) -> None:
            with open(self.path, newline="", encoding="utf-8") as f:
                old = self.csv and next(csv.reader([f.readline()])) == OLD_HEADER
                if self.csv:
                    csv.writer(out).writerow(HEADER)
                for line in f:
                    row = next(csv.reader([line])) if self.csv else json.loads(line) if \
                        line.strip() else None
                    name = (row[0] if self.csv else row.get("input")) if row else None
                    if name not in inputs:
                        out.write(line.rstrip("\r\n") + ",\n" if old and line.strip() else line)

        write_atomic(self.path, write, "w")

    def write(self, result: CaptionResult, source: str | None = None) -> None:
        """One result; `source`: the input as given (result.input may be shortened for display)."""
        name = redact(source if source is not None else result.input)
        if self.csv:
            self.writer.writerow([name, result.caption or "", result.error or "", self.model or ""])
        else:
            model = {"model": self.model} if self.model else {}
            self.file.write(json.dumps({**result.to_dict(), "input": name, **model}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self._lock.close()


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results file as dicts (input, caption or error, model, and for JSON Lines the
    rest of `--json`'s object), in file order; a last line without its newline (a process still
    writing it, or one killed mid-write) is left out. A missing file: no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        data = f.read()
    text = data[:data.rfind(b"\n") + 1].decode("utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if rows and rows[0] in (HEADER, OLD_HEADER):
            rows = rows[1:]
        return [{k: v for k, v in zip(HEADER, row) if v} for row in rows if row]
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    bad = next((i for i, row in enumerate(rows)
                if not isinstance(row, dict) or "input" not in row), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 1}: not a result of caption --out; remove the line")
    return rows


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """A results file holding `rows` (read_rows' dicts), written whole or not at all."""
    path = Path(path)

    def write(f) -> None:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows([row.get(key, "") or "" for key in HEADER] for row in rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    write_atomic(path, write, "w")
