"""The synthetic Shapes set: its layout, its determinism, and captions, truth and pixels that agree."""
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from captioning.data.readers.flickr30k import read_flickr30k
from captioning.data.shapes import (
    CANVAS,
    COLORS,
    GROUND_TRUTH,
    SHAPES,
    SIZES,
    accuracy,
    build_shapes,
    is_correct,
    load_ground_truth,
)

PHRASE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")
RELATION = re.compile(rf"{PHRASE.pattern} (to the left of|to the right of|above|below) a {PHRASE.pattern}")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """200 images: enough to see every colour, shape, size and object count."""
    out = build_shapes(tmp_path_factory.mktemp("shapes200"), 200, seed=0, progress=False)
    captions, skipped = read_flickr30k(out / "results.csv")
    assert skipped == 0
    return out, captions, load_ground_truth(out)


def pixels(out, name) -> np.ndarray:
    return np.asarray(Image.open(out / "flickr30k_images" / name).convert("RGB"))  # (H, W, 3)


# --- layout and determinism ---------------------------------------------------------

def test_layout_is_kaggle_flickr30k_with_five_captions_per_image(tmp_path):
    out = build_shapes(tmp_path, 30, seed=0, progress=False)
    assert out == tmp_path
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    assert all(re.fullmatch(r"\d{6}\.png\| [0-4]\| [A-Z].* \.", line) for line in lines[1:]), lines[1:4]
    captions, skipped = read_flickr30k(out / "results.csv")
    assert skipped == 0 and len(lines) == 1 + 30 * 5
    assert len(captions) == 30 and all(len(c) == 5 and len(set(c)) == 5 for c in captions.values())
    files = sorted(p.name for p in (out / "flickr30k_images").iterdir())
    assert files == sorted(captions)
    for name in files[:5]:
        with Image.open(out / "flickr30k_images" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (CANVAS, CANVAS))
    truth = json.loads((out / GROUND_TRUTH).read_text())
    assert truth == load_ground_truth(out) and set(truth) == set(captions)
    for objects in truth.values():
        for o in objects:
            assert set(o) == {"color", "shape", "size", "x", "y"}
            assert o["color"] in COLORS and o["shape"] in SHAPES and o["size"] in SIZES


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = build_shapes(tmp_path / "a", 30, seed=0, progress=False)
    b = build_shapes(tmp_path / "b", 30, seed=0, progress=False)
    c = build_shapes(tmp_path / "c", 30, seed=1, progress=False)
    for name in ("results.csv", GROUND_TRUTH):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    for name in ("000000.png", "000017.png", "000029.png"):
        assert np.array_equal(pixels(a, name), pixels(b, name))
    assert any(not np.array_equal(pixels(a, f"{i:06d}.png"), pixels(c, f"{i:06d}.png")) for i in range(30))


def test_load_ground_truth_elsewhere_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="Shapes"):
        load_ground_truth(tmp_path)


# --- what the data set holds --------------------------------------------------------------

def test_variety_over_200_images(big):
    _, _, truth = big
    objects = [o for objs in truth.values() for o in objs]
    assert {len(objs) for objs in truth.values()} == {1, 2, 3}
    colours = {o["color"] for o in objects}
    assert len(colours) >= 5 and colours <= set(COLORS)
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["size"] for o in objects} == set(SIZES)


def test_objects_stay_on_the_canvas_and_apart(big):
    _, _, truth = big
    for name, objects in truth.items():
        assert [o["x"] for o in objects] == sorted(o["x"] for o in objects), name  # left to right
        for o in objects:
            r = SIZES[o["size"]]
            assert r - 1e-4 <= o["x"] <= 1 - r + 1e-4 and r - 1e-4 <= o["y"] <= 1 - r + 1e-4, (name, o)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) > SIZES[a["size"]] + SIZES[b["size"]], name


def test_every_caption_is_correct_for_its_ground_truth(big):
    _, captions, truth = big
    assert set(captions) == set(truth)
    for name, texts in captions.items():
        for text in texts:
            assert is_correct(text, truth[name]), (name, text, truth[name])


