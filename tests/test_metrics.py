"""Corpus caption metrics: the same numbers as pycocoevalcap called directly, with and without Java."""
import os
import threading
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioning.eval.metrics import METRICS, java_available, score_captions, tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="`java -version` does not run: no Java installed")

REFERENCES = {
    "img1": ["A dog runs across the grass.", "A brown dog's running on a lawn.", "The dog is playing outside.",
             "a dog running in a park"],
    "img2": ["Two men, wearing hats, talk on a street.", "Men in hats are talking.", "Two people chat outside.",
             "Two men don't stop talking!", "A pair of men in the U.S. talk."],
    "img3": ["A child's red ball lies on the well-kept grass.", "A red ball on grass.", "A ball -- red -- on a lawn."],
    "img4": ['A sign that reads "STOP" near a road.', "A stop sign by the road.", "The sign says 'stop'.",
             "A red sign at an intersection."],
    "img5": ["A woman (left) holds an umbrella.", "A woman with an umbrella in the rain.",
             "It's raining; a woman's holding an umbrella.", "A lady under an umbrella..."],
    "img6": ["A cat sleeps on a sofa.", "The cat isn't awake.", "A grey cat naps on a couch.",
             "Cat asleep on the sofa"],
    "img7": ["Kids play soccer at 3:30 p.m.", "Children playing football on a field.",
             "A group of kids kick a ball.", "Boys and girls play soccer."],
    "img8": ["A man rides a bike down a hill.", "A cyclist goes downhill.", "Someone cycling on a steep road."],
}
PREDICTIONS = {
    "img1": "A dog is running on the grass.",
    "img2": "Two men in hats are talking.",            # exactly one of its references
    "img3": "a red ball on the grass",
    "img4": "",                                          # empty
    "img5": "A woman holding an umbrella.",
    "img6": "A cat is sleeping on a couch.",
    "img7": "Children playing soccer on a field.",
    "img8": "A man riding a bicycle.",
}


def meteor_children() -> list[int]:
    """Pids of METEOR JVMs this test process started and that are still running."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"meteor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def coco_eval(predictions, references):
    """What coco-caption's COCOEvalCap.evaluate() does, written out (without SPICE)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    out = dict(zip(("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    meteor = Meteor()
    try:
        out["METEOR"] = meteor.compute_score(gts, res)[0]
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        meteor.lock = threading.Lock()
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@needs_java
def test_java_scores_equal_coco_caption():
    scores, notes = score_captions(PREDICTIONS, REFERENCES)
    assert meteor_children() == []          # our METEOR JVM is gone once the call returns
    assert notes == []
    expected = coco_eval(PREDICTIONS, REFERENCES)
    assert list(scores) == list(METRICS)
    for metric in METRICS:
        assert isinstance(scores[metric], float)
        assert scores[metric] == pytest.approx(expected[metric], abs=1e-9), metric
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and 0 < scores["METEOR"] < 1 and 0 < scores["CIDEr"] < 10


def test_cider_is_corpus_level():
    first, second = list(PREDICTIONS)[:4], list(PREDICTIONS)[4:]
    whole = score_captions(PREDICTIONS, REFERENCES, ("CIDEr",), java=False)[0]["CIDEr"]
    halves = [score_captions({i: PREDICTIONS[i] for i in half}, REFERENCES, ("CIDEr",), java=False)[0]["CIDEr"]
              for half in (first, second)]
    assert abs(whole - sum(halves) / 2) > 1e-3     # df (and idf) come from the references scored together
    gts = tokenize({i: REFERENCES[i] for i in PREDICTIONS}, java=False)
    res = tokenize({i: [c] for i, c in PREDICTIONS.items()}, java=False)
    assert whole == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_without_java_meteor_is_none_and_noted():
    scores, notes = score_captions(PREDICTIONS, REFERENCES, java=False)
    assert scores["METEOR"] is None
    assert any("METEOR" in n and "Java" in n for n in notes)
    assert any("pure-Python" in n for n in notes)
    assert all(isinstance(scores[m], float) for m in METRICS if m != "METEOR")
    assert 0 < scores["BLEU-4"] < 1 and 0 < scores["ROUGE-L"] < 1 and scores["CIDEr"] > 0
    only_cider, notes = score_captions(PREDICTIONS, REFERENCES, ("CIDEr",), java=False)
    assert list(only_cider) == ["CIDEr"] and not any("METEOR" in n for n in notes)


