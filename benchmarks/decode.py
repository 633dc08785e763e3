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

Last line: decode: speedup_vs_reference=X overhead_vs_encoder=Y batch_efficiency=Z rss_mb=W
attention_overhead=... sampling_overhead=... controls_overhead=... beam_options_overhead=...

    python benchmarks/decode.py [--repeats 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image

from captioning import Captioner
from captioning.config import from_dict
from captioning.data import build_transform
from captioning.env import collect_env
from captioning.model import build_model
from captioning.vocab import SPECIALS, Vocabulary

WORDS = 20


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


@torch.no_grad()
def reference_caption(model, image: torch.Tensor, bos: int, words: int) -> list[int]:
    """The reference design's decoding: every word re-runs the ResNet and the whole transformer."""
    tokens = torch.full((1, 1), bos, dtype=torch.long, device=image.device)
    for _ in range(words):
        logits = model(tokens, images=image)[:, -1]           # (1, V): encoder, transformer encoder, decoder: all again
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, 1:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    cfg = from_dict({"model": {"pretrained": False, "max_tokens": 64}, "data": {"max_words": WORDS}}, check_paths=False)
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(7736 - len(SPECIALS))])
    model = build_model(cfg.model, len(vocab), vocab.pad).eval()
    with torch.no_grad():
        model.head.bias[vocab.eos] = float("-inf")     # force every caption to WORDS words
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(32)]

    # the reference first, in fp32; then the Captioner casts the same model's encoder for its precision
    model.to(device)
    x1 = build_transform(cfg.data.image_size)(photos[0])[None].to(device)
    t_reference = timed(lambda: reference_caption(model, x1, vocab.bos, WORDS), max(1, args.repeats // 2), sync)
    captioner = Captioner(model, vocab, cfg, device=device, precision="auto", own_model=True)
    assert len(captioner.caption([photos[0]])[0].caption.split()) == WORDS

    x32 = torch.stack([captioner.transform(p) for p in photos]).to(device)
    t_ours = timed(lambda: captioner.caption([photos[0]]), args.repeats, sync)
    t_encoder = timed(lambda: captioner.features(x1), args.repeats, sync)       # the Captioner's own encoder call
    t_ours32 = timed(lambda: captioner.caption(photos, batch_size=32), args.repeats, sync)
    # the decoding options, each against plain decoding at the same beam size timed right beside them
    one = [photos[0]]
    t_plain = timed(lambda: captioner.caption(one), args.repeats, sync)
    t_attention = timed(lambda: captioner.caption(one, attention=True), args.repeats, sync)
    t_sampling = timed(lambda: captioner.caption(one, temperature=1.0, top_k=50, top_p=0.9, seed=0), args.repeats,
                       sync)
    t_controls = timed(lambda: captioner.caption(one, no_repeat_ngram_size=3, min_words=5), args.repeats, sync)
    t_beam = timed(lambda: captioner.caption(one, beam_size=3), args.repeats, sync)
    t_beam_all = timed(lambda: captioner.caption(one, beam_size=3, num_captions=3, attention=True,
                                                 no_repeat_ngram_size=3), args.repeats, sync)
    rss_mb = peak_rss_mb()                          # the reference and ours, before the bare batch-32 forward
    t_encoder32 = timed(lambda: captioner.features(x32), args.repeats, sync)

    print("env:", json.dumps(collect_env(device, captioner.precision)))
    print(f"device {device}, precision {captioner.precision}, {torch.get_num_threads()} threads, {WORDS} words")
    print(f"reference (fp32, re-run per word): {t_reference * 1e3:8.1f} ms / image")
    print(f"ours, one image:                   {t_ours * 1e3:8.1f} ms / image")
    print(f"bare encoder, one image:           {t_encoder * 1e3:8.1f} ms / image")
    print(f"ours, batch 32:                    {32 / t_ours32:8.1f} images / s")
    print(f"bare encoder, batch 32:            {32 / t_encoder32:8.1f} images / s")
    print(f"ours, one image, again (the options' baseline): {t_plain * 1e3:.1f} ms / image")
    print(f"ours + attention maps:             {t_attention * 1e3:8.1f} ms / image")
    print(f"ours, sampling (T 1, top-k 50, p .9): {t_sampling * 1e3:5.1f} ms / image")
    print(f"ours + no-repeat 3-grams, min 5 words: {t_controls * 1e3:4.1f} ms / image")
    print(f"beam 3:                            {t_beam * 1e3:8.1f} ms / image")
    print(f"beam 3, 3 best + attention + no-repeat: {t_beam_all * 1e3:3.1f} ms / image")
    print(f"peak RSS: {rss_mb:.0f} MB captioning, {peak_rss_mb():.0f} MB after the bare batch-32 forward")
    print(f"decode: speedup_vs_reference={t_reference / t_ours:.1f} overhead_vs_encoder={t_ours / t_encoder:.2f} "
          f"batch_efficiency={t_encoder32 / t_ours32:.2f} rss_mb={rss_mb:.0f} "
          f"attention_overhead={t_attention / t_plain:.2f} sampling_overhead={t_sampling / t_plain:.2f} "
          f"controls_overhead={t_controls / t_plain:.2f} beam_options_overhead={t_beam_all / t_beam:.2f}")


if __name__ == "__main__":
    main()
