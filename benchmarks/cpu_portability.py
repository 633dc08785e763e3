"""Do an export's captions depend on the CPU it runs on? The same exports, captioned here and on an emulated AVX2 CPU.

ONNX Runtime picks its kernels by what the CPU has. Without VNNI (an AVX2-only CPU) its int8 convolutions multiply
uint8 activations by int8 weights with VPMADDUBSW, which adds each pair of products into a saturating int16: 2 * 255 *
127 overflows it, 2 * 255 * 64 does not. So the int8 encoder keeps its weights within -64..64
(`quantize.REDUCE_RANGE`, docs/design.md). This measures what that buys: the checkpoint is exported fp32, int8 with
the fp32 encoder, all int8 (what `--quantize int8` does) and all int8 with full-range weights (REDUCE_RANGE off, the
recipe before), and each export captions a Shapes split greedily twice, on this CPU and under `qemu-x86_64 -cpu
Haswell-v4` (QEMU's user-mode emulator: AVX2 and FMA, no AVX-512, no VNNI, so ONNX Runtime runs its AVX2 kernels; the
emulator computes what they compute, not how fast they are: no speed is measured). `--runner cpuid` runs the AVX2 side
on this CPU with CPUID masked instead (`avx2_only.py`: the same kernels, natively; it needs gcc and a CPU that can make
CPUID fault), which checks that the mask gives ONNX Runtime the kernels the emulated CPU gets.

Last line: cpu_portability: NAME_differ=... (captions that differ between this CPU and the emulated one)
NAME_same_here=... NAME_same_avx2=... (the share equal to the fp32 checkpoint's on each) NAME_memory_diff=...
NAME_memory_cosine=... (the encoder graph's memory of the first 64 images on the two CPUs: the largest difference,
the lowest cosine), for NAME in fp32, int8, all_int8, all_int8_full_range; emulated=... (the emulated CPU's vector
units, as numpy saw them; it must have AVX2 and neither AVX-512 nor VNNI) runner=qemu|cpuid qemu=... (QEMU's
version, with the qemu runner)

    apt-get install qemu-user        # Debian and Ubuntu: qemu-x86_64
    python benchmarks/cpu_portability.py --checkpoint runs/shapes/best.pt --data data/shapes [--split test]
        [--cpu Haswell-v4] [--runner qemu|cpuid] [--json PATH]
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from avx2_only import check_units, environment

EXPORTS = {"fp32": (None, None, True), "int8": ("int8", "fp32", True), "all_int8": ("int8", "int8", True),
           "all_int8_full_range": ("int8", "int8", False)}     # name: quantize, encoder, REDUCE_RANGE
MEMORY_IMAGES = 64


def vector_units() -> str:
    """The CPU's vector units as numpy's dispatcher sees them (under the emulator: the emulated CPU's)."""
    from captioning.decode.onnx_engine import cpu_features

    features = cpu_features()
    units = ("AVX2", "FMA3", "AVX512F", "AVX512VNNI", "AVX512BF16", "AVXVNNI")
    return "+".join(k.lower() for k in units if features.get(k)) or "none"


def caption_child(export: Path, images: Path, out: Path) -> None:
    """--child: greedy captions of the images listed in `images` (one path a line) by `export`, as JSON in `out`,
    and the memory of the first MEMORY_IMAGES beside it (.npy)."""
    import numpy as np

    from captioning import Captioner

    paths = images.read_text().splitlines()
    captioner = Captioner.from_export(export)
    results = captioner.caption(paths, batch_size=32)
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} images failed, e.g. {bad[0]}")
    np.save(out.with_suffix(".npy"), captioner.encode([captioner._open(p) for p in paths[:MEMORY_IMAGES]]))
    out.write_text(json.dumps({"units": vector_units(), "captions": [r.caption for r in results]}))


