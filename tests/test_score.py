"""score: any model's predictions, in any of the accepted layouts, scored as evaluate scores a checkpoint's."""
import csv
import json
import logging

import pytest

from captioning.cli.main import main
from captioning.eval.evaluate import score
from captioning.eval.metrics import score_captions
from test_readers import write_coco

REFERENCES = {  # image -> (split, captions)
    "a/dog.jpg": ("test", ["a brown dog runs on the grass", "a dog running outside"]),
    "a/cat.jpg": ("test", ["a cat sleeps on a red sofa", "a sleeping cat"]),
    "b/bike.jpg": ("test", ["a man rides a bike down a hill", "a cyclist on a road"]),
    "b/boat.jpg": ("val", ["a small boat on a lake", "a boat on calm water"]),
    "c/kite.jpg": ("train", ["a child flies a kite on the beach", "a kite in the sky"]),
}
PREDICTIONS = {"a/dog.jpg": "a dog runs on the grass", "a/cat.jpg": "a cat on a sofa",
               "b/bike.jpg": "a man rides a bike", "b/boat.jpg": "a boat on a lake"}


@pytest.fixture
def no_java(monkeypatch):
    """Score without Java (the pure-Python tokenizer, METEOR None): seconds faster per call."""
    monkeypatch.setattr("captioning.eval.metrics.java_available", lambda: False)


def write_references(path, with_split=True):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"] if with_split else ["image", "caption"])
        writer.writerows([name, c, split][:3 if with_split else 2]
                         for name, (split, caps) in REFERENCES.items() for c in caps)
    return path


def write_jsonl(path, predictions, key="image"):
    path.write_text("".join(json.dumps({key: n, "caption": c}) + "\n" for n, c in predictions.items()))
    return path


def expected(predictions, names, java=False):
    return score_captions({n: predictions[n] for n in names}, {n: REFERENCES[n][1] for n in names}, java=java)[0]


@pytest.mark.parametrize("java", [False, pytest.param(None, marks=pytest.mark.slow)])
def test_score_prints_and_writes_what_score_captions_computes(tmp_path, capsys, monkeypatch, java):
    if java is False:
        monkeypatch.setattr("captioning.eval.metrics.java_available", lambda: False)
    refs, out = write_references(tmp_path / "refs.csv"), tmp_path / "score.json"
    preds = write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS)
    assert main(["score", "--predictions", str(preds), "--references", str(refs), "--split", "test",
                 "--out", str(out)]) == 0
    want = expected(PREDICTIONS, ["a/dog.jpg", "a/cat.jpg", "b/bike.jpg"], java=java)
    report = json.loads(out.read_text())
    assert report["metrics"] == {"images": 3, **want}
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(report["metrics"])              # as evaluate names them
    assert report["predictions"] == [{"image": n, "caption": PREDICTIONS[n]} for n in ("a/dog.jpg", "a/cat.jpg",
                                                                                         "b/bike.jpg")]
    assert report["references"]["a/cat.jpg"] == REFERENCES["a/cat.jpg"][1] and "notes" in report
    printed = capsys.readouterr().out
    assert "0-1" in printed and "x100" in printed and "Corpus-level" in printed
    assert f"BLEU-4    {want['BLEU-4']:7.4f}  {100 * want['BLEU-4']:6.1f}" in printed
    assert f"CIDEr     {want['CIDEr']:7.4f}  {100 * want['CIDEr']:6.1f}" in printed


def test_the_three_prediction_layouts_give_the_same_scores_on_coco_references(tmp_path, no_java):
    annotations = write_coco(tmp_path / "coco", parts=(("val2017", range(1, 6)),))
    captions = {f"val2017/{i:012d}.jpg": f"a photo number {i}" for i in range(1, 6)}
    layouts = {"jsonl": write_jsonl(tmp_path / "p.jsonl", captions),
               "caption --json": tmp_path / "q.jsonl", "csv": tmp_path / "p.csv", "coco results": tmp_path / "r.json"}
    layouts["caption --json"].write_text(  # absolute paths as given on the command line, and one failed input
        "".join(json.dumps({"input": str(tmp_path / "coco" / n), "caption": c}) + "\n" for n, c in captions.items())
        + json.dumps({"input": "x.jpg", "error": "x.jpg: no such file"}) + "\n")
    layouts["csv"].write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in captions.items()))
    layouts["coco results"].write_text(json.dumps([{"image_id": i, "caption": f"a photo number {i}"}
                                                   for i in range(1, 6)]))
    reports = {kind: score(path, annotations, java=False) for kind, path in layouts.items()}
    want = score_captions(captions, read_refs(annotations), java=False)[0]
    for kind, report in reports.items():
        assert report["metrics"] == {"images": 5, **want}, kind
    assert any("1 input(s) have an error" in n for n in reports["caption --json"]["notes"])
    assert any("by the end of their path" in n for n in reports["caption --json"]["notes"])