def test_no_java_installed(monkeypatch):
    monkeypatch.setattr("captioning.eval.metrics.java_available", lambda: False)
    scores, notes = score_captions(PREDICTIONS, REFERENCES)
    assert scores["METEOR"] is None and any("Java is not available" in n for n in notes)
    with pytest.raises(RuntimeError, match="java=True"):
        score_captions(PREDICTIONS, REFERENCES, java=True)


def test_python_tokenizer():
    captions = {"a": ["A dog's ball, isn't it?", "", "Two men -- \"running\" (fast) in a well-lit park... OK!"],
                "b": ["I can't; we won't. Mr. Smith's U.S. flag at 3:30 p.m.", "The kids' 'new' toys, etc."]}
    assert tokenize(captions, java=False) == {
        "a": ["a dog 's ball is n't it", "", "two men running -lrb- fast -rrb- in a well-lit park ok"],
        "b": ["i ca n't we wo n't mr. smith 's u.s. flag at 3:30 p.m.", "the kids new toys etc."]}


@needs_java
def test_python_tokenizer_equals_java_on_captions():
    captions = {image: refs + [PREDICTIONS[image]] for image, refs in REFERENCES.items()}
    captions["extra"] = ["Cannot stop, gonna go!", "A man's T-shirt reads “Hello”.", "Dr. Who's box—blue…",
                         "the dogs'. a 12-year-old boy", "A $5 bill & 50% off [sale]", "He said 'hi' - then left."]
    assert tokenize(captions, java=False) == tokenize(captions, java=True)
    # pycocoevalcap alone would put "runs" on image b and "a cat" on image c
    assert tokenize({"a": ["a dog\rruns"], "b": ["a cat"], "c": ["a cow"]}, java=True) == \
        {"a": ["a dog runs"], "b": ["a cat"], "c": ["a cow"]}


def test_perfect_predictions():
    references = {f"img{i}": [refs[0]] for i, refs in enumerate(REFERENCES.values())}
    predictions = {image: refs[0] for image, refs in references.items()}
    scores, _ = score_captions(predictions, references, ("BLEU-4", "ROUGE-L", "CIDEr"), java=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0)      # CIDEr-D of an exact single-reference match


def test_empty_predictions_do_not_crash():
    scores, _ = score_captions({"img1": "", "img2": ""}, REFERENCES, ("BLEU-4", "ROUGE-L", "CIDEr"), java=False)
    assert scores == {"BLEU-4": pytest.approx(0.0, abs=1e-6), "ROUGE-L": 0.0, "CIDEr": 0.0}


@pytest.mark.parametrize("predictions, references, metrics, match", [
    ({"img1": "a dog"}, {"img1": []}, METRICS, "img1"),
    ({"img1": "a dog", "ghost": "a cat"}, REFERENCES, METRICS, "ghost"),
    ({}, REFERENCES, METRICS, "empty"),
    ({"img1": "a dog"}, REFERENCES, ("BLEU-4", "SPICE"), "SPICE.*BLEU-1, BLEU-2.*CIDEr"),
    ({"img1": "a dog"}, {"img1": "a dog runs"}, METRICS, "img1"),
])
def test_validation_errors_name_the_bad_input(predictions, references, metrics, match):
    with pytest.raises(ValueError, match=match):
        score_captions(predictions, references, metrics, java=False)
