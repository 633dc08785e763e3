"""Readers, image-level splits, the dataset and its batches, on files made here in the real layouts."""
import csv
import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.config import from_dict, to_dict
from captioning.data.corpus import Corpus, load_splits, make_splits, read_corpus, save_splits, split_images
from captioning.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    CaptionDataset,
    EpochSampler,
    FeatureItem,
    Item,
    build_loader,
    build_transform,
    collate,
)
from captioning.data.readers.flickr30k import read_flickr30k
from captioning.data.readers.karpathy import read_karpathy
from captioning.data.readers.table import read_csv
from captioning.data.vocab import Vocabulary

HEADER = "image_name| comment_number| comment"
KAGGLE_ROWS = [  # as they stand in the Kaggle results.csv
    "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .",
    "1000092795.jpg| 1| Two young , White males are outside near many bushes .",
    "1000092795.jpg| 2| Two men in green shirts are standing in a yard .",
    "1000092795.jpg| 3| A man in a blue shirt standing in a garden .",
    "1000092795.jpg| 4| Two friends enjoy time spent together .",
    "10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .",
    "10002456.jpg| 1| Workers look down from up above on a piece of equipment .",
    "2199200615.jpg| 0| A brown and white dog is running through the grass .",
    "2199200615.jpg| 4   A dog runs across the grass .",  # the real row that lost its second '|'
]


