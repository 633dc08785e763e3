"""Captioning a folder: folders and globs expand to their images, --out JSON Lines or CSV, a stopped run goes
on where it stopped, images open on worker threads while the model runs."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.data.images import expand_inputs

ROOT = Path(__file__).resolve().parents[1]


def photos(shapes_dir: Path, tmp_path: Path, n: int = 6) -> Path:
    """A nested folder of n images and a file that is not an image."""
    folder = tmp_path / "photos"
    for i, image in enumerate(sorted((shapes_dir / "flickr30k_images").iterdir())[:n]):
        target = folder / ("a" if i % 2 else "b/c") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folders_and_quoted_globs_expand_to_their_images_sorted(shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path)
    found = expand_inputs([folder])
    assert len(found) == 6 and found == sorted(found) and not any(f.endswith(".txt") for f in found)
    assert expand_inputs([f"{folder}/**/*.png"]) == found
    assert expand_inputs([f"{folder}/a/*.png"]) == [f for f in found if "/a/" in f]
    assert expand_inputs([f"{folder}/none*.png", "https://example.com/x.jpg", "missing.jpg"]) == \
        [f"{folder}/none*.png", "https://example.com/x.jpg", "missing.jpg"]


def caption(*args):
    return subprocess.run([sys.executable, "-m", "captioning", "caption", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=180)


def test_out_jsonl_is_written_and_a_stopped_run_goes_on_where_it_stopped(tiny_run, shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path)
    out = tmp_path / "captions.jsonl"
    images = expand_inputs([folder])
    first = [json.dumps({"input": images[0], "caption": "kept from before"}), json.dumps({"input": images[1]})[:-3]]
    out.write_text(first[0] + "\n" + first[1])             # a run killed mid-line
    result = caption("--checkpoint", tiny_run / "best.pt", "--precision", "fp32", "--out", out, "--batch-size", "2",
                     folder, tmp_path / "missing.png")
    assert result.returncode == 1 and "missing.png" in result.stderr and result.stdout == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"input": images[0], "caption": "kept from before"}      # skipped, not captioned again
    assert [x["input"] for x in lines[1:]] == images[1:] + [str(tmp_path / "missing.png")]
    assert all(x.get("caption") for x in lines[1:-1]) and "error" in lines[-1]


def test_out_csv_has_input_caption_error_columns(tiny_run, shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path, n=3)
    out = tmp_path / "captions.csv"
    result = caption("--checkpoint", tiny_run / "best.pt", "--precision", "fp32", "--out", out,
                     f"{folder}/**/*.png", folder / "notes.txt")
    assert result.returncode == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == expand_inputs([folder]) + [str(folder / "notes.txt")]
    assert all(r["caption"] and not r["error"] for r in rows[:3]) and "not an image" in rows[3]["error"]


def test_caption_iter_gives_caption_s_results_in_order_across_batches(tiny_run, shapes_dir, tmp_path):
    from captioning import Captioner
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32")
    inputs = expand_inputs([photos(shapes_dir, tmp_path)]) + ["missing.png"]
    streamed = list(captioner.caption_iter(inputs, batch_size=3, workers=3))
    assert [r.input for r in streamed] == inputs
    assert [r.caption for r in streamed] == [r.caption for r in captioner.caption(inputs, batch_size=7)]
    assert streamed[-1].error and all(r.ok for r in streamed[:-1])


def test_results_file_retries_failures_when_asked_and_matches_long_inputs(tmp_path):
    from captioning.captioner import CaptionResult
    from captioning.cli.results import ResultsFile

    long_url = "https://example.com/" + "x" * 300 + ".jpg"
    for suffix in (".jsonl", ".csv"):
        out = ResultsFile(tmp_path / f"r{suffix}")
        out.write(CaptionResult("shown as a shortened name", caption="a dog"), long_url)
        out.write(CaptionResult("b.jpg", error="timed out"))
        out.write(CaptionResult("c.jpg", error="timed out"))
        out.write(CaptionResult("c.jpg", caption="a cat"))            # a later run got it
        out.close()
        again = ResultsFile(tmp_path / f"r{suffix}")
        assert again.done == {long_url, "b.jpg", "c.jpg"} and again.failed == {"b.jpg"}
        again.close()
        retry = ResultsFile(tmp_path / f"r{suffix}", retry_errors=True)    # b.jpg is tried again
        assert retry.done == {long_url, "c.jpg"} and retry.failed == {"b.jpg"}
        retry.close()


def test_results_file_records_its_model_and_refuses_another_unless_redo(tmp_path):
    from captioning.captioner import CaptionResult
    from captioning.cli.results import ResultsFile

    for suffix in (".jsonl", ".csv"):
        path = tmp_path / f"r{suffix}"
        out = ResultsFile(path, model="best.pt@aaaa")
        out.write(CaptionResult("a.jpg", caption="a dog"))
        out.write(CaptionResult("b.jpg", error="timed out"))
        out.close()
        with pytest.raises(ValueError, match=r"2 row\(s\) made by another model \(best.pt@aaaa\).*--redo"):
            ResultsFile(path, model="best.pt@bbbb")
        same = ResultsFile(path, model="best.pt@aaaa")
        assert same.done == {"a.jpg", "b.jpg"} and same.redone == 0
        same.close()
        redo = ResultsFile(path, model="best.pt@bbbb", redo=True)
        assert redo.done == set() and redo.redone == 2
        redo.write(CaptionResult("a.jpg", caption="a cat"))
        redo.close()
        again = ResultsFile(path, model="best.pt@bbbb")             # only this model's row is left
        assert again.done == {"a.jpg"}
        again.close()


def test_a_csv_of_an_earlier_version_gains_the_model_column_and_keeps_its_rows(tmp_path):
    from captioning.captioner import CaptionResult
    from captioning.cli.results import ResultsFile

    path = tmp_path / "old.csv"
    path.write_text("input,caption,error\na.jpg,a dog,\nb.jpg,,timed out\n")
    out = ResultsFile(path, model="best.pt@aaaa")
    assert out.done == {"a.jpg", "b.jpg"} and out.unrecorded == 2
    out.write(CaptionResult("c.jpg", caption="a cat"))
    out.close()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["input"], r["model"]) for r in rows] == [("a.jpg", ""), ("b.jpg", ""), ("c.jpg", "best.pt@aaaa")]


def test_caption_out_says_what_it_skipped_and_refuses_another_model(tiny_run, shapes_dir, tmp_path):
    folder = photos(shapes_dir, tmp_path, n=2)
    out = tmp_path / "captions.jsonl"
    first = caption("--checkpoint", tiny_run / "best.pt", "--out", out, folder)
    assert first.returncode == 0 and f"0 input(s) already in {out}: skipped" in first.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["model"].startswith("best.pt@") for r in rows)
    again = caption("--checkpoint", tiny_run / "best.pt", "--out", out, folder)
    assert again.returncode == 0 and f"2 input(s) already in {out}: skipped" in again.stderr
    other = caption("--checkpoint", tiny_run / "last.pt", "--out", out, folder)   # another file, another model
    assert other.returncode == 2 and "made by another model" in other.stderr and "--redo" in other.stderr
    assert len(out.read_text().splitlines()) == 2                                 # nothing written
    redo = caption("--checkpoint", tiny_run / "last.pt", "--out", out, "--redo", folder)
    assert redo.returncode == 0 and "2 row(s) of another model taken out (--redo)" in redo.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["model"].startswith("last.pt@") for r in rows)
