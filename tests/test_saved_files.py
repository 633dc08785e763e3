"""Files written by earlier versions keep loading and captioning the same: `tests/data/v0_2` holds a checkpoint
and its export written by the code before the package was split into subpackages, and the captions that code
gave (tests/data/v0_2/make.py wrote all three)."""
import json
from pathlib import Path

import pytest

from captioning import Captioner
from captioning.data.shapes import build_shapes

SAVED = Path(__file__).parent / "data" / "v0_2"
MODES = {"greedy": {}, "beam3": {"beam_size": 3, "num_captions": 2},
         "sampled": {"temperature": 1.0, "top_k": 5, "seed": 7}, "attention": {"attention": True}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = build_shapes(tmp_path_factory.mktemp("shapes"), 48, seed=0, progress=False)  # the images make.py used
    return [data / "flickr30k_images" / f"{i:06d}.png" for i in range(1, 5)]


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint_onnx", "export"])
@pytest.mark.parametrize("mode", MODES)
def test_a_saved_checkpoint_and_export_caption_as_they_did(images, source, mode, tmp_path):
    """checkpoint: on PyTorch; checkpoint_onnx: engine auto's export of it (cached in tmp_path), the same captions."""
    expected = json.loads((SAVED / "expected.json").read_text())[f"{source.split('_')[0]}/{mode}"]
    if source == "export":
        captioner = Captioner.from_export(SAVED / "export")
    else:
        captioner = Captioner.from_checkpoint(SAVED / "best.pt", precision="fp32", cache_dir=tmp_path,
                                              engine="torch" if source == "checkpoint" else "onnx")
        assert (captioner.model is None) == (source == "checkpoint_onnx")
    results = captioner.caption(images, **MODES[mode])
    got = [{"caption": r.caption, "captions": [c["caption"] for c in r.captions], "words": r.words} for r in results]
    assert got == expected
    assert len({r["caption"] for r in expected}) > 1 or mode == "sampled"     # the model tells the images apart
