"""Every captions layout the package reads -- COCO (official and Karpathy's), CSV, JSON Lines -- on files
made here in their real layouts, with images in nested folders; data.format auto; errors that name the row."""
import csv
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from captioning.config import ConfigError, from_dict
from captioning.data.check import summary_line
from captioning.data.corpus import find_missing, make_splits, read_corpus
from captioning.data.readers import detect_format, read_captions
from captioning.data.readers.coco import read_coco
from captioning.data.readers.karpathy import read_karpathy


def make_image(path: Path, size=(40, 30), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_coco(root: Path, parts=(("train2017", range(1, 7)), ("val2017", range(101, 111)))) -> Path:
    """COCO's layout: root/{train2017,val2017}/<12-digit id>.jpg and root/annotations/captions_<part>.json."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for part, ids in parts:
        images, annotations = [], []
        for i in ids:
            name = f"{i:012d}.jpg"
            make_image(root / part / name, colour=(i % 256, 40, 40))
            images.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{part}/{name}",
                           "height": 30, "width": 40, "id": i})
            annotations += [{"image_id": i, "id": 10 * i + k, "caption": f"A photo number {i}, caption {k}."}
                            for k in range(2)]
        (root / "annotations" / f"captions_{part}.json").write_text(json.dumps(
            {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": annotations}))
    return root / "annotations"


KARPATHY_COCO = [  # (filepath, filename, split, cocoid, captions)
    ("val2014", "COCO_val2014_000000391895.jpg", "test", 391895, ["A man with a red helmet on a small moped."]),
    ("val2014", "COCO_val2014_000000522418.jpg", "restval", 522418, ["A woman cutting a large cake.", "Cake!"]),
    ("train2014", "COCO_train2014_000000057870.jpg", "train", 57870, ["A restaurant with tables and chairs."]),
    ("val2014", "COCO_val2014_000000184613.jpg", "val", 184613, ["A child holding a flowered umbrella."]),
]


def write_karpathy_coco(root: Path, entries=KARPATHY_COCO) -> Path:
    """Karpathy's dataset_coco.json, with the fields the real file carries; images under root/<filepath>/."""
    images, sentid = [], 0
    for imgid, (filepath, filename, split, cocoid, raws) in enumerate(entries):
        make_image(root / filepath / filename)
        sentences = [{"tokens": r.lower().strip(".!").split(), "raw": r, "imgid": imgid, "sentid": sentid + k}
                     for k, r in enumerate(raws)]
        sentid += len(raws)
        images.append({"filepath": filepath, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


OWN = [  # (image relative to the images folder, caption, split)
    ("trips/2023/beach.jpg", "a dog runs on the beach", "train"),
    ("trips/2023/beach.jpg", "a brown dog, wet from the sea", "train"),
    ("trips/2024/snow.png", "two people on skis", "train"),
    ("home/cat.jpg", 'the cat says "no"', "val"),
    ("home/cat.jpg", "a cat on a sofa", "val"),
    ("dog.jpg", "a dog sleeps", "test"),
]


def write_own(root: Path, kind: str, rows=OWN, with_split: bool = True) -> Path:
    """A CSV or JSON Lines of the user's own photos, the images in nested folders under root/photos."""
    for name in {r[0] for r in rows}:
        make_image(root / "photos" / name)
    path = root / f"captions.{kind}"
    if kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption", "split"] if with_split else ["image", "caption"])
            writer.writerows(row if with_split else row[:2] for row in rows)
    else:
        path.write_text("".join(json.dumps({"image": n, "caption": c, **({"split": s} if with_split else {})}) + "\n"
                                for n, c, s in rows))
    return path


def own_config(root: Path, captions: Path, fmt: str | None = None, **data):
    return from_dict({"data": {**({"format": fmt} if fmt else {}), "images": str(root / "photos"),
                               "captions": str(captions), "min_freq": 1, **data}})


def chosen(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("captioning.data") and "read as data.format" in
            r.getMessage()]


# --- COCO, official caption files ------------------------------------------------------

def test_coco_official_files_give_captions_by_relative_path_and_val_halved_into_val_and_test(tmp_path):
    annotations = write_coco(tmp_path / "coco")
    captions, splits = read_coco(annotations, split_seed=0)
    assert captions["train2017/000000000001.jpg"] == ["A photo number 1, caption 0.", "A photo number 1, caption 1."]
    assert len(captions) == 16 and all(len(c) == 2 for c in captions.values())
    assert splits["train"] == [f"train2017/{i:012d}.jpg" for i in range(1, 7)]
    assert (len(splits["val"]), len(splits["test"])) == (5, 5)
    val2017 = {f"val2017/{i:012d}.jpg" for i in range(101, 111)}
    assert set(splits["val"]) | set(splits["test"]) == val2017 and not set(splits["val"]) & set(splits["test"])
    assert read_coco(annotations, split_seed=0)[1] == splits                         # the seed decides
    assert read_coco(annotations, split_seed=1)[1]["val"] != splits["val"]


def test_coco_config_reads_relative_paths_and_names_a_missing_image(tmp_path, caplog):
    annotations = write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "val2017" / "000000000105.jpg").unlink()
    cfg = from_dict({"data": {"format": "coco", "images": str(tmp_path / "coco"), "captions": str(annotations),
                              "min_freq": 1}})
    with caplog.at_level(logging.INFO, logger="captioning.data"):
        corpus = read_corpus(cfg)
    assert len(corpus.captions) == 15 and "val2017/000000000105.jpg" not in corpus.captions
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "val2017/000000000105.jpg" in warning and "1 of 16" in warning
    splits = make_splits(corpus, cfg)
    assert sum(map(len, splits.values())) == 15 and "val2017/000000000105.jpg" not in sum(splits.values(), [])
    assert summary_line(corpus, cfg).startswith("data: 15 images (1 missing)")   # logged before training


def test_coco_annotation_of_an_unknown_image_is_skipped_and_named(tmp_path):
    annotations = write_coco(tmp_path / "coco", parts=(("val2017", range(1, 3)),))
    data = json.loads((annotations / "captions_val2017.json").read_text())
    data["annotations"] += [{"image_id": 99, "id": 5, "caption": "orphan"}, {"image_id": 1, "id": 6, "caption": " "}]
    (annotations / "captions_val2017.json").write_text(json.dumps(data))
    found = read_captions(annotations, "coco")
    assert found.skipped == ["captions_val2017.json: annotations[4] (unknown image_id)",
                             "captions_val2017.json: annotations[5]"]
    assert found.empty == ["val2017/000000000001.jpg"] and found.ids[2] == "val2017/000000000002.jpg"


def test_coco_folder_without_caption_files_says_what_it_expects(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        read_captions(tmp_path / "annotations", "coco")


# --- COCO, Karpathy's dataset_coco.json ----------------------------------------------------

def test_karpathy_coco_names_images_by_filepath_and_restval_joins_train(tmp_path):
    path = write_karpathy_coco(tmp_path / "coco")
    captions, splits = read_karpathy(path)
    assert captions["val2014/COCO_val2014_000000522418.jpg"] == ["A woman cutting a large cake.", "Cake!"]
    assert splits == {"train": ["val2014/COCO_val2014_000000522418.jpg", "train2014/COCO_train2014_000000057870.jpg"],
                      "val": ["val2014/COCO_val2014_000000184613.jpg"],
                      "test": ["val2014/COCO_val2014_000000391895.jpg"]}
    assert read_captions(path, "karpathy").ids[57870] == "train2014/COCO_train2014_000000057870.jpg"
    cfg = from_dict({"data": {"format": "karpathy", "images": str(tmp_path / "coco"), "captions": str(path)}})
    assert set(read_corpus(cfg).captions) == set(captions)       # nothing missing: the paths are relative


def test_karpathy_entry_without_its_fields_is_named(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": []}, {"split": "train"}]}))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[1\]"):
        read_captions(path, "karpathy")


def test_broken_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n{"filename": "a.jpg",\n "sentences": [}\n]}')
    with pytest.raises(ValueError, match=r"dataset_coco.json: not valid JSON \(line 3"):
        read_captions(path, "karpathy")


# --- your own data: CSV and JSON Lines ----------------------------------------------------

@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_own_data_with_a_split_column_is_used_as_given(tmp_path, kind):
    path = write_own(tmp_path, kind)
    cfg = own_config(tmp_path, path, kind, val_fraction=0.4, test_fraction=0.4)   # the fractions do not apply
    corpus = read_corpus(cfg)
    assert corpus.captions == {"trips/2023/beach.jpg": ["a dog runs on the beach", "a brown dog, wet from the sea"],
                               "trips/2024/snow.png": ["two people on skis"],
                               "home/cat.jpg": ['the cat says "no"', "a cat on a sofa"], "dog.jpg": ["a dog sleeps"]}
    assert make_splits(corpus, cfg) == {"train": ["trips/2023/beach.jpg", "trips/2024/snow.png"],
                                        "val": ["home/cat.jpg"], "test": ["dog.jpg"]}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_own_data_without_a_split_is_split_by_image_with_the_seed(tmp_path, kind):
    path = write_own(tmp_path, kind, with_split=False)
    cfg = own_config(tmp_path, path, kind, val_fraction=0.25, test_fraction=0.25)
    corpus = read_corpus(cfg)
    assert corpus.splits is None and len(corpus.captions) == 4
    splits = make_splits(corpus, cfg)
    assert sorted(sum(splits.values(), [])) == sorted(corpus.captions) and len(splits["test"]) == 1


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_an_image_in_two_splits_is_an_error_naming_it_and_both_rows(tmp_path, kind):
    rows = OWN + [("home/cat.jpg", "a cat again", "train")]
    path = write_own(tmp_path, kind, rows)
    with pytest.raises(ValueError) as info:
        read_corpus(own_config(tmp_path, path, kind))
    message = str(info.value)
    assert "'home/cat.jpg'" in message and "two splits" in message and str(path) in message
    first, last = (5, 8) if kind == "csv" else (4, 7)        # the CSV's line 1 is its header
    assert f"val (line {first})" in message and f"train (line {last})" in message


def test_a_split_that_is_not_train_val_or_test_names_file_line_and_value(tmp_path):
    path = write_own(tmp_path, "csv", OWN[:2] + [("dog.jpg", "a dog sleeps", "training")])
    with pytest.raises(ValueError, match=r"captions.csv: line 4: split 'training'"):
        read_captions(path, "csv")


def test_jsonl_unreadable_lines_are_skipped_and_named_and_input_stands_for_image(tmp_path, caplog):
    make_image(tmp_path / "photos" / "a.jpg")
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "a red square"}\nnot json\n\n'
                    '{"input": "a.jpg", "caption": "red again"}\n["a list"]\n{"image": "a.jpg", "caption": ""}\n')
    with caplog.at_level(logging.WARNING, logger="captioning.data"):
        corpus = read_corpus(own_config(tmp_path, path))
    assert corpus.captions == {"a.jpg": ["a red square", "red again"]}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 3 unreadable row(s) (1 with an empty caption): line 2, line 5, line 6" in warning


