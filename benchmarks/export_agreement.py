"""Do the ONNX exports keep the checkpoint's captions? Greedy captions of a Shapes split, side by side in one run.

The checkpoint is exported three times (fp32; int8 decoder weights with the fp32 encoder, `--encoder
fp32`; all int8, the encoder calibrated on the run's training images, what `--quantize int8` does) into
a temporary folder; the split's images are captioned greedily by the checkpoint on PyTorch (fp32, and
at `precision: auto`) and by each export through the same `Captioner.caption`. Measured: the share of
images whose caption equals the fp32 checkpoint's, and the Shapes accuracy of each (the caption names every object with
the right colour and shape, and nothing else).

How close each caption was to another: along the fp32 checkpoint's greedy path, the smallest gap between the two best
words' log-probabilities (0.01: their probabilities within 1% of each other). A caption an export changes is listed
with its gap and its rank among the split's (1: the closest call); `near_ties` counts the captions with a gap under
0.01, and `<export>_changed_near_ties` how many of an export's changed captions are among them.

Last line: export_agreement: fp32_same=X int8_same=Y all_int8_same=Z accuracy_checkpoint=A accuracy_fp32=B
accuracy_int8=C accuracy_all_int8=D ... near_ties=N int8_changed_near_ties=... all_int8_changed_near_ties=...
(int8: the fp32 encoder; all_int8: the int8 encoder too)

    python benchmarks/export_agreement.py --checkpoint runs/shapes/best.pt --data data/shapes [--split test]
        (--split train: the training images less the ones the int8 encoder is calibrated on)
        [--int8-block 128] [--shortlist 16]      (another int8 recipe than export.py's, to compare)
        [--calibration-images 256] [--calibration-method minmax] [--weight-bits 7]   (... and encoder recipe)
        [--json PATH]
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from captioning import Captioner
from captioning.data.shapes import accuracy, load_ground_truth
from captioning.decode import export as export_module
from captioning.decode import quantize as recipe
from captioning.decode.export import export
from captioning.model.checkpoint import load_checkpoint


def caption_all(captioner: Captioner, paths: list[Path]) -> tuple[dict[str, str], float]:
    """name -> greedy caption, and the seconds it took."""
    start = time.perf_counter()
    results = captioner.caption(paths, batch_size=32)
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} images failed, e.g. {bad[0]}")
    return {p.name: r.caption for p, r in zip(paths, results)}, time.perf_counter() - start


NEAR_TIE = 0.01     # log-probability gap between the two best words


def closest_calls(captioner: Captioner, paths: list[Path]) -> dict[str, float]:
    """name -> the smallest gap between the two best words' log-probabilities along the greedy path
    (each step up to and with <eos>), one image at a time through the captioner's engine. Words the
    search never picks (<pad>, <bos>) are not counted as the second best."""
    engine, gaps = captioner.engine, []
    step, never = engine.step, [captioner.vocab.pad, captioner.vocab.bos]

    def recording(cache, tokens, attention=None):
        out = step(cache, tokens, attention)
        row = np.array(out.float().cpu() if hasattr(out, "cpu") else out, dtype=np.float64)[0]  # one image
        row[never] = -np.inf
        best = np.sort(row)[-2:]                    # the gap of logits is that of log-probabilities
        gaps.append(float(best[1] - best[0]))
        return out

    engine.step = recording
    try:
        closest = {}
        for path in paths:
            gaps.clear()
            words = captioner.caption([path], batch_size=1)[0].caption.split()
            closest[path.name] = min(gaps[:len(words) + 1])
        return closest
    finally:
        del engine.step


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--checkpoint", default="runs/shapes/best.pt")
    parser.add_argument("--data", default="data/shapes", help="the Shapes data set the checkpoint was trained on")
    parser.add_argument("--splits", help="the run's splits.json (default: beside the checkpoint)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--int8-block", type=int, default=export_module.INT8_BLOCK,
                        help="another int8 recipe: input rows per weight scale")
    parser.add_argument("--shortlist", type=int, default=export_module.SHORTLIST,
                        help="another int8 recipe: words rescored in fp32 per step (0: none)")
    parser.add_argument("--calibration-images", type=int, default=recipe.CALIBRATION_IMAGES,
                        help="another int8 encoder recipe: training images its ranges come from")
    parser.add_argument("--calibration-method", default=recipe.CALIBRATION_METHOD, choices=sorted(recipe.METHODS),
                        help="another int8 encoder recipe: how the ranges are found")
    parser.add_argument("--weight-bits", type=int, default=7 if recipe.REDUCE_RANGE else 8, choices=[7, 8],
                        help="another int8 encoder recipe: 7: weights within -64..64, 8: the full int8 range")
    args = parser.parse_args()
    export_module.INT8_BLOCK, export_module.SHORTLIST = args.int8_block, args.shortlist
    recipe.CALIBRATION_IMAGES, recipe.CALIBRATION_METHOD = args.calibration_images, args.calibration_method
    recipe.REDUCE_RANGE = args.weight_bits == 7
    checkpoint = Path(args.checkpoint)
    names = json.loads(Path(args.splits or checkpoint.parent / "splits.json").read_text())[args.split]
    if args.split == "train":       # less the images the int8 encoder is calibrated on
        calibrated = {p.name for p in recipe.calibration_images(load_checkpoint(checkpoint)[2], checkpoint)}
        names = [n for n in names if n not in calibrated]
    paths = [Path(args.data) / "flickr30k_images" / n for n in names]
    truth = load_ground_truth(args.data)

    captions, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantize, encoder in (("fp32", None, None), ("int8", "int8", "fp32"), ("all_int8", "int8", "int8")):
            start = time.perf_counter()
            meta = export(checkpoint, Path(tmp) / name, quantize, encoder=encoder)
            print(f"export {name}: {time.perf_counter() - start:.1f} s, check "
                  f"{json.dumps(meta['check'][quantize or 'fp32'])}")
        captioners = {"checkpoint_fp32": Captioner.from_checkpoint(checkpoint, precision="fp32", engine="torch"),
                      "checkpoint_auto": Captioner.from_checkpoint(checkpoint, precision="auto", engine="torch"),
                      **{f"onnx_{name}": Captioner.from_export(Path(tmp) / name)
                         for name in ("fp32", "int8", "all_int8")}}
        for name, captioner in captioners.items():
            captions[name], seconds[name] = caption_all(captioner, paths)
    auto = captioners["checkpoint_auto"].precision
    env = common.machine("cpu", auto)
    reference = captions["checkpoint_fp32"]
    same = {name: sum(c[n] == reference[n] for n in reference) / len(reference) for name, c in captions.items()}
    acc = {name: accuracy(c, truth) for name, c in captions.items()}
    print(f"{len(paths)} {args.split} images of {args.data}; checkpoint {checkpoint} (auto = {auto})")
    for name in captions:
        print(f"{name:16s} same as checkpoint fp32: {same[name]:7.2%}  accuracy {acc[name]:.4f}  "
              f"{seconds[name]:6.1f} s")
    gap = closest_calls(captioners["checkpoint_fp32"], paths)
    rank = {n: i + 1 for i, n in enumerate(sorted(gap, key=gap.get))}
    near = {n for n in gap if gap[n] < NEAR_TIE}
    print(f"near ties (the two best words within {NEAR_TIE} in log-probability somewhere on the greedy path): "
          f"{len(near)} of {len(gap)}")
    changed_near = {}
    for name in ("checkpoint_auto", "onnx_fp32", "onnx_int8", "onnx_all_int8"):
        changed = [n for n in reference if captions[name][n] != reference[n]]
        changed_near[name] = len(near.intersection(changed))
        for n in sorted(changed, key=rank.get):
            print(f"  {name} {n} (gap {gap[n]:.3f}, closest call {rank[n]} of {len(gap)}): "
                  f"{reference[n]!r} -> {captions[name][n]!r}")
    common.finish("export_agreement", {
        "fp32_same": f"{same['onnx_fp32']:.4f}", "int8_same": f"{same['onnx_int8']:.4f}",
        "all_int8_same": f"{same['onnx_all_int8']:.4f}",
        "accuracy_checkpoint": f"{acc['checkpoint_fp32']:.4f}", "accuracy_fp32": f"{acc['onnx_fp32']:.4f}",
        "accuracy_int8": f"{acc['onnx_int8']:.4f}", "accuracy_all_int8": f"{acc['onnx_all_int8']:.4f}",
        f"checkpoint_{auto}_same": f"{same['checkpoint_auto']:.4f}",
        f"accuracy_checkpoint_{auto}": f"{acc['checkpoint_auto']:.4f}", "images": len(paths),
        "int8_block": args.int8_block, "shortlist": args.shortlist, "calibration_images": args.calibration_images,
        "calibration_method": args.calibration_method, "weight_bits": args.weight_bits, "near_ties": len(near),
        f"checkpoint_{auto}_changed_near_ties": changed_near["checkpoint_auto"],
        "int8_changed_near_ties": changed_near["onnx_int8"],
        "all_int8_changed_near_ties": changed_near["onnx_all_int8"]}, env, args.json)


if __name__ == "__main__":
    main()
