"""Self-critical training speed: one SCST step against one cross-entropy step, side by side in one run.

The reference-size model (d_model 512, 6+6 layers, 7,736 words, random weights -- speed does not depend
on them) on cached features (16 images of 7x7x2048, as train.cache_features gives them):

- xe: a cross-entropy step over the 16 images with 5 captions each (12 words, Flickr30k's median);
- scst: a self-critical step over the same 16 images: 5 captions each sampled with the cached decoder
  (20 words: a random model never stops early, the worst case), their CIDEr-D rewards against the
  image's 5 references, the mean-of-others baseline, then the teacher-forced pass and the update.

Both at the default precision (train.precision=auto), the same Adam; medians of --steps steps each,
alternated, after one warm-up step of each. Last line:
scst: step_ratio_vs_xe=X samples_per_s=... peak_rss_mb=...

    python benchmarks/scst.py [--steps 5] [--device cpu|cuda] [--json PATH]
"""
from __future__ import annotations

import json
import statistics

import torch

import common
from captioning.config import from_dict
from captioning.data.dataset import Batch
from captioning.decode.rules import Rules
from captioning.device import resolve_device, resolve_precision
from captioning.model.caption_model import build_model
from captioning.train.loop import CrossEntropy, build_optimizer
from captioning.train.reward import CiderD
from captioning.train.scst import ScstObjective

IMAGES, CAPTIONS, WORDS, SAMPLES, MAX_WORDS, VOCAB = 16, 5, 12, 5, 20, 7736


def make_batch(generator: torch.Generator) -> Batch:
    words = torch.randint(4, VOCAB, (IMAGES * CAPTIONS, WORDS), generator=generator)
    tokens = torch.cat([torch.full((IMAGES * CAPTIONS, 1), 1), words, torch.full((IMAGES * CAPTIONS, 1), 2)], 1)
    return Batch(tokens, torch.arange(IMAGES).repeat_interleave(CAPTIONS), [f"{i:05d}.jpg" for i in range(IMAGES)],
                 features=torch.randn(IMAGES, 49, 2048, generator=generator).half())


def step(objective, net, optimizer, batch: Batch, device) -> None:
    loss, _, _ = objective(net, batch.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    cfg = from_dict({"model": {"pretrained": False}, "train": {"lr": 5e-6}}, check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB).to(device).train()
    optimizer = build_optimizer(cfg, model)
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(generator)
    references = {name: batch.tokens[i * CAPTIONS:(i + 1) * CAPTIONS, 1:-1].tolist()
                  for i, name in enumerate(batch.names)}
    objectives = {"xe": CrossEntropy(precision, device),
                  "scst": ScstObjective(model, CiderD.build(references), Rules(0, 1, 2), SAMPLES, MAX_WORDS, "mean",
                                        precision, device)}
    times = common.in_turns({name: lambda o=objective: step(o, model, optimizer, batch, device)
                             for name, objective in objectives.items()}, args.steps,
                            sync=torch.cuda.synchronize if device.type == "cuda" else None)
    xe, scst = (statistics.median(times[k]) for k in ("xe", "scst"))
    peak = common.peak_rss_mb()
    env = common.machine(device, precision)
    print(json.dumps({"steps": args.steps, "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()}}))
    print(f"xe step {xe * 1000:.0f} ms ({IMAGES} images x {CAPTIONS} captions of {WORDS} words), scst step "
          f"{scst * 1000:.0f} ms ({IMAGES} images x {SAMPLES} samples of {MAX_WORDS} words), {precision} on {device}")
    common.finish("scst", {"step_ratio_vs_xe": f"{scst / xe:.2f}", "samples_per_s": f"{IMAGES * SAMPLES / scst:.1f}",
                           "peak_rss_mb": f"{peak:.0f}"}, env, args.json)


if __name__ == "__main__":
    main()