# --- data.format auto ------------------------------------------------------------------

def test_auto_is_the_default_and_reads_a_csv_that_once_needed_the_format_set(tmp_path, caplog):
    path = write_own(tmp_path, "csv", with_split=False)
    cfg = own_config(tmp_path, path)
    assert cfg.data.format == "auto"
    with caplog.at_level(logging.INFO, logger="captioning.data"):
        corpus = read_corpus(cfg)
    assert len(corpus.captions) == 4
    assert chosen(caplog) == [f"{path}: read as data.format csv (a CSV header naming image and caption)"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("layout, expected", [
    ("coco", "coco"), ("coco_file", "coco"), ("karpathy", "karpathy"), ("csv", "csv"), ("jsonl", "jsonl"),
    ("jsonl_as_json", "jsonl"), ("kaggle", "flickr30k"), ("semicolons", "csv"),
])
def test_auto_tells_each_layout_and_says_which_it_chose(tmp_path, caplog, layout, expected):
    if layout.startswith("coco"):
        path = write_coco(tmp_path, parts=(("val2017", range(1, 3)),))
        path = path / "captions_val2017.json" if layout == "coco_file" else path
    elif layout == "karpathy":
        path = write_karpathy_coco(tmp_path)
    elif layout in ("csv", "jsonl"):
        path = write_own(tmp_path, layout)
    elif layout == "jsonl_as_json":
        path = write_own(tmp_path, "jsonl").rename(tmp_path / "captions.json")
    elif layout == "kaggle":
        path = tmp_path / "results.csv"
        path.write_text("image_name| comment_number| comment\n1000092795.jpg| 0| Two young guys .\n")
    else:
        path = tmp_path / "captions.txt"
        path.write_text("Image;Caption\na.jpg;a dog, running\n")
    with caplog.at_level(logging.INFO, logger="captioning.data"):
        found = read_captions(path)
    assert detect_format(path)[0] == found.format == expected
    [message] = chosen(caplog)
    assert message.startswith(f"{path}: read as data.format {expected} (")
    assert found.captions


def test_auto_on_a_file_it_cannot_tell_says_how_to_set_the_format(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("just some text\nmore text\n")
    with pytest.raises(ValueError, match=r"captions.txt: cannot tell its format .* set data.format"):
        read_captions(path)


def test_explicit_formats_still_work_and_unknown_ones_are_refused():
    assert from_dict({"data": {"format": "flickr30k"}}, check_paths=False).data.format == "flickr30k"
    for fmt in ("coco", "jsonl", "auto"):
        assert from_dict({"data": {"format": fmt}}, check_paths=False).data.format == fmt
    with pytest.raises(ConfigError, match="'data.format'"):
        from_dict({"data": {"format": "parquet"}}, check_paths=False)


def test_format_coco_takes_a_folder_for_data_captions_and_others_a_file(tmp_path):
    annotations = write_coco(tmp_path / "coco", parts=(("val2017", range(1, 3)),))
    raw = {"data": {"images": str(tmp_path / "coco"), "captions": str(annotations)}}
    for fmt in ("coco", "auto"):
        assert from_dict({"data": {**raw["data"], "format": fmt}}).data.captions == str(annotations)
    with pytest.raises(ConfigError, match="'data.captions'"):
        from_dict({"data": {**raw["data"], "format": "csv"}})


# --- the missing-image check -------------------------------------------------------------

def test_find_missing_lists_each_folder_once_and_knows_relative_paths(tmp_path, monkeypatch):
    for name in ("a/1.jpg", "a/2.jpg", "a/b/3.jpg", "top.jpg"):
        make_image(tmp_path / name)
    listed = []
    real = __import__("os").listdir
    monkeypatch.setattr("captioning.data.corpus.os.listdir", lambda p: listed.append(Path(p)) or real(p))
    names = ["a/1.jpg", "a/2.jpg", "a/b/3.jpg", "a/b/gone.jpg", "top.jpg", "nowhere/x.jpg", "a/1.jpg"]
    assert find_missing(tmp_path, names) == ["a/b/gone.jpg", "nowhere/x.jpg"]
    assert sorted(listed) == sorted([tmp_path, tmp_path / "a", tmp_path / "a/b", tmp_path / "nowhere"])


def test_a_format_set_by_hand_that_does_not_fit_the_file_is_named_with_the_one_that_does(tmp_path, caplog):
    path = write_own(tmp_path, "csv", with_split=False)
    with caplog.at_level(logging.WARNING, logger="captioning.data"), pytest.raises(ValueError, match="data.format"):
        read_corpus(own_config(tmp_path, path, "flickr30k"))             # every row unreadable as results.csv
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 7 unreadable row(s)" in warning and "looks like csv" in warning and "set data.format csv" in warning


def test_a_coco_folder_mixing_releases_is_refused(tmp_path):
    annotations = write_coco(tmp_path / "coco", parts=(("train2017", range(1, 3)), ("val2014", range(101, 103))))
    with pytest.raises(ValueError, match="several COCO releases.*2014, 2017"):
        read_coco(annotations)


def test_a_csv_that_caption_out_wrote_reads_with_input_as_image(tmp_path):
    make_image(tmp_path / "images" / "a.jpg")
    captions = tmp_path / "out.csv"
    captions.write_text("input,caption,error\na.jpg,a red square,\n")
    found = read_captions(captions, "csv")
    assert found.captions == {"a.jpg": ["a red square"]}
