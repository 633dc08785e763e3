"""Karpathy's dataset_{flickr8k,flickr30k,coco}.json, with its own split."""
from __future__ import annotations

from pathlib import Path

from .common import Captions, WrongFormat, assign, load_json, split_of, splits_from


def read(captions_file: Path) -> Captions:
    """Karpathy's dataset_{flickr8k,flickr30k,coco}.json; COCO's images are `filepath/filename`."""
    data = load_json(captions_file)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise WrongFormat(f"{captions_file}: not one of Karpathy's dataset_*.json "
                          "(no 'images' list)")
    out, assigned = Captions({}), {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if (not isinstance(entry, dict) or not entry.get("filename")
                or not isinstance(entry.get("sentences"), list)):
            raise WrongFormat(f"{captions_file}: {where} has no 'filename' and 'sentences' "
                              "list, as Karpathy's entries have")
        name = "/".join(p for p in (str(entry.get("filepath") or "").strip("/"), entry["filename"])
                        if p)
        assign(assigned, name, split_of(entry.get("split"), captions_file, where) or "train",
               captions_file, where)
        if isinstance(entry.get("cocoid"), int):
            out.ids[entry["cocoid"]] = name
        for k, sentence in enumerate(entry["sentences"]):
            sentence = sentence if isinstance(sentence, dict) else {}
            text = str(sentence.get("raw") or " ".join(sentence.get("tokens") or [])).strip()
            out.rows += 1
            if not text:
                out.skipped.append(f"{where}.sentences[{k}]")
                out.empty.append(name)
                continue
            out.captions.setdefault(name, []).append(text)
    out.splits = splits_from(assigned, out.captions)
    return out


def read_karpathy(captions_file: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Karpathy's `dataset_flickr30k.json` (or dataset_coco.json), with its own split (restval
    joins train)."""
    found = read(Path(captions_file))
    return found.captions, found.splits