def write_kaggle(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def make_image(path: Path, colour=(200, 30, 30), size=(40, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def config(tmp_path: Path, fmt: str, captions: Path, **data):
    return from_dict({"seed": 0, "data": {"format": fmt, "images": str(tmp_path / "images"), "captions": str(captions),
                                          "min_freq": 1, **data}})


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("captioning.data")]


def without_paths(message: str, *paths: Path) -> str:
    """The message with the (digit-laden) tmp paths cut out, so a count is not found in a path by accident."""
    for p in paths:
        message = message.replace(str(p), "")
    return message


# --- the Kaggle results.csv ------------------------------------------------------

def test_read_flickr30k_kaggle_layout(tmp_path):
    captions, skipped = read_flickr30k(write_kaggle(tmp_path / "results.csv", KAGGLE_ROWS))
    assert skipped == 0
    assert list(captions) == ["1000092795.jpg", "10002456.jpg", "2199200615.jpg"]
    assert captions["1000092795.jpg"] == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes .",
        "Two men in green shirts are standing in a yard .",
        "A man in a blue shirt standing in a garden .",
        "Two friends enjoy time spent together .",
    ]
    assert captions["10002456.jpg"][1] == "Workers look down from up above on a piece of equipment ."
    # the malformed row is repaired: its number is not part of the caption
    assert captions["2199200615.jpg"] == ["A brown and white dog is running through the grass .",
                                          "A dog runs across the grass ."]


def test_read_flickr30k_skips_and_counts_unreadable_rows(tmp_path):
    rows = KAGGLE_ROWS[:2] + ["garbage", "x.jpg|", "y.jpg| 3|   ", "| 0| a caption with no image ."] + KAGGLE_ROWS[2:4]
    captions, skipped = read_flickr30k(write_kaggle(tmp_path / "results.csv", rows))
    assert skipped == 4
    assert set(captions) == {"1000092795.jpg"} and len(captions["1000092795.jpg"]) == 4
    assert not any(name in captions for name in ("garbage", "x.jpg", "y.jpg", ""))


def test_read_flickr30k_keeps_quotes_commas_and_pipes_as_written(tmp_path):
    rows = ['a.jpg| 0| a man says "hello, world" .',
            "a.jpg| 1| a sign reads 'open' , then \"closed\" .",
            "a.jpg| 2| a | b ."]
    captions, skipped = read_flickr30k(write_kaggle(tmp_path / "results.csv", rows))
    assert skipped == 0
    assert captions["a.jpg"] == ['a man says "hello, world" .', "a sign reads 'open' , then \"closed\" .", "a | b ."]


def test_read_flickr30k_ignores_blank_lines_and_keeps_file_order(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(f"{HEADER}\n\nb.jpg| 0| second image first .\n   \na.jpg| 0| one .\n\nb.jpg| 1| two .\n\n")
    captions, skipped = read_flickr30k(path)
    assert skipped == 0
    assert captions == {"b.jpg": ["second image first .", "two ."], "a.jpg": ["one ."]}


def test_read_flickr30k_header_is_not_a_caption(tmp_path):
    captions, _ = read_flickr30k(write_kaggle(tmp_path / "results.csv", KAGGLE_ROWS[:1]))
    assert list(captions) == ["1000092795.jpg"]


def test_read_flickr30k_crlf_line_ends(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(("\r\n".join([HEADER, *KAGGLE_ROWS[:2]]) + "\r\n").encode())
    captions, skipped = read_flickr30k(path)
    assert skipped == 0
    assert captions["1000092795.jpg"][1] == "Two young , White males are outside near many bushes ."


def test_read_flickr30k_file_saved_with_a_bom(tmp_path):
    """Excel and Notepad save UTF-8 with a byte-order mark; the header must still be seen as the header."""
    path = tmp_path / "results.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join([HEADER, *KAGGLE_ROWS[:2]]).encode())
    captions, skipped = read_flickr30k(path)
    assert (list(captions), skipped) == (["1000092795.jpg"], 0)


# --- read_corpus over files on disk ----------------------------------------------------

def test_read_corpus_drops_captions_of_missing_images_with_one_counted_warning(tmp_path, caplog):
    present = ["1000092795.jpg", "10002456.jpg", "2199200615.jpg", "36979.jpg"]
    for name in present:
        make_image(tmp_path / "images" / name)
    missing = ["gone_a.jpg", "gone_b.jpg", "gone_c.jpg"]
    rows = KAGGLE_ROWS + ["36979.jpg| 0| A group of friends playing cards ."]
    rows += [f"{name}| {k}| A caption for a missing image ." for name in missing for k in range(5)]
    path = write_kaggle(tmp_path / "results.csv", rows)
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(config(tmp_path, "flickr30k", path))
    assert set(corpus.captions) == set(present)
    assert corpus.images_dir == tmp_path / "images"
    assert corpus.splits is None
    [message] = [m for m in warnings_from(caplog) if "missing" in m]
    text = without_paths(message, path, tmp_path / "images")
    assert re.search(r"\b3\b", text) and re.search(r"\b7\b", text), message   # 3 of 7 images
    assert "gone_a.jpg" in message


def test_read_corpus_reports_unreadable_rows_with_their_count(tmp_path, caplog):
    for name in ("1000092795.jpg", "10002456.jpg", "2199200615.jpg"):
        make_image(tmp_path / "images" / name)
    rows = KAGGLE_ROWS[:3] + ["garbage", "x.jpg|", "oops"] + KAGGLE_ROWS[3:]
    path = write_kaggle(tmp_path / "results.csv", rows)
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(config(tmp_path, "flickr30k", path))
    assert sum(len(c) for c in corpus.captions.values()) == len(KAGGLE_ROWS)
    messages = warnings_from(caplog)
    assert len(messages) == 1, messages  # nothing is missing, so only the skipped rows are reported
    text = without_paths(messages[0], path, tmp_path / "images")
    assert "skip" in text.lower() and re.search(r"\b3\b", text), messages[0]


def test_read_corpus_says_nothing_when_all_is_well(tmp_path, caplog):
    for name in ("1000092795.jpg", "10002456.jpg", "2199200615.jpg"):
        make_image(tmp_path / "images" / name)
    path = write_kaggle(tmp_path / "results.csv", KAGGLE_ROWS)
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        read_corpus(config(tmp_path, "flickr30k", path))
    assert warnings_from(caplog) == []


def test_read_corpus_with_no_image_found_fails_early(tmp_path):
    (tmp_path / "images").mkdir()
    path = write_kaggle(tmp_path / "results.csv", KAGGLE_ROWS)
    with pytest.raises(ValueError, match="no captioned image"):
        read_corpus(config(tmp_path, "flickr30k", path))


def test_read_corpus_csv_format_with_standard_quoting(tmp_path, caplog):
    make_image(tmp_path / "images" / "a.jpg")
    make_image(tmp_path / "images" / "b b.png")
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerow(["a.jpg", 'a man says "hello, world" .'])
        writer.writerow(["b b.png", "a line,\nbroken in two"])
        writer.writerow(["a.jpg", "  a plain caption  "])
        writer.writerow(["a.jpg", ""])          # unreadable: no caption
        writer.writerow(["", "no image"])       # unreadable: no image
    assert '"a man says ""hello, world"" ."' in path.read_text()  # really CSV-quoted on disk
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(config(tmp_path, "csv", path))
    assert corpus.captions == {"a.jpg": ['a man says "hello, world" .', "a plain caption"],
                               "b b.png": ["a line,\nbroken in two"]}
    assert read_csv(path)[1] == 2
    [message] = warnings_from(caplog)
    assert re.search(r"\b2\b", without_paths(message, path, tmp_path / "images")), message


def test_read_csv_file_saved_with_a_bom(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,caption\r\na.jpg,\"a dog, running\"\r\n")  # Excel's "CSV UTF-8"
    assert read_csv(path) == ({"a.jpg": ["a dog, running"]}, 0)


def test_read_csv_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("file,text\na.jpg,a dog\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        read_csv(path)


def karpathy_json(path: Path, entries: list[tuple[str, str, list[str]]]) -> Path:
    """Karpathy's dataset_flickr30k.json, with the fields the real file carries."""
    images, sentid = [], 0
    for imgid, (filename, split, raws) in enumerate(entries):
        sentences = []
        for raw in raws:
            tokens = re.findall(r"[a-z]+", raw.lower())
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                       "split": split, "filename": filename})
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


KARPATHY = [
    ("1000092795.jpg", "train", ["Two young guys with shaggy hair look at their hands while hanging out in the yard.",
                                 "Two young, White males are outside near many bushes."]),
    ("10002456.jpg", "val", ["Several men in hard hats are operating a giant pulley system."]),
    ("1000268201.jpg", "test", ["A child in a pink dress is climbing up a set of stairs in an entry way."]),
    ("1000344755.jpg", "restval",
     ["Someone in a blue shirt and hat is standing on stair and leaning against a window."]),
    ("1000366164.jpg", "train", ["A man in an orange hat starring at something."]),
    ("1000523639.jpg", "test", ["A man in a vest is sitting in a chair and holding magazines."]),
]


def test_read_karpathy_restval_joins_train(tmp_path):
    captions, splits = read_karpathy(karpathy_json(tmp_path / "dataset_flickr30k.json", KARPATHY))
    assert captions["1000092795.jpg"] == KARPATHY[0][2]
    assert splits == {"train": ["1000092795.jpg", "1000344755.jpg", "1000366164.jpg"], "val": ["10002456.jpg"],
                      "test": ["1000268201.jpg", "1000523639.jpg"]}


def test_read_corpus_karpathy_split_is_used_and_missing_images_leave_it(tmp_path, caplog):
    for name, _, _ in KARPATHY:
        if name != "1000366164.jpg":
            make_image(tmp_path / "images" / name)
    path = karpathy_json(tmp_path / "dataset_flickr30k.json", KARPATHY)
    cfg = config(tmp_path, "karpathy", path, val_fraction=0.4, test_fraction=0.4)  # fractions do not apply
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(cfg)
    assert "1000366164.jpg" not in corpus.captions
    assert any("missing" in m for m in warnings_from(caplog))
    splits = make_splits(corpus, cfg)
    assert splits == {"train": ["1000092795.jpg", "1000344755.jpg"], "val": ["10002456.jpg"],
                      "test": ["1000268201.jpg", "1000523639.jpg"]}
    assert make_splits(corpus, from_dict({**to_dict(cfg), "seed": 5})) == splits  # the file's split, whatever the seed


def test_read_corpus_shapes_generates_the_data_set_when_missing(tmp_path, caplog):
    root = tmp_path / "shapes"
    cfg = from_dict({"data": {"format": "shapes", "images": str(root / "flickr30k_images"),
                              "captions": str(root / "results.csv"), "shapes_images": 10}})
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(cfg)
    assert len(corpus.captions) == 10 and all(len(c) == 5 for c in corpus.captions.values())
    assert any("generating" in m for m in warnings_from(caplog))


# --- splits ------------------------------------------------------------------

NAMES = [f"{i:07d}.jpg" for i in range(200)]


def test_split_images_partitions_the_images():
    splits = split_images(NAMES, 0.1, 0.05, seed=0)
    sets = {k: set(v) for k, v in splits.items()}
    assert set(splits) == {"train", "val", "test"}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(NAMES)
    assert (len(splits["val"]), len(splits["test"]), len(splits["train"])) == (20, 10, 170)


def test_split_images_is_deterministic_and_independent_of_input_order():
    shuffled = NAMES[:]
    random.Random(1).shuffle(shuffled)
    a = split_images(NAMES, 0.1, 0.1, seed=3)
    assert a == split_images(NAMES, 0.1, 0.1, seed=3)
    assert a == split_images(shuffled, 0.1, 0.1, seed=3)
    assert a == split_images(NAMES + NAMES[:50], 0.1, 0.1, seed=3)   # a name listed twice is still one image
    assert split_images(NAMES, 0.1, 0.1, seed=4)["test"] != a["test"]
    assert split_images(NAMES, 0.1, 0.1, seed=4)["val"] != a["val"]


def test_every_caption_of_an_image_lands_in_its_split(tmp_path):
    names = [f"{1000000 + 37 * i}.jpg" for i in range(40)]
    for name in names:
        make_image(tmp_path / "images" / name, size=(8, 8))
    rows = [(name, k) for name in names for k in range(5)]
    random.Random(0).shuffle(rows)  # an image's rows need not be adjacent
    path = write_kaggle(tmp_path / "results.csv", [f"{n}| {k}| Caption {k} of image {n} ." for n, k in rows])
    cfg = config(tmp_path, "flickr30k", path, val_fraction=0.1, test_fraction=0.2)
    corpus = read_corpus(cfg)
    splits = make_splits(corpus, cfg)
    assert (len(splits["val"]), len(splits["test"]), len(splits["train"])) == (4, 8, 28)
    split_of = {name: s for s, members in splits.items() for name in members}
    assert len(split_of) == 40  # no image in two splits
    by_split = {s: {c for name in members for c in corpus.captions[name]} for s, members in splits.items()}
    for name, k in rows:
        text = f"Caption {k} of image {name} ."
        assert [s for s in by_split if text in by_split[s]] == [split_of[name]]
    for name in names:  # each image's five captions, in file order
        order = [k for n, k in rows if n == name]
        assert corpus.captions[name] == [f"Caption {k} of image {name} ." for k in order]
    assert make_splits(corpus, cfg) == splits
    save_splits(splits, tmp_path / "splits.json")
    assert load_splits(tmp_path / "splits.json") == splits


# --- dataset, batches, loader --------------------------------------------------------

def small_corpus(tmp_path: Path, captions: dict[str, list[str]]) -> Corpus:
    for i, name in enumerate(captions):
        colour = (15 * i % 256, 100, (255 - 15 * i) % 256)
        make_image(tmp_path / "images" / name, colour=colour, size=(30 + 7 * i, 20 + 3 * i))
    return Corpus(tmp_path / "images", captions)


CAPTIONS = {
    "a.png": ["a red circle"],
    "b.png": ["a blue square to the left of a green triangle", "two shapes", "a square and a triangle"],
    "c.png": ["a white circle above a small red square", "a circle"],
}


def test_collate_pads_captions_and_maps_them_to_their_images(tmp_path):
    corpus = small_corpus(tmp_path, CAPTIONS)
    vocab = Vocabulary.build([c for cs in CAPTIONS.values() for c in cs], min_freq=1)
    dataset = CaptionDataset(corpus, list(CAPTIONS), vocab, image_size=32, max_words=40)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items, pad_id=vocab.pad)
    assert isinstance(batch, Batch)
    flat = [c for cs in CAPTIONS.values() for c in cs]
    longest = max(len(vocab.encode(c)) for c in flat)
    assert batch.images.shape == (3, 3, 32, 32)
    assert batch.tokens.shape == (6, longest) and batch.tokens.dtype == torch.long
    assert batch.image_index.tolist() == [0, 1, 1, 1, 2, 2]
    assert batch.names == ["a.png", "b.png", "c.png"]
    for row, caption in zip(batch.tokens, flat):
        ids = vocab.encode(caption)
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids):] == vocab.pad).all()
    for i, (image, _, _) in enumerate(items):
        assert torch.equal(batch.images[i], image)
    # the pad id is the one given, not a hard-coded 0
    other = collate(items, pad_id=-7)
    assert (other.tokens == -7).sum() == (batch.tokens == vocab.pad).sum() > 0


