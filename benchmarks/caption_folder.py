"""Captioning a folder: images read, decoded and preprocessed on worker threads while the model runs, against
the same model on tensors already in memory, side by side in one run.

A folder of generated 500x375 JPEGs (Flickr30k's usual size; noise, so the codec does real work) is
captioned by `Captioner.caption_iter` -- the `caption FOLDER` path -- and, as the bound, the same
images already preprocessed, batch by batch through `Captioner.predict`. Random weights (speed does
not depend on them), captions forced to `--words` words (<eos> pinned to -inf) so both sides decode
the same number of steps. `--model reference` is ResNet-152 + the 6+6-layer d_model 512 transformer;
`--model shapes` the small CPU model of configs/shapes.yaml at 224 px, where reading images weighs
far more against the model.

Last line: caption_folder: images=N throughput_ratio=X folder_img_s=... tensors_img_s=... workers=W

    python benchmarks/caption_folder.py [--images 1000] [--model reference|shapes] [--batch-size 16] [--json PATH]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from captioning import Captioner
from captioning.config import from_dict, load_config, to_dict
from captioning.data.images import expand_inputs
from captioning.data.vocab import SPECIALS, Vocabulary
from captioning.model.caption_model import build_model

ROOT = Path(__file__).resolve().parents[1]


def make_folder(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(sub / f"{i:05d}.jpg", quality=90)
    return expand_inputs([folder])


def build(model_name: str, words: int):
    if model_name == "shapes":
        raw = to_dict(load_config(ROOT / "configs/shapes.yaml", check_paths=False))
        raw["data"]["image_size"] = 224
    else:
        raw = {"model": {"pretrained": False}}
    raw.setdefault("data", {})["max_words"] = words
    cfg = from_dict(raw, check_paths=False)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(7736 - len(SPECIALS))])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab), vocab.pad).eval()
    with torch.no_grad():
        model.head.bias[vocab.eos] = float("-inf")     # every caption `words` words long
    return model, vocab, cfg


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", choices=["reference", "shapes"], default="reference")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--words", type=int, default=20)
    args = parser.parse_args()
    model, vocab, cfg = build(args.model, args.words)
    captioner = Captioner(model, vocab, cfg, device="cpu", precision="auto", own_model=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = make_folder(Path(tmp) / "photos", args.images)
        build_s = time.perf_counter() - start
        tensors = [torch.stack([captioner.transform(Image.open(p).convert("RGB"))
                                for p in paths[i:i + args.batch_size]]) for i in range(0, len(paths), args.batch_size)]
        captioner.predict(images=tensors[0][:2])                       # warm-up
        results = []
        t = common.medians({"tensors": lambda: [captioner.predict(images=x) for x in tensors],
                            "folder": lambda: results.extend(captioner.caption_iter(
                                paths, batch_size=args.batch_size, workers=args.workers))}, 1, warmup=0)
        tensors_s, folder_s = t["tensors"], t["folder"]
    assert len(results) == len(paths) and all(r.ok for r in results)
    n = len(paths)
    env = common.machine(captioner.device, captioner.precision)
    print(f"model {args.model}, precision {captioner.precision}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, {args.words} words, {args.workers} reading threads")
    print(f"built the folder of {n} JPEGs in {build_s:.1f} s (not counted)")
    print(f"tensors in memory:  {tensors_s:7.1f} s  {n / tensors_s:6.2f} images/s")
    print(f"the folder:         {folder_s:7.1f} s  {n / folder_s:6.2f} images/s")
    common.finish("caption_folder", {"images": n, "throughput_ratio": f"{tensors_s / folder_s:.2f}",
                                     "folder_img_s": f"{n / folder_s:.2f}", "tensors_img_s": f"{n / tensors_s:.2f}",
                                     "workers": args.workers, "model": args.model}, env, args.json)


if __name__ == "__main__":
    main()
