"""Captioning speed: the reference design's per-word re-run against ours, side by side in one run.

The reference-size model (ResNet-152 at 224 px, d_model 512, 6+6 layers, 7,736 words) with random
weights -- speed does not depend on them -- and captions forced to 20 words (the <eos> logit is
pinned to -inf, so the real `Captioner.caption` path runs all 20 steps). Measured:

- reference: what the reference design did for each generated word: ResNet-152 and the whole
  transformer over the prefix so far, fp32, one image;
- ours: `Captioner.caption([image])` at the default precision (image preprocessing included);
- encoder: the bare ResNet-152 forward at that same precision, batch 1;
- batch 32: ours against the bare encoder, images per second;
- peak RSS of the process through the reference and our captioning (the bare batch-32 forward,
  which holds all 32 images' activations at once, comes after and is printed on its own).

- the decoding options (attention maps, sampling, n-gram blocking and a minimum length, and beam
  search with 3 best + attention + blocking), each against plain decoding at the same beam size.

What is compared is timed in turns, round after round (ours, its encoder and batch 32; plain decoding
and its options; beam 3 and its options): medians of --repeats rounds after a warm-up round.

- ONNX Runtime (CPU, with the [export] extra): the same model exported (`export.export_model`, in a
  process of its own) in fp32, with int8 decoder weights and the fp32 encoder (`--encoder fp32`), and
  all int8 (the encoder's ResNet quantized statically, what `--quantize int8` does; calibrated on 64
  seeded random-noise photos, other than the timed ones: speed does not depend on the ranges),
  through `Captioner.from_export`: one image, batch 32, and each bare encoder graph (images -> memory:
  the ResNet and the transformer encoder, as the export has them) at batch 1 and 32, beside today's
  PyTorch path in fp32 (the default where the CPU has no bf16) and at `precision: auto`, all timed in
  turns, round after round, in another process; with the cosine similarity of the all-int8 encoder
  graph's memory to the fp32 one's over the 32 timed photos (the lowest). The int8 exports' peak RSS
  is measured in a process of its own that only captions (1 image, then 32; caption_rss.py), which
  imports no torch.

Last line: decode: speedup_vs_reference=X overhead_vs_encoder=Y batch_efficiency=Z rss_mb=W
attention_overhead=... sampling_overhead=... controls_overhead=... beam_options_overhead=...
ort_speedup_vs_torch=S ort_overhead_vs_encoder=O ort_batch_efficiency=E ort_rss_mb=R ...
ort_int8_encoder_speedup=... all_int8_ms=... all_int8_speedup_vs_int8=... all_int8_batch_efficiency=...
(ort_speedup_vs_torch: PyTorch fp32 over ONNX Runtime int8 with the fp32 encoder, one image;
ort_overhead_vs_encoder: that over its own bare encoder graph, one image; ort_speedup_vs_auto: the
PyTorch path at `precision: auto` over it; ort_int8_encoder_speedup: the fp32 encoder graph over the
int8 one, one image; all_int8_ms: one image captioned by the all-int8 export; all_int8_speedup_vs_int8:
the int8 export with the fp32 encoder over the all-int8 one, one image; all_int8_batch_efficiency: the
all-int8 bare encoder graph's images/s at batch 32 over the all-int8 export's.)

    python benchmarks/decode.py [--repeats 3] [--device cpu|cuda] [--no-onnx] [--exports DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from captioning import Captioner
from captioning.config import from_dict
from captioning.data.dataset import build_transform
from captioning.data.vocab import SPECIALS, Vocabulary
from captioning.model.caption_model import build_model

WORDS = 20


@torch.no_grad()
def reference_caption(model, image: torch.Tensor, bos: int, words: int) -> list[int]:
    """The reference design's decoding: every word re-runs the ResNet and the whole transformer."""
    tokens = torch.full((1, 1), bos, dtype=torch.long, device=image.device)
    for _ in range(words):
        logits = model(tokens, images=image)[:, -1]           # (1, V): encoder, transformer encoder, decoder: all again
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, 1:].tolist()


def reference_model():
    """The reference-size model with random weights (seeded: every process builds the same), <eos> pinned to -inf."""
    torch.manual_seed(0)
    cfg = from_dict({"model": {"pretrained": False, "max_tokens": 64}, "data": {"max_words": WORDS}}, check_paths=False)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(7736 - len(SPECIALS))])
    model = build_model(cfg.model, len(vocab), vocab.pad).eval()
    with torch.no_grad():
        model.head.bias[vocab.eos] = float("-inf")     # force every caption to WORDS words
    return model, vocab, cfg