def test_dataset_truncates_long_captions(tmp_path):
    corpus = small_corpus(tmp_path, CAPTIONS)
    vocab = Vocabulary.build([c for cs in CAPTIONS.values() for c in cs], min_freq=1)
    dataset = CaptionDataset(corpus, ["b.png"], vocab, image_size=32, max_words=3)
    _, captions, name = dataset[0]
    assert name == "b.png"
    assert [c.tolist() for c in captions] == [vocab.encode(c, 3) for c in CAPTIONS["b.png"]]
    assert max(len(c) for c in captions) == 5  # <bos> + 3 words + <eos>


def names_in_order(loader) -> list[str]:
    return [name for batch in loader for name in batch.names]


def test_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    captions = {f"{i:03d}.png": [f"caption {i}"] for i in range(16)}
    corpus = small_corpus(tmp_path, captions)
    vocab = Vocabulary.build([c for cs in captions.values() for c in cs], min_freq=1)
    dataset = CaptionDataset(corpus, list(captions), vocab, image_size=32, max_words=10)

    def order(seed, epoch, shuffle=True):
        loader = build_loader(dataset, batch_size=5, shuffle=shuffle, num_workers=0, seed=seed, epoch=epoch,
                              pad_id=vocab.pad)
        return names_in_order(loader)

    epoch0 = order(0, 0)
    assert len(set(epoch0)) == len(epoch0) and set(epoch0) <= set(captions)   # no image twice in an epoch
    assert len(epoch0) >= len(captions) - 4                                  # at most a short last batch left out
    assert epoch0 == order(0, 0)                  # a resumed run sees the same order
    assert epoch0 != order(0, 1) and order(0, 1) != order(0, 2)
    assert order(0, 1) == order(0, 1)
    assert epoch0 != order(1, 0)
    assert epoch0 != list(captions)
    assert order(0, 0, shuffle=False) == list(captions)
    sizes = [len(b.names) for b in build_loader(dataset, batch_size=5, shuffle=False, num_workers=0, seed=0, epoch=0)]
    assert sizes == [5, 5, 5, 1]  # evaluation sees every image


