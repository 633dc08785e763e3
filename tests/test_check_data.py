"""check-data: every problem of a data set named in its JSON report, and exit 1 only when nothing is usable."""
import io
import json

from PIL import Image

from captioning.cli.main import main
from captioning.config import from_dict
from captioning.data.check import check_data, spread
from test_readers import make_image

ROWS = [  # image, caption: one of each problem
    ("trips/good1.png", "a red square on the left of a blue circle"),
    ("trips/good1.png", ""),                                                  # empty caption
    ("trips/good2.png", "a red square"),
    ("trips/good2.png", "A red   square."),                                   # duplicate (as words)
    ("trips/good3.png", "a green triangle"),
    ("trips/tiny.png", "a small white dot"),                                  # smaller than data.image_size
    ("broken.jpg", "a file that is no image"),                                # unreadable
    ("truncated.png", "half a file"),                                         # unreadable
    ("gone/away.jpg", "an image that is not there"),                          # missing
]


def write_data(root, rows=ROWS):
    photos = root / "photos"
    for name in ("trips/good1.png", "trips/good2.png", "trips/good3.png"):
        make_image(photos / name, size=(64, 48))
    make_image(photos / "trips" / "tiny.png", size=(8, 8))
    (photos / "broken.jpg").write_text("not an image at all")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(png, "PNG")
    (photos / "truncated.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    lines = ["image,caption"] + [f"{name},{caption}" for name, caption in rows]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    config = root / "config.yaml"
    config.write_text(f"data:\n  images: {photos}\n  captions: {root / 'captions.csv'}\n  image_size: 32\n"
                      "  min_freq: 2\n  max_words: 9\n  val_fraction: 0.2\n  test_fraction: 0.2\n")
    return config


def test_check_data_names_every_problem_in_its_json(tmp_path, capsys):
    config = write_data(tmp_path)
    out = tmp_path / "check.json"
    assert main(["check-data", "--config", str(config), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["format"], report["rows"], report["images"]) == ("csv", 9, 7)
    assert report["missing_images"] == ["gone/away.jpg"]
    assert report["unreadable_images"] == ["broken.jpg", "truncated.png"]
    assert "broken.jpg" in report["unreadable_reasons"]["broken.jpg"]
    assert report["small_images"] == ["trips/tiny.png"]
    assert report["empty_captions"] == ["trips/good1.png"] and report["skipped_rows"] == ["line 3"]
    assert report["duplicate_captions"] == ["trips/good2.png"]
    assert report["usable_images"] == 4                                  # 7 captioned - 1 missing - 2 unreadable
    assert sum(report["splits"].values()) == 6                           # present images, split by the seed
    assert report["captions_per_image"] == {"min": 1, "median": 1, "p95": 2, "max": 2}
    assert report["caption_words"]["max"] == 10 and report["caption_words"]["over_max_words"] == 1
    assert 0 < report["unk_share"] < 1 and report["unk_share"] == report["vocabulary"]["unk_share"]
    table = capsys.readouterr().out
    for name in ("gone/away.jpg", "broken.jpg", "truncated.png", "trips/tiny.png", "trips/good2.png"):
        assert name in table


def test_check_data_exits_1_when_nothing_usable_is_left_and_still_writes_its_report(tmp_path, capsys):
    config = write_data(tmp_path, [("broken.jpg", "no image"), ("gone.jpg", "not there"), ("truncated.png", "half")])
    out = tmp_path / "check.json"
    assert main(["check-data", "--config", str(config), "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["usable_images"] == 0 and report["missing_images"] == ["gone.jpg"]
    assert "no usable image" in capsys.readouterr().err


def test_check_data_refuses_an_out_file_in_a_missing_folder_before_opening_anything(tmp_path, capsys, monkeypatch):
    config = write_data(tmp_path)
    monkeypatch.setattr("captioning.data.check.open_image", lambda *a: (_ for _ in ()).throw(AssertionError("opened")))
    assert main(["check-data", "--config", str(config), "--out", str(tmp_path / "nope" / "check.json")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_check_data_opens_images_in_threads_through_the_safe_loader(tmp_path, monkeypatch):
    import threading

    from captioning.data import images

    write_data(tmp_path)
    threads = set()

    def spy(source, *args):
        threads.add(threading.get_ident())
        return images.open_image(source, *args)

    monkeypatch.setattr("captioning.data.check.open_image", spy)
    cfg = from_dict({"data": {"images": str(tmp_path / "photos"), "captions": str(tmp_path / "captions.csv")}})
    report = check_data(cfg, workers=3, progress=False)
    assert report["unreadable_images"] == ["broken.jpg", "truncated.png"]
    assert threads and threading.get_ident() not in threads


def test_spread_of_counts():
    assert spread([]) == {"min": 0, "median": 0, "p95": 0, "max": 0}
    assert spread(list(range(1, 101))) == {"min": 1, "median": 50.5, "p95": 95, "max": 100}