def read_refs(annotations):
    from captioning.data.readers.coco import read_coco
    return read_coco(annotations)[0]


def test_images_on_one_side_only_are_warned_about_and_the_rest_scored(tmp_path, caplog, no_java):
    refs = write_references(tmp_path / "refs.csv", with_split=False)
    preds = write_jsonl(tmp_path / "p.jsonl", {**PREDICTIONS, "z/unknown.jpg": "a thing"})
    with caplog.at_level(logging.WARNING, logger="captioning.eval.evaluate"):
        report = score(preds, refs, java=False)
    assert report["metrics"] == {"images": 4, **expected(PREDICTIONS, list(PREDICTIONS))}
    assert report["unscored"] == {"predictions_without_references": ["z/unknown.jpg"],
                                  "references_without_predictions": ["c/kite.jpg"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("prediction but no references" in w and "z/unknown.jpg" in w for w in warnings)
    assert any("have no prediction" in w and "c/kite.jpg" in w for w in warnings)


def test_split_comes_from_the_references_or_a_runs_splits_json(tmp_path, no_java):
    preds = write_jsonl(tmp_path / "p.jsonl", PREDICTIONS)
    assert score(preds, write_references(tmp_path / "r.csv"), split="val", java=False)["metrics"]["images"] == 1
    plain = write_references(tmp_path / "plain.csv", with_split=False)
    with pytest.raises(ValueError, match="carries no split.*--splits"):
        score(preds, plain, split="test", java=False)
    (tmp_path / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": ["a/dog.jpg", "b/boat.jpg"]}))
    report = score(preds, plain, split="test", splits_file=tmp_path / "splits.json", java=False)
    assert [p["image"] for p in report["predictions"]] == ["a/dog.jpg", "b/boat.jpg"]


def test_an_image_predicted_twice_is_named_with_both_rows(tmp_path):
    preds = tmp_path / "p.csv"
    preds.write_text("image,caption\na/dog.jpg,a dog\na/cat.jpg,a cat\na/dog.jpg,another dog\n")
    with pytest.raises(ValueError, match=r"p.csv: image 'a/dog.jpg' has two predictions \(line 2 and line 4\)"):
        score(preds, write_references(tmp_path / "refs.csv"))


def test_no_image_in_common_says_that_the_names_must_match(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", {"elsewhere/x.jpg": "a dog"})
    code = main(["score", "--predictions", str(preds), "--references", str(write_references(tmp_path / "r.csv"))])
    assert code == 2 and "the names must match" in capsys.readouterr().err


def test_an_evaluate_report_can_be_scored_again(tmp_path, no_java):
    report = {"metrics": {}, "predictions": [{"image": n, "caption": c} for n, c in PREDICTIONS.items()],
              "references": {}, "notes": []}
    (tmp_path / "report.json").write_text(json.dumps(report))
    again = score(tmp_path / "report.json", write_references(tmp_path / "r.csv"), java=False)
    assert again["metrics"] == {"images": 4, **expected(PREDICTIONS, list(PREDICTIONS))}


@pytest.mark.slow
def test_score_of_a_runs_predictions_equals_its_evaluate_report(tiny_run, tmp_path, no_java):
    from captioning.config import load_config
    from captioning.eval.evaluate import evaluate

    report = evaluate(tiny_run / "best.pt", split="test", out=tmp_path / "eval.json", java=False, progress=False)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in report["predictions"]))
    captions = load_config(tiny_run / "config.yaml", check_paths=False).data.captions
    again = score(preds, captions, split="test", splits_file=tiny_run / "splits.json", java=False)
    # evaluate adds the diversity figures and, on Shapes, its accuracy and the pointing game; the rest is equal
    assert again["metrics"] == {k: v for k, v in report["metrics"].items() if k in again["metrics"]}
    assert {"images", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(again["metrics"])
    assert again["references"] == report["references"]


@pytest.mark.parametrize("command", ["score", "check-data"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