def test_transform_resizes_to_a_square_and_normalizes():
    transform = build_transform(48)
    out = transform(Image.new("RGB", (100, 30), (255, 255, 255)))
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.amin(dim=(1, 2)), out.amax(dim=(1, 2)))


@pytest.mark.parametrize("mode, colour", [("L", 128), ("RGBA", (255, 0, 0, 255)), ("RGBA", (0, 0, 255, 0)),
                                           ("P", 3), ("LA", (90, 255)), ("1", 1), ("CMYK", (0, 255, 255, 0))])
def test_dataset_turns_any_image_mode_into_three_channels(tmp_path, mode, colour):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    name = f"img{suffix}"
    make_image(tmp_path / "images" / name, colour=colour, size=(20, 12), mode=mode)
    corpus = Corpus(tmp_path / "images", {name: ["a thing"]})
    vocab = Vocabulary.build(["a thing"], min_freq=1)
    image, _, _ = CaptionDataset(corpus, [name], vocab, image_size=32, max_words=10)[0]
    assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    rgb = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    if mode == "L":
        assert torch.allclose(rgb, torch.full_like(rgb, 128 / 255), atol=1e-3)  # grey stays grey in all three
    if mode == "RGBA" and colour[3] == 0:
        assert torch.allclose(rgb, torch.ones_like(rgb), atol=1e-3)  # transparent goes onto white, not black
    if mode == "RGBA" and colour[3] == 255:
        assert torch.allclose(rgb[0], torch.ones_like(rgb[0]), atol=1e-3) and rgb[1:].abs().max() < 1e-3


