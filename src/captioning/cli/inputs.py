"""`caption`'s inputs: what data.images.expand_inputs takes (files, folders, globs, URLs), plus list
files and WebDataset shards.

    @LIST          a text file of inputs, one a line (blank lines and # comments skipped), each
                   expanded in turn; a relative path is relative to the list's folder
    X.tar          a shard (a path, an http(s) URL, a glob 'shards/*.tar' or a brace pattern
                   'shards/test-{000000..000003}.tar'): its samples are captioned, each named
                   X.tar#KEY, in shard order

A shard stays one item of the expanded list (`Shard`): its keys are known only by reading it, so
it is read once, by the one process that captions it (spread.py splits the items).
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..data.images import expand_inputs, redact


class Shard(str):
    """A WebDataset shard among the inputs (its path or URL)."""


def member(shard: str, key: str) -> str:
    """The name a shard's sample gets in the results."""
    return f"{shard}#{key}"


def expand(items) -> list[str]:
    """The inputs to caption, in order, each once: expand_inputs' names and Shard items."""
    out, seen = [], set()
    for item in _items(map(str, items)):
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _items(items, depth: int = 0) -> Iterator[str]:
    for item in items:
        if item.startswith("@"):
            if depth > 8:
                raise ValueError(f"{item}: list files nested more than 8 deep (a loop?)")
            yield from _items(_read_list(item[1:]), depth + 1)
        elif _is_shard(item):
            yield from map(Shard, _shards(item))
        else:
            yield from expand_inputs([item])


def _read_list(path: str) -> list[str]:
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FileNotFoundError(f"@{path}: cannot read this list of inputs "
                                f"({e.strerror or e})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [n if "://" in n or n.startswith("@") or os.path.isabs(os.path.expanduser(n))
            else str(path.parent / n) for n in names]


def _is_shard(item: str) -> bool:
    return item.lower().split("?")[0].endswith(".tar")


def _shards(item: str) -> list[str]:
    """A shard's path or URL, a glob's shards (sorted), a brace pattern's (in its order)."""
    if "{" in item:     # braceexpand, which webdataset brings, without webdataset's torch
        from ..data.shards import require_webdataset

        require_webdataset(f"the shard pattern {item}")
        from braceexpand import braceexpand

        return list(braceexpand(item))
    if "://" not in item and any(c in item for c in "*?[") and not os.path.exists(item):
        return sorted(glob.glob(os.path.expanduser(item), recursive=True)) or [item]
    return [item]


def sources(todo: list[str], done: set[str], finished: Callable[[str, list[str]], None]
            | None = None) -> Iterator[tuple[str, object]]:
    """(name, what to open) of each input of `todo` not in `done`, a shard's samples as their
    bytes, read as they are needed; a shard that cannot be read gives (its name, the ShardError).
    `finished(shard, names)`: called once a shard was read to its end, with its samples' names in
    order (whether done before or not)."""
    from ..data.shards import ShardError, iter_samples

    for item in todo:
        if not isinstance(item, Shard):
            if redact(item) not in done:
                yield item, item
            continue
        names = []
        try:
            for key, data, _, _ in iter_samples(item):
                names.append(member(item, key))
                if redact(names[-1]) not in done:
                    yield names[-1], data
        except ShardError as e:
            names.append(item)
            if redact(item) not in done:
                yield item, e
        if finished is not None:
            finished(item, names)
