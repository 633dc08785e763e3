"""Slow end-to-end checks: the committed Shapes config learns, and reduced precision keeps its captions.

Deselect with `-m "not slow"`; CI runs them.
"""
import json

import pytest

from captioning import Captioner
from captioning.config import load_config
from captioning.data.shapes import accuracy, build_shapes, load_ground_truth
from captioning.train.run import fit

pytestmark = pytest.mark.slow
IMAGES, EPOCHS = 1500, 6
ACCURACY_FLOOR = 0.15   # 7x chance; this run reached 0.307 here (the full demo: 0.943)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """configs/shapes.yaml as committed, on a smaller set for fewer epochs."""
    root = tmp_path_factory.mktemp("e2e")
    data = build_shapes(root / "shapes", IMAGES, seed=1, progress=False)
    cfg = load_config("configs/shapes.yaml", [
        f"data.images={data / 'flickr30k_images'}", f"data.captions={data / 'results.csv'}",
        f"run_dir={root / 'run'}", f"train.epochs={EPOCHS}"])
    run = fit(cfg, progress=False)
    test = json.loads((run / "splits.json").read_text())["test"]
    return run, data, [data / "flickr30k_images" / n for n in test]


def test_learns_shapes(shapes_run):
    run, data, test = shapes_run
    captioner = Captioner.from_checkpoint(run / "best.pt", precision="fp32")
    captions = {p.name: r.caption for p, r in zip(test, captioner.caption(test))}
    acc = accuracy(captions, load_ground_truth(data))
    print(f"held-out Shapes accuracy after {EPOCHS} epochs on {IMAGES * 8 // 10} images: {acc:.3f}")
    # naming 1-3 objects, each with the right one of 6 colours and 3 shapes, by chance: about 2%
    assert acc >= ACCURACY_FLOOR


def test_reduced_precision_keeps_the_captions(shapes_run):
    run, _, test = shapes_run
    fp32 = Captioner.from_checkpoint(run / "best.pt", precision="fp32", engine="torch").caption(test)
    bf16 = Captioner.from_checkpoint(run / "best.pt", precision="bf16", engine="torch").caption(test)
    same = sum(a.caption == b.caption for a, b in zip(fp32, bf16)) / len(test)
    print(f"bf16 captions equal to fp32 on {same:.1%} of {len(test)} held-out images")
    assert same >= 0.95
