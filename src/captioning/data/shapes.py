"""Shapes: a synthetic captioning data set in the Kaggle Flickr30k layout.

Each image holds 1 to 3 non-overlapping objects (6 colours x 3 shapes x 2
sizes) on a dark background and gets five differently worded captions that
name every object, left to right, and how two objects sit relative to each
other. The ground truth lies beside the captions, so a generated caption can be
scored: it is right when it names every object with the right colour and shape,
and nothing else. Everything is deterministic from the seed.

    OUT_DIR/results.csv              image_name| comment_number| comment
    OUT_DIR/flickr30k_images/*.png
    OUT_DIR/shapes_ground_truth.json {image_name: [{color, shape, size, x, y}, ...]}
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from .vocab import tokenize

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.20}   # radius as a fraction of the canvas side
GROUND_TRUTH = "shapes_ground_truth.json"
CANVAS = 96


def _place(rng: random.Random, n: int) -> list[dict]:
    """n objects whose bounding circles neither overlap nor leave the canvas."""
    while True:
        objects = []
        for _ in range(n):
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            for _attempt in range(50):
                x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
                if all(math.hypot(x - o["x"], y - o["y"]) > r + SIZES[o["size"]] + 0.03
                       for o in objects):
                    break
            else:
                break  # no room left: start the scene again
            objects.append({"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES),
                            "size": size, "x": round(x, 4), "y": round(y, 4)})
        if len(objects) == n:
            return sorted(objects, key=lambda o: o["x"])  # left to right, as the captions read


def draw_scene(objects: list[dict], rng: random.Random, side: int = CANVAS) -> Image.Image:
    shade = rng.randint(10, 60)
    image = Image.new("RGB", (side, side), (shade, shade, shade + rng.randint(0, 20)))
    draw = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o["x"] * side, o["y"] * side, SIZES[o["size"]] * side
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            h = r * 0.85
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75),
                          (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    return image


def _phrase(o: dict, with_size: bool) -> str:
    return (f"a {o['size']} {o['color']} {o['shape']}" if with_size
            else f"a {o['color']} {o['shape']}")


def _relation(a: dict, b: dict) -> tuple[str, str]:
    """How a sits relative to b, and b relative to a (image y grows downwards)."""
    if abs(a["x"] - b["x"]) >= abs(a["y"] - b["y"]):
        return (("to the left of", "to the right of") if a["x"] < b["x"]
                else ("to the right of", "to the left of"))
    return ("above", "below") if a["y"] < b["y"] else ("below", "above")


def captions_for(objects: list[dict]) -> list[str]:
    """Five differently worded captions naming every object."""
    full = [_phrase(o, True) for o in objects]
    short = [_phrase(o, False) for o in objects]
    if len(objects) == 1:
        return [f"{full[0]}", f"there is {full[0]} in the picture",
                f"{short[0]} on a dark background", f"a picture of {full[0]}",
                f"a single {short[0][2:]}"]
    if len(objects) == 2:
        ab, ba = _relation(*objects)
        return [f"{full[0]} {ab} {full[1]}", f"{full[1]} {ba} {full[0]}",
                f"{full[0]} and {full[1]}", f"there is {short[0]} and {short[1]}",
                f"two shapes : {full[0]} and {full[1]}"]
    ab, _ = _relation(objects[0], objects[1])
    listed = f"{full[0]} , {full[1]} and {full[2]}"
    return [listed, f"there is {short[0]} , {short[1]} and {short[2]}",
            f"three shapes : {listed}", f"{full[0]} {ab} {full[1]} and {full[2]}",
            f"a picture of {short[0]} , {short[1]} and {short[2]}"]


def build_shapes(out_dir: str | Path, n_images: int = 3000, seed: int = 0, side: int = CANVAS,
                 progress: bool = True) -> Path:
    """Write the data set to `out_dir` (Kaggle Flickr30k layout) and return it.

    `out_dir` must be new or empty: the generator never writes among files it did not make.
    """
    out = Path(out_dir).expanduser()
    if n_images < 1:
        raise ValueError(f"a Shapes data set needs at least 1 image, got {n_images}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder: Shapes is generated only into a "
                              "new or empty folder (choose another, or delete this one)")
    images = out / "flickr30k_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, truth = ["image_name| comment_number| comment"], {}
    for i in tqdm(range(n_images), desc="shapes", disable=not progress):
        name = f"{i:06d}.png"
        objects = _place(rng, rng.randint(1, 3))
        draw_scene(objects, rng, side).save(images / name)
        truth[name] = objects
        for k, caption in enumerate(captions_for(objects)):
            rows.append(f"{name}| {k}| {caption[0].upper()}{caption[1:]} .")  # as Kaggle has it
    (out / "results.csv").write_text("\n".join(rows) + "\n")
    (out / GROUND_TRUTH).write_text(json.dumps(truth))
    return out


def load_ground_truth(data_dir: str | Path) -> dict[str, list[dict]]:
    path = Path(data_dir) / GROUND_TRUTH
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} a Shapes data set?")
    return json.loads(path.read_text())


def named_objects(caption: str) -> Counter:
    """The (colour, shape) pairs a caption names; a bare shape counts as (None, shape)."""
    named, color = Counter(), None
    for word in tokenize(caption):
        if word in COLORS:
            color = word
        elif word in SHAPES:
            named[(color, word)] += 1
            color = None
    return named


def is_correct(caption: str, objects: list[dict]) -> bool:
    """Names every object with the right colour and shape, and nothing else."""
    return named_objects(caption) == Counter((o["color"], o["shape"]) for o in objects)


def accuracy(captions: dict[str, str], truth: dict[str, list[dict]]) -> float:
    """Fraction of images whose caption is correct."""
    if not captions:
        raise ValueError("no captions to score")
    return sum(is_correct(c, truth[name]) for name, c in captions.items()) / len(captions)


def _box(o: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of an object, in fractions of the image side."""
    r = SIZES[o["size"]]
    return o["x"] - r, o["y"] - r, o["x"] + r, o["y"] + r


def _inside(x: float, y: float, boxes: list[tuple]) -> bool:
    return any(left <= x <= right and top <= y <= bottom for left, top, right, bottom in boxes)


def pointing_game(words: list[str], maps, objects: list[dict]) -> list[tuple[bool, float]]:
    """Does each colour or shape word that names a drawn object look at it?

    For every such word: (is the peak of its map, a cell of the encoder's h x w grid, inside the
    box of an object it names, the share of grid cells whose centre lies in those boxes: the
    chance of a hit for a map that points at random). Words naming nothing drawn are not counted.
    """
    out = []
    for word, grid in zip(words, maps):
        named = [o for o in objects if word in (o["color"], o["shape"])]
        if not named:
            continue
        h, w = grid.shape
        boxes = [_box(o) for o in named]
        centres = [((j + 0.5) / w, (i + 0.5) / h) for i in range(h) for j in range(w)]
        peak = int(grid.reshape(-1).argmax())
        out.append((_inside(*centres[peak], boxes),
                    sum(_inside(x, y, boxes) for x, y in centres) / len(centres)))
    return out
