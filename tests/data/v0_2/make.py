"""Wrote this folder with the code of the last flat-package version (e4a9ee7): a tiny checkpoint, its export
and their captions. Run from the repo root as `python tests/data/v0_2/make.py` at that version."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))   # the tests folder: conftest.tiny_config
from captioning import Captioner
from captioning.export import export
from captioning.shapes import build_shapes
from captioning.train import fit
from conftest import tiny_config

out, work = Path(__file__).parent, Path(tempfile.mkdtemp())
data = build_shapes(work / "shapes", 48, seed=0, progress=False)
cfg = tiny_config(data, work / "run", "train.epochs=25", "train.lr=3e-3", "model.backbone_stages=1")
run = fit(cfg, progress=False)
shutil.copy(run / "best.pt", out / "best.pt")
export(out / "best.pt", out / "export")
images = [data / "flickr30k_images" / f"{i:06d}.png" for i in range(1, 5)]
modes = {"greedy": {}, "beam3": {"beam_size": 3, "num_captions": 2},
         "sampled": {"temperature": 1.0, "top_k": 5, "seed": 7}, "attention": {"attention": True}}
expected = {}
for name, captioner in (("checkpoint", Captioner.from_checkpoint(out / "best.pt", precision="fp32")),
                        ("export", Captioner.from_export(out / "export"))):
    for mode, opts in modes.items():
        rs = captioner.caption(images, **opts)
        expected[f"{name}/{mode}"] = [{"caption": r.caption, "captions": [c["caption"] for c in r.captions],
                                       "words": r.words} for r in rs]
(out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print(json.dumps(expected)[:1500])
