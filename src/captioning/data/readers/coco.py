"""COCO's official caption files (the annotations/ folder, or one captions_*.json)."""
from __future__ import annotations

import re
from pathlib import Path

from .common import SPLITS, Captions, WrongFormat, load_json, split_images


def _coco_files(path: Path) -> list[Path]:
    files = sorted(path.glob("captions_*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no captions_*.json in this folder "
                                "(format coco: data.captions names COCO's annotations/ folder, "
                                "the one with captions_train2017.json and captions_val2017.json)")
    years = sorted({m.group(0) for f in files if (m := re.search(r"\d{4}", f.stem))})
    if len(years) > 1:  # 2014 and 2017 share pictures: read together, some would be in two splits
        raise ValueError(f"{path}: caption files of several COCO releases ({', '.join(years)}); "
                         "keep one release's captions_train/captions_val pair in the folder "
                         "(or name one file in data.captions)")
    return files


def _read_coco_file(file: Path, out: Captions) -> list[str]:
    """One captions_<part>.json into `out`, images named `<part>/<file_name>`; returns the names."""
    data = load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise WrongFormat(f"{file}: not a COCO caption file (it needs 'images' and "
                          "'annotations' lists)")
    part = file.stem.removeprefix("captions_")
    names = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise ValueError(f"{file}: images[{i}] has no 'id' and 'file_name', "
                             "as COCO's images have")
        names[image["id"]] = out.ids[image["id"]] = f"{part}/{image['file_name']}"
    captioned = {}
    for i, annotation in enumerate(data["annotations"]):
        annotation = annotation if isinstance(annotation, dict) else {}
        name, text = (names.get(annotation.get("image_id")),
                      str(annotation.get("caption") or "").strip())
        out.rows += 1
        if name is None or not text:
            out.skipped.append(f"{file.name}: annotations[{i}]"
                               + (" (unknown image_id)" if name is None else ""))
            out.empty.extend([name] if name else [])
            continue
        out.captions.setdefault(name, []).append(text)
        captioned[name] = None
    return list(captioned)


def read(path: Path, split_seed: int = 0) -> Captions:
    """COCO's official caption files: captions_train*.json -> train; captions_val*.json -> val and
    test, halved by image, seeded by `split_seed` (COCO's own test images have no captions)."""
    out = Captions({}, splits={s: [] for s in SPLITS})
    for file in _coco_files(path):
        part = file.stem.removeprefix("captions_")
        kind = next((s for s in ("train", "val", "test") if part.startswith(s)), None)
        if kind is None:
            raise ValueError(f"{file}: cannot tell its split from its name: COCO's are "
                             "captions_train2017.json and captions_val2017.json (or 2014); "
                             "rename it, or use data.format csv/jsonl with a split")
        names = _read_coco_file(file, out)
        if kind == "val":
            halves = split_images(names, 0.5, 0.0, split_seed)
            out.splits["val"] += halves["val"]
            out.splits["test"] += halves["train"]
        else:
            out.splits[kind] += names
    return out


def read_coco(path: str | Path,
              split_seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """COCO's annotations/ folder (or one captions_*.json): captions by `<part>/<file_name>`, and
    the split."""
    found = read(Path(path), split_seed)
    return found.captions, found.splits