def photos(n: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(n)]


EXPORTS = ("fp32", "int8", "all_int8")      # int8: the fp32 encoder; all_int8: the int8 encoder too


def export_all(folder: Path) -> None:
    """--export-to: the reference model exported into folder/fp32, folder/int8 (the encoder fp32) and
    folder/all_int8 (calibrated on 64 noise photos of another seed than the timed ones)."""
    from captioning.decode.export import export_model

    model, vocab, cfg = reference_model()
    folder.mkdir(parents=True, exist_ok=True)
    calibration = folder / "calibration"
    calibration.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(calibration / f"{i:02d}.png")
    for name in EXPORTS:
        if (folder / name / "config.json").is_file():
            continue
        quantize = None if name == "fp32" else "int8"
        start = time.perf_counter()
        meta = export_model(model, vocab, cfg, folder / name, quantize, "benchmarks/decode.py",
                            calibration=sorted(calibration.iterdir()) if name == "all_int8" else None)
        print(f"export {name}: {time.perf_counter() - start:.0f} s, check "
              f"{json.dumps(meta['check'][quantize or 'fp32'])}", flush=True)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--exports", type=Path, help="keep the two exports in this folder (made there when missing, "
                                                     "reused when there)")
    parser.add_argument("--export-to", type=Path, help=argparse.SUPPRESS)    # the child processes' jobs
    parser.add_argument("--compare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_to or args.compare:
        return export_all(args.export_to) if args.export_to else compare_engines(args.compare, args.repeats)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    onnx = not args.no_onnx and device.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None
    if not onnx:
        print("ONNX Runtime rows skipped: " + ("--no-onnx" if args.no_onnx else "not on the CPU"
              if device.type != "cpu" else "onnxruntime not installed (pip install -e '.[export]')"))
    with tempfile.TemporaryDirectory() as tmp:
        exports = args.exports or Path(tmp)
        if onnx and not all((exports / name / "config.json").is_file() for name in EXPORTS):
            # first, in a process of its own: tracing ResNet-152 would count in this one's peak RSS
            subprocess.run([sys.executable, __file__, "--export-to", str(exports)], check=True)
        measure(args, device, sync, exports if onnx else None)


def measure(args, device: torch.device, sync, exports: Path | None) -> None:
    model, vocab, cfg = reference_model()
    photos32, repeats = photos(), args.repeats
    one = photos32[:1]

    # the reference first, in fp32 (the model as built), then from_checkpoint's path at fp32 (the model prepared in
    # place: column-major linear weights), then at `precision: auto` (cast once for it)
    model.to(device)
    x1 = build_transform(cfg.data.image_size)(photos32[0])[None].to(device)
    t = common.medians({"reference": lambda: reference_caption(model, x1, vocab.bos, WORDS)}, max(1, repeats // 2),
                       sync=sync)
    torch_fp32 = Captioner(model, vocab, cfg, device=device, precision="fp32", own_model=True)
    t |= common.medians({"torch_fp32": lambda: torch_fp32.caption(one)}, repeats, sync=sync)
    captioner = Captioner(model, vocab, cfg, device=device, precision="auto", own_model=True)
    assert len(captioner.caption(one)[0].caption.split()) == WORDS

    x32 = torch.stack([captioner.transform(p) for p in photos32]).to(device)
    t |= common.medians({"ours": lambda: captioner.caption(one),
                         "encoder": lambda: captioner.features(x1),           # the Captioner's own encoder call
                         "ours32": lambda: captioner.caption(photos32, batch_size=32)}, repeats, sync=sync)
    # the decoding options, each in turns with plain decoding at the same beam size
    t |= common.medians({"plain": lambda: captioner.caption(one),
                         "attention": lambda: captioner.caption(one, attention=True),
                         "sampling": lambda: captioner.caption(one, temperature=1.0, top_k=50, top_p=0.9, seed=0),
                         "controls": lambda: captioner.caption(one, no_repeat_ngram_size=3, min_words=5)},
                        repeats, sync=sync)
    t |= common.medians({"beam": lambda: captioner.caption(one, beam_size=3),
                         "beam_all": lambda: captioner.caption(one, beam_size=3, num_captions=3, attention=True,
                                                               no_repeat_ngram_size=3)}, repeats, sync=sync)
    rss_mb = common.peak_rss_mb()                   # the reference and ours, before the bare batch-32 forward
    t |= common.medians({"encoder32": lambda: captioner.features(x32)}, repeats, sync=sync)

    env = common.machine(device, captioner.precision)
    print(f"device {device}, precision {captioner.precision}, {torch.get_num_threads()} threads, {WORDS} words")
    print(f"reference (fp32, re-run per word): {t['reference'] * 1e3:8.1f} ms / image")
    print(f"ours, one image:                   {t['ours'] * 1e3:8.1f} ms / image")
    print(f"bare encoder, one image:           {t['encoder'] * 1e3:8.1f} ms / image")
    print(f"ours, batch 32:                    {32 / t['ours32']:8.1f} images / s")
    print(f"bare encoder, batch 32:            {32 / t['encoder32']:8.1f} images / s")
    print(f"ours, one image, again (the options' baseline): {t['plain'] * 1e3:.1f} ms / image")
    print(f"ours + attention maps:             {t['attention'] * 1e3:8.1f} ms / image")
    print(f"ours, sampling (T 1, top-k 50, p .9): {t['sampling'] * 1e3:5.1f} ms / image")
    print(f"ours + no-repeat 3-grams, min 5 words: {t['controls'] * 1e3:4.1f} ms / image")
    print(f"beam 3:                            {t['beam'] * 1e3:8.1f} ms / image")
    print(f"beam 3, 3 best + attention + no-repeat: {t['beam_all'] * 1e3:3.1f} ms / image")
    print(f"peak RSS: {rss_mb:.0f} MB captioning, {common.peak_rss_mb():.0f} MB after the bare batch-32 forward")
    print(f"PyTorch fp32 (today's path without bf16), one image: {t['torch_fp32'] * 1e3:.1f} ms / image")
    figures = {"speedup_vs_reference": f"{t['reference'] / t['ours']:.1f}",
               "overhead_vs_encoder": f"{t['ours'] / t['encoder']:.2f}",
               "batch_efficiency": f"{t['encoder32'] / t['ours32']:.2f}", "rss_mb": f"{rss_mb:.0f}",
               **{f"{name}_overhead": f"{t[name] / t['plain']:.2f}" for name in ("attention", "sampling", "controls")},
               "beam_options_overhead": f"{t['beam_all'] / t['beam']:.2f}"}
    if exports is not None:
        del captioner, torch_fp32, model           # the comparison's process needs the memory more
        figures |= onnx_runtime_rows(exports, args.repeats)
    common.finish("decode", figures, env, args.json)


def compare_engines(exports: Path, repeats: int) -> None:
    """--compare: PyTorch (fp32, and `precision: auto`) and ONNX Runtime (the fp32 and int8 exports, and the bare
    encoder graph) timed in turns, round after round; prints one JSON line of medians (seconds)."""
    model, vocab, cfg = reference_model()
    torch_fp32 = Captioner(model, vocab, cfg, device="cpu", precision="fp32", own_model=True)
    model, vocab, cfg = reference_model()
    torch_auto = Captioner(model, vocab, cfg, device="cpu", precision="auto", own_model=True)
    ort = {name: Captioner.from_export(exports / name) for name in EXPORTS}
    images = photos()
    x1, x32 = ort["int8"].transform(images[0])[None], np.stack([ort["int8"].transform(p) for p in images])
    one = images[:1]
    jobs = {"torch_fp32": lambda: torch_fp32.caption(one), "torch_auto": lambda: torch_auto.caption(one),
            "ort_fp32": lambda: ort["fp32"].caption(one), "ort_int8": lambda: ort["int8"].caption(one),
            "ort_encoder": lambda: ort["int8"].memory(images=x1),
            "ort_int8_beam": lambda: ort["int8"].caption(one, beam_size=3),
            "ort_int8_32": lambda: ort["int8"].caption(images, batch_size=32),
            "ort_encoder_32": lambda: ort["int8"].memory(images=x32),
            "ort_all_int8": lambda: ort["all_int8"].caption(one),
            "ort_all_int8_encoder": lambda: ort["all_int8"].memory(images=x1),
            "ort_all_int8_32": lambda: ort["all_int8"].caption(images, batch_size=32),
            "ort_all_int8_encoder_32": lambda: ort["all_int8"].memory(images=x32)}
    assert len(ort["int8"].caption(one)[0].caption.split()) == WORDS
    a, b = (ort[name].memory(images=x32).reshape(len(x32), -1) for name in ("fp32", "all_int8"))
    cosine = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    print(json.dumps({"precision_auto": torch_auto.precision, "all_int8_cosine": cosine,
                      **common.medians(jobs, repeats)}))


def onnx_runtime_rows(exports: Path, repeats: int) -> dict[str, str]:
    """The engines compared (in a process of their own), and the int8 export's peak RSS (in another); their rows,
    printed, and their figures for the last line."""
    def child(*args) -> dict:
        out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
        if out.returncode:
            print(f"{args[0]} failed: {out.stderr.strip()[-2000:]}")
            return {}
        return json.loads(out.stdout.strip().splitlines()[-1])

    t = child(__file__, "--compare", exports, "--repeats", repeats)
    missing = {"rss_mb": "n/a", "rss_after_imports_mb": "n/a", "imported": "n/a"}
    rss, rss_all = (child(Path(__file__).with_name("caption_rss.py"), exports / name, WORDS) or missing
                    for name in ("int8", "all_int8"))
    auto = t["precision_auto"]
    print(f"engines compared in turns, one image: PyTorch fp32 {t['torch_fp32'] * 1e3:.1f} ms, PyTorch {auto} "
          f"{t['torch_auto'] * 1e3:.1f} ms, ONNX Runtime fp32 {t['ort_fp32'] * 1e3:.1f} ms, ONNX Runtime int8 "
          f"{t['ort_int8'] * 1e3:.1f} ms, ONNX Runtime bare encoder graph (ResNet + transformer encoder) "
          f"{t['ort_encoder'] * 1e3:.1f} ms; int8 beam 3 {t['ort_int8_beam'] * 1e3:.1f} ms")
    print(f"ONNX Runtime batch 32: int8 {32 / t['ort_int8_32']:.1f} images / s, bare encoder graph "
          f"{32 / t['ort_encoder_32']:.1f} images / s")
    print(f"ONNX Runtime int8, a process that only captions (1 image, then 32): peak RSS {rss['rss_mb']} MB "
          f"({rss['rss_after_imports_mb']} MB after its imports; imported {rss['imported'] or 'none'} of "
          f"torch, torchvision, pandas, matplotlib); all int8: {rss_all['rss_mb']} MB")
    print(f"all int8 (the encoder too), one image: {t['ort_all_int8'] * 1e3:.1f} ms, its bare encoder graph "
          f"{t['ort_all_int8_encoder'] * 1e3:.1f} ms (the fp32 one: {t['ort_encoder'] * 1e3:.1f} ms); batch 32: "
          f"{32 / t['ort_all_int8_32']:.1f} images / s, its bare encoder graph {32 / t['ort_all_int8_encoder_32']:.1f} "
          f"images / s; memory against the fp32 encoder's: cosine {t['all_int8_cosine']:.5f} at least")
    return {"ort_speedup_vs_torch": f"{t['torch_fp32'] / t['ort_int8']:.2f}",
            "ort_overhead_vs_encoder": f"{t['ort_int8'] / t['ort_encoder']:.2f}",
            "ort_batch_efficiency": f"{t['ort_encoder_32'] / t['ort_int8_32']:.2f}", "ort_rss_mb": rss["rss_mb"],
            "ort_fp32_speedup_vs_torch": f"{t['torch_fp32'] / t['ort_fp32']:.2f}",
            f"ort_speedup_vs_torch_{auto}": f"{t['torch_auto'] / t['ort_int8']:.2f}",
            "ort_int8_encoder_speedup": f"{t['ort_encoder'] / t['ort_all_int8_encoder']:.2f}",
            "all_int8_ms": f"{t['ort_all_int8'] * 1e3:.1f}",
            "all_int8_speedup_vs_int8": f"{t['ort_int8'] / t['ort_all_int8']:.2f}",
            "all_int8_batch_efficiency": f"{t['ort_all_int8_encoder_32'] / t['ort_all_int8_32']:.2f}",
            "all_int8_overhead_vs_encoder": f"{t['ort_all_int8'] / t['ort_all_int8_encoder']:.2f}",
            "all_int8_cosine": f"{t['all_int8_cosine']:.5f}", "all_int8_rss_mb": rss_all["rss_mb"]}


if __name__ == "__main__":
    main()
