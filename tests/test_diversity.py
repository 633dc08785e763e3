"""The diversity figures and the Shapes pointing game that `evaluate` reports beside the coco-caption metrics."""
import json

import numpy as np
import pytest

from captioning.data.shapes import pointing_game
from captioning.eval.diversity import copied_share, distinct_n, diversity, mbleu4, vocabulary


def test_distinct_n_vocabulary_and_copies():
    captions = ["a red circle", "a red circle", "a blue square"]
    assert distinct_n(captions, 1) == pytest.approx(5 / 9) and distinct_n(captions, 2) == pytest.approx(4 / 6)
    assert distinct_n([], 1) == 0.0 and vocabulary(captions) == 5
    assert copied_share(captions, ["A red circle .", "a green square"]) == pytest.approx(2 / 3)


def test_mbleu4_is_one_for_identical_captions_and_low_for_different_ones():
    same = "a large red circle to the left of a small blue square"
    assert mbleu4([[same, same, same]]) == pytest.approx(1.0, abs=1e-6)
    assert mbleu4([["a large red circle above a small blue square", "two shapes on a dark background"]]) < 0.1
    assert mbleu4([["only one"]]) is None
    assert "mBLEU-4" not in diversity(["a b"], [], [["a b"]]) and "mBLEU-4" in diversity(["a b"], [], [["a", "b"]])


def test_pointing_game_hits_where_the_peak_is_inside_the_named_objects_box():
    objects = [{"color": "red", "shape": "circle", "size": "small", "x": 0.2, "y": 0.2},
               {"color": "blue", "shape": "square", "size": "small", "x": 0.8, "y": 0.8}]
    on_red, on_blue = np.zeros((4, 4)), np.zeros((4, 4))
    on_red[0, 0], on_blue[3, 3] = 1.0, 1.0                    # cell centres (0.125, 0.125) and (0.875, 0.875)
    words = ["a", "red", "circle", "blue", "triangle"]
    points = pointing_game(words, [on_red, on_red, on_blue, on_red, on_red], objects)
    # "a" and "triangle" name nothing drawn; "red" looks at the red circle, "circle" and "blue" look elsewhere
    assert [hit for hit, _ in points] == [True, False, False]
    assert all(chance == pytest.approx(1 / 16) for _, chance in points)   # each small box covers one cell centre


@pytest.mark.slow
def test_evaluate_reports_diversity_pointing_and_mbleu(tiny_run, tmp_path):
    from captioning.eval.evaluate import evaluate
    report = evaluate(tiny_run / "best.pt", precision="fp32", progress=False, java=False, beam_size=3,
                      num_captions=3, out=tmp_path / "r.json")
    metrics = report["metrics"]
    for key in ("distinct_1", "distinct_2", "vocabulary", "copied_share", "mBLEU-4", "pointing_accuracy",
                "pointing_chance", "shapes_accuracy"):
        assert key in metrics, key
    assert 0 <= metrics["pointing_chance"] < 1 and metrics["pointing_words"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == pytest.approx(metrics)