# --- EpochSampler: epoch order, mid-epoch skip, DDP shards ---------------------------------------

def test_epoch_sampler_unshuffled_is_the_dataset_order():
    assert list(EpochSampler(10, batch_size=3, shuffle=False)) == list(range(10))
    assert list(EpochSampler(10, batch_size=3, shuffle=False, seed=5, epoch=7)) == list(range(10))
    assert len(EpochSampler(10, batch_size=3, shuffle=False)) == 10


def test_epoch_sampler_shuffled_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch, batch_size=4):
        torch.manual_seed(seed + 1000 * epoch + 17)      # the global RNG plays no part
        random.seed(99)
        return list(EpochSampler(30, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch))

    first = order(0, 1)
    assert sorted(first) == list(range(30)) and first != list(range(30))   # a permutation, shuffled
    assert order(0, 1) == first and order(0, 1, batch_size=6) == first
    assert order(0, 2) != first and order(1, 1) != first and order(1, 2) != order(0, 2)
    torch.manual_seed(0)
    a = list(EpochSampler(30, batch_size=4, shuffle=True, seed=3, epoch=4))
    torch.rand(100)                                                        # draws in between change nothing
    assert list(EpochSampler(30, batch_size=4, shuffle=True, seed=3, epoch=4)) == a


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("skip", [0, 1, 3, 7])
def test_epoch_sampler_skip_drops_exactly_the_first_batches(shuffle, skip):
    n, batch_size = 29, 4
    full = list(EpochSampler(n, batch_size=batch_size, shuffle=shuffle, seed=2, epoch=3))
    rest = list(EpochSampler(n, batch_size=batch_size, shuffle=shuffle, seed=2, epoch=3, skip_batches=skip))
    assert rest == full[skip * batch_size:]
    assert len(rest) == n - skip * batch_size


