"""This repo beside Hugging Face peers: BLIP-base and GIT-base captioning the same random image, 20 tokens each.

Nothing is downloaded: each peer is built from its transformers config class with random weights
(the defaults are the base sizes: BLIP ViT-B/16 at 384 px with a 12-layer BERT decoder, GIT's CLIP
ViT-B/16 at 224 px with a 6-layer decoder), greedy, forced to 20 new tokens (subword tokens for the
peers, words here). Beside them, the reference-size model of benchmarks/decode.py (random weights,
<eos> pinned off, 20 words): the PyTorch path at `precision: auto` and in fp32, and its ONNX Runtime
exports (fp32, int8), through `Captioner.caption`. One image, and a batch of 8, in turns; medians after a warm-up.
Optional: without transformers installed the peers are skipped with a line that says so. Not a test.

Last line: peers: ours_ms=... ort_int8_ms=... blip_ms=... git_ms=... (one image) ours_8_ms=... ...

    python benchmarks/peers.py [--repeats 3] [--exports DIR] [--json PATH]
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common
from captioning import Captioner
from decode import WORDS, photos, reference_model


def peers() -> dict:
    """name -> (model, processor-free pixel size): BLIP-base and GIT-base with random weights."""
    from transformers import BlipConfig, BlipForConditionalGeneration, GitConfig, GitForCausalLM

    torch.manual_seed(0)
    blip = BlipForConditionalGeneration(BlipConfig()).eval()
    git = GitForCausalLM(GitConfig()).eval()
    return {"blip": (blip, BlipConfig().vision_config.image_size), "git": (git, GitConfig().vision_config.image_size)}


@torch.no_grad()
def generate(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.generate(pixel_values=pixels, max_new_tokens=WORDS, min_new_tokens=WORDS, do_sample=False,
                          num_beams=1)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exports", type=Path, help="the reference model's exports (decode.py --exports DIR); "
                                                     "default: made anew in a temporary folder")
    args = parser.parse_args()
    images = photos(8)
    t = {}                                      # key: one image, key_8: the batch of 8, timed in turns
    with tempfile.TemporaryDirectory() as tmp:
        exports = args.exports or Path(tmp)
        if importlib.util.find_spec("onnxruntime") is not None:
            if not all((exports / name / "config.json").is_file() for name in ("fp32", "int8")):
                subprocess.run([sys.executable, str(Path(__file__).with_name("decode.py")), "--export-to",
                                str(exports)], check=True)
            for name in ("fp32", "int8"):
                ort = Captioner.from_export(exports / name)
                t |= common.medians({f"ort_{name}": lambda: ort.caption(images[:1]),
                                     f"ort_{name}_8": lambda: ort.caption(images, batch_size=8)}, args.repeats)
        else:
            print("ONNX Runtime rows skipped: onnxruntime not installed (pip install -e '.[export]')")
    model, vocab, cfg = reference_model()
    for precision in ("fp32", "auto"):
        ours = Captioner(model, vocab, cfg, device="cpu", precision=precision, own_model=precision == "auto")
        key = "ours" if precision == "auto" else "ours_fp32"
        t |= common.medians({key: lambda: ours.caption(images[:1]),
                             key + "_8": lambda: ours.caption(images, batch_size=8)}, args.repeats)
    if importlib.util.find_spec("transformers") is None:
        print("peers skipped: transformers is not installed (pip install transformers)")
    else:
        for name, (peer, size) in peers().items():
            pixels = torch.randn(8, 3, size, size)
            assert generate(peer, pixels[:1]).shape[-1] >= WORDS
            t |= common.medians({name: lambda: generate(peer, pixels[:1]),
                                 name + "_8": lambda: generate(peer, pixels)}, args.repeats)
    env = common.machine("cpu", ours.precision)
    print(f"{torch.get_num_threads()} threads, {WORDS} tokens, ours at auto = {ours.precision}")
    for key in t:
        if not key.endswith("_8"):
            print(f"{key:10s} one image {t[key] * 1e3:8.1f} ms   batch of 8 {t[key + '_8'] * 1e3 / 8:8.1f} ms / image")
    common.finish("peers", {f"{key}_ms": f"{value * 1e3:.0f}" for key, value in t.items()}, env, args.json)


if __name__ == "__main__":
    main()