def compare_memory(a, b) -> tuple[float, float]:
    """The largest difference and the lowest cosine, image by image, of two memories (B, L, D)."""
    import numpy as np

    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(np.abs(a - b).max()), float(cosine.min())


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return caption_child(*map(Path, sys.argv[2:5]))
    import numpy as np

    import common
    from captioning import Captioner
    from captioning.data.shapes import accuracy, load_ground_truth
    from captioning.decode import quantize
    from captioning.decode.export import export

    parser = common.parser(__doc__)
    parser.add_argument("--checkpoint", default="runs/shapes/best.pt")
    parser.add_argument("--data", default="data/shapes", help="the Shapes data set the checkpoint was trained on")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--cpu", default="Haswell-v4", help="the CPU QEMU emulates (qemu-x86_64 -cpu help lists them)")
    parser.add_argument("--runner", default="qemu", choices=["qemu", "cpuid"],
                        help="the AVX2 side: QEMU's emulator, or this CPU with CPUID masked (avx2_only.py)")
    args = parser.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if args.runner == "qemu" and qemu is None:
        raise SystemExit("cpu_portability: qemu-x86_64 not found: apt-get install qemu-user (Debian, Ubuntu), "
                         "or --runner cpuid")
    avx2 = ([qemu, "-cpu", args.cpu], None) if args.runner == "qemu" else ([], environment())
    checkpoint = Path(args.checkpoint)
    names = json.loads((checkpoint.parent / "splits.json").read_text())[args.split]
    paths = [Path(args.data) / "flickr30k_images" / n for n in names]
    truth = load_ground_truth(args.data)
    env = common.machine("cpu", "fp32")
    reference = [r.caption for r in Captioner.from_checkpoint(checkpoint, precision="fp32", engine="torch")
                 .caption(paths, batch_size=32)]

    figures, units = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(map(str, paths)))
        for name, (quantize_to, encoder, reduce_range) in EXPORTS.items():
            quantize.REDUCE_RANGE = reduce_range
            export(checkpoint, Path(tmp) / name, quantize_to, encoder=encoder)
            captions = {}
            for where, (prefix, child_env) in (("here", ([], None)), ("avx2", avx2)):
                start, out = time.perf_counter(), Path(tmp) / f"{name}-{where}.json"
                child = subprocess.run([*prefix, sys.executable, __file__, "--child", Path(tmp) / name, listing, out],
                                       capture_output=True, text=True, env=child_env)
                if child.returncode:
                    raise SystemExit(f"cpu_portability: captioning with {name} {where} failed: "
                                     f"{child.stderr.strip()[-2000:]}")
                result = json.loads(out.read_text())
                captions[where], units[where] = result["captions"], result["units"]
                if where == "avx2":
                    check_units(units[where], "cpu_portability: the CPUID mask" if args.runner == "cpuid" else
                                f"cpu_portability: QEMU's {args.cpu} (7.2 or later emulates AVX2; or another --cpu)")
                same = sum(a == b for a, b in zip(captions[where], reference)) / len(paths)
                acc = accuracy(dict(zip(names, captions[where])), truth)
                print(f"{name:20s} {where}: same as the checkpoint {same:7.2%}, accuracy {acc:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                figures[f"{name}_same_{where}"] = f"{same:.4f}"
            differ = [n for n, a, b in zip(names, captions["here"], captions["avx2"]) if a != b]
            figures[f"{name}_differ"] = len(differ)
            diff, cosine = compare_memory(*(np.load(Path(tmp) / f"{name}-{w}.npy") for w in ("here", "avx2")))
            figures[f"{name}_memory_diff"], figures[f"{name}_memory_cosine"] = f"{diff:.2g}", f"{cosine:.6f}"
            print(f"  memory of {MEMORY_IMAGES} images, here against avx2: largest difference {diff:.2g}, "
                  f"lowest cosine {cosine:.6f}; {len(differ)} captions differ")
            for n in differ[:5]:
                i = names.index(n)
                print(f"  {n}: here {captions['here'][i]!r}, avx2 {captions['avx2'][i]!r}")
    print(f"{len(paths)} {args.split} images; this CPU: {units['here']}; "
          f"the AVX2 side ({args.runner}): {units['avx2']}")
    order = [f"{name}_{kind}" for name in EXPORTS
             for kind in ("differ", "same_here", "same_avx2", "memory_diff", "memory_cosine")]
    runner = {"runner": args.runner}
    if args.runner == "qemu":
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split()
        runner["qemu"] = version[2] if len(version) > 2 else "?"
    common.finish("cpu_portability", {**{key: figures[key] for key in order}, "images": len(paths),
                                      "emulated": units["avx2"], **runner}, env, args.json)


if __name__ == "__main__":
    main()