def test_sizes_and_relations_in_captions_are_true(big):
    """is_correct ignores sizes and relations; here they are held to the coordinates."""
    _, captions, truth = big
    relations_checked = 0
    for name, texts in captions.items():
        objects = truth[name]
        described = {(o["size"], o["color"], o["shape"]) for o in objects}
        # the first caption lists every object with its size, left to right
        assert PHRASE.findall(texts[0]) == [(o["size"], o["color"], o["shape"]) for o in objects], (name, texts[0])
        for text in texts:
            assert set(PHRASE.findall(text)) <= described, (name, text)
            for match in RELATION.finditer(text):
                first, relation, second = match.groups()[:3], match.group(4), match.groups()[4:]
                pairs = [(a, b) for a in objects for b in objects if a is not b
                         and (a["size"], a["color"], a["shape"]) == first
                         and (b["size"], b["color"], b["shape"]) == second]
                holds = {"to the left of": lambda a, b: a["x"] < b["x"],
                         "to the right of": lambda a, b: a["x"] > b["x"],
                         "above": lambda a, b: a["y"] < b["y"],
                         "below": lambda a, b: a["y"] > b["y"]}[relation]
                assert any(holds(a, b) for a, b in pairs), (name, text, objects)
                relations_checked += 1
    assert relations_checked > 100  # the check above is not vacuous


# --- the pixels show what the captions say ------------------------------------------------

def test_each_object_centre_has_its_named_colour(big):
    out, _, truth = big
    checked = Counter()
    for name, objects in truth.items():
        image = pixels(out, name)
        for o in objects:
            # the centre is inside every shape, the triangle's too (its half-width there is 0.54 r)
            x, y = int(o["x"] * CANVAS), int(o["y"] * CANVAS)
            assert tuple(image[y, x]) == COLORS[o["color"]], (name, o)
            checked[o["shape"]] += 1
    assert min(checked[s] for s in SHAPES) > 20


def test_images_show_exactly_the_named_colours(big):
    out, _, truth = big
    for name, objects in truth.items():
        image = pixels(out, name)
        shown = {c for c, rgb in COLORS.items() if (image == rgb).all(-1).any()}
        assert shown == {o["color"] for o in objects}, name


def test_large_objects_are_drawn_larger(big):
    out, _, truth = big
    areas = {}
    for name, objects in truth.items():
        if len(objects) == 1:
            [o] = objects
            area = int((pixels(out, name) == COLORS[o["color"]]).all(-1).sum())
            areas.setdefault((o["shape"], o["size"]), []).append(area)
    assert set(areas) == {(s, z) for s in SHAPES for z in SIZES}
    for shape in SHAPES:
        assert min(areas[(shape, "large")]) > 2 * max(areas[(shape, "small")]), shape


# --- scoring ------------------------------------------------------------------------------

TRUTH = [{"color": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.5},
         {"color": "blue", "shape": "square", "size": "large", "x": 0.7, "y": 0.5}]


@pytest.mark.parametrize("caption", [
    "a small red circle to the left of a large blue square",
    "A red circle and a blue square .",
    "there is a blue square and a red circle",            # order is not scored
    "a red thing is a circle next to a blue square",       # the colour carries to the next shape
])
def test_is_correct_accepts_every_object_named(caption):
    assert is_correct(caption, TRUTH)


@pytest.mark.parametrize("caption", [
    "a small red circle",                                  # an object missing
    "a green circle and a blue square",                    # a wrong colour
    "a red square and a blue square",                      # a wrong shape
    "a red circle , a blue square and a white triangle",   # an extra object
    "a red circle and a square",                           # a shape without its colour
    "a red circle and a blue square and a red circle",     # one object named twice
    "red and blue",                                        # colours with no shape
    "",
])
def test_is_correct_rejects(caption):
    assert not is_correct(caption, TRUTH)


def test_is_correct_counts_repeated_objects():
    two_red = [dict(TRUTH[0]), dict(TRUTH[0], x=0.8)]
    assert is_correct("a red circle above a red circle", two_red)
    assert not is_correct("a red circle", two_red)


def test_accuracy_is_the_fraction_of_correct_images():
    truth = {"a.png": TRUTH, "b.png": TRUTH[:1], "c.png": TRUTH[1:], "d.png": TRUTH}
    captions = {"a.png": "a red circle and a blue square", "b.png": "a red circle",
                "c.png": "a red square", "d.png": "a blue square"}
    assert accuracy(captions, truth) == 0.5
    assert accuracy({"b.png": "a red circle"}, truth) == 1.0
    with pytest.raises(ValueError):
        accuracy({}, truth)