class _TinyImages(torch.utils.data.Dataset):
    """n Items of a 1-pixel image each, its index in the pixel, one caption."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Item(torch.full((3, 1, 1), float(i)), [torch.tensor([1, 4 + i % 3, 2])], f"{i:03d}")


@pytest.mark.parametrize("n, skip", [(37, 0), (40, 0), (37, 2)])
def test_epoch_sampler_ranks_split_each_global_batch(n, skip):
    batch_size, world = 8, 2
    single = [b.names for b in build_loader(_TinyImages(n), batch_size=batch_size, shuffle=True, num_workers=0,
                                            seed=4, epoch=2, skip_batches=skip)]
    ranks = [[b.names for b in build_loader(_TinyImages(n), batch_size=batch_size, shuffle=True, num_workers=0,
                                            seed=4, epoch=2, skip_batches=skip, rank=r, world=world)]
             for r in range(world)]
    steps = (n - skip * batch_size) // batch_size          # a last global batch that cannot be split is dropped
    assert len(ranks[0]) == len(ranks[1]) == steps > 0     # every process takes as many steps
    for k in range(steps):
        a, b = ranks[0][k], ranks[1][k]
        assert len(a) == len(b) == batch_size // world
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(single[k])          # together: the single process's k-th batch
    # the sampler itself: shares of the same global batches
    order = list(EpochSampler(n, batch_size=batch_size, shuffle=True, seed=4, epoch=2, skip_batches=skip))
    shares = [list(EpochSampler(n, batch_size=batch_size, shuffle=True, seed=4, epoch=2, skip_batches=skip,
                                rank=r, world=world)) for r in range(world)]
    for k in range(steps):
        glob = order[k * batch_size:(k + 1) * batch_size]
        share = batch_size // world
        parts = [s[k * share:(k + 1) * share] for s in shares]
        assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(glob)


def test_epoch_sampler_unshuffled_shards_rank_by_world():
    for world in (2, 3):
        shards = [list(EpochSampler(11, batch_size=4, shuffle=False, rank=r, world=world)) for r in range(world)]
        assert shards == [list(range(r, 11, world)) for r in range(world)]
        assert sorted(sum(shards, [])) == list(range(11))        # evaluation sees every image once


@pytest.mark.parametrize("batch_size, world", [(5, 2), (7, 3), (0, 1)])
def test_epoch_sampler_batch_not_divisible_by_the_processes_raises(batch_size, world):
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(20, batch_size=batch_size, shuffle=True, rank=0, world=world)


# --- Batch of images or of cached features -----------------------------------------------------

def test_collate_of_items_fills_images_only():
    items = [Item(torch.rand(3, 4, 4), [torch.tensor([1, 5, 2]), torch.tensor([1, 2])], "a"),
             Item(torch.rand(3, 4, 4), [torch.tensor([1, 6, 7, 2])], "b")]
    batch = collate(items, pad_id=0)
    assert batch.features is None and batch.images.shape == (2, 3, 4, 4)
    assert torch.equal(batch.images[1], items[1].image)
    assert batch.image_index.tolist() == [0, 0, 1] and batch.names == ["a", "b"]
    inputs = batch.model_inputs()
    assert list(inputs) == ["images"] and inputs["images"] is batch.images
    moved = batch.to("cpu")
    assert moved.features is None and torch.equal(moved.images, batch.images)


def test_collate_of_feature_items_fills_features_only():
    items = [FeatureItem(torch.rand(9, 16).half(), [torch.tensor([1, 5, 2])], "a"),
             FeatureItem(torch.rand(9, 16).half(), [torch.tensor([1, 6, 2]), torch.tensor([1, 2])], "b")]
    batch = collate(items, pad_id=0)
    assert batch.images is None and batch.features.shape == (2, 9, 16) and batch.features.dtype == torch.float16
    assert torch.equal(batch.features[0], items[0].features)
    assert batch.image_index.tolist() == [0, 1, 1]
    inputs = batch.model_inputs()
    assert list(inputs) == ["features"] and inputs["features"].dtype == torch.float32   # the model runs fp32
    assert torch.equal(inputs["features"], batch.features.float())
    moved = batch.to("cpu")
    assert moved.images is None and torch.equal(moved.features, batch.features)
