"""CIDEr-D from token ids equals coco-caption's CIDEr-D caption by caption, when both use the same document
frequencies: the reward of self-critical training must be the metric it is reported with."""
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.data.vocab import Vocabulary
from captioning.train.reward import CiderD

UNK = 3
REFERENCES = {  # image -> token ids of its reference captions
    "a": [[5, 6, 7, 8], [5, 6, 9, 8, 10], [11, 6, 7]],
    "b": [[12, 13, 14], [12, 13, 14, 15, 16], [5, 12, 13]],
    "c": [[17, 18, 19, 20, 21, 22], [17, 18, 19], [23, 19, 20, 21]],
    "d": [[5, 6, 12, 13], [24, 25, 26, 27, 28, 29, 30]],
}
CANDIDATES = {  # repeats, unknown words, empty output, a copy of a reference, a long ramble
    "a": [5, 6, 7, 7, 7, 8], "b": [UNK, 13, 14, UNK], "c": [], "d": [24, 25, 26, 27, 28, 29, 30],
}


def as_text(ids):
    return " ".join(map(str, ids))


def test_per_caption_scores_equal_pycocoevalcap_cider_d():
    gts = {k: [as_text(r) for r in refs] for k, refs in REFERENCES.items()}
    res = {k: [as_text(CANDIDATES[k])] for k in REFERENCES}
    mean, theirs = Cider().compute_score(gts, res)
    cider = CiderD.build(REFERENCES)                   # the same document frequencies: these references'
    keys = list(REFERENCES)
    ours = cider.scores([CANDIDATES[k] for k in keys], keys)
    assert ours == pytest.approx(theirs, abs=1e-6) and ours.mean() == pytest.approx(mean, abs=1e-6)
    assert ours[2] == 0.0 and ours[3] > ours[0] > ours[1] > 0.0       # empty scores 0; a copy scores highest
    assert [cider.score(CANDIDATES[k], REFERENCES[k]) for k in keys] == pytest.approx(list(ours), abs=1e-12)


def test_document_frequencies_round_trip_and_refuse_another_vocabulary(tmp_path):
    vocab = Vocabulary.build(["a red circle", "a blue square"], min_freq=1)
    cider = CiderD.build(REFERENCES)
    cider.save(tmp_path / "cider.json", vocab.fingerprint())
    loaded = CiderD.load(tmp_path / "cider.json", vocab.fingerprint(), REFERENCES)
    keys = list(REFERENCES)
    assert list(loaded.scores([CANDIDATES[k] for k in keys], keys)) == \
        pytest.approx(list(cider.scores([CANDIDATES[k] for k in keys], keys)), abs=1e-12)
    other = Vocabulary.build(["a red circle", "a green square"], min_freq=1)
    with pytest.raises(ValueError, match="another vocabulary"):
        CiderD.load(tmp_path / "cider.json", other.fingerprint())
