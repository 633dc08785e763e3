"""What bounds benchmarks/train.py on this machine: the time of its matrix products alone.

Measured here, in one run, at the sizes benchmarks/train.py uses:

- peak: a plain fp32 `a @ b` (2048 x 2048 x 2048), GFLOP/s;
- cache: ResNet-152 (folded, as the feature cache runs it) on a batch of 32 images at 224 px,
  channels_last, seconds per image, times the benchmark's 32 images;
- epoch: a training step of the reference-size model on cached features (6 images, 30 captions of
  14 tokens, fp32), and under torch.profiler the share of it spent in `mm`/`addmm` (the linear
  layers, forward and backward) and in `bernoulli_` (dropout's random numbers); the matrix products
  alone, scaled to the benchmark's 160 caption rows.

floor_s = cache_s + epoch_matmul_s is what our pipeline would take with nothing but those, so the
benchmark's speedup cannot pass reference_s / floor_s. Last line:
train_bound: floor_s=... cache_s=... epoch_matmul_s=... step_s=... matmul_share=... peak_gflops=...

    python benchmarks/train_bound.py [--json PATH]
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import common
from captioning.config import ModelConfig
from captioning.data.dataset import Batch
from captioning.model.backbone import Encoder
from captioning.model.caption_model import build_model
from captioning.train.loop import caption_loss
from train import CAPTIONS, IMAGES, STEP_IMAGES, VOCAB, WORDS  # benchmarks/train.py's sizes

TOKENS = WORDS + 2                                                  # <bos> words <eos>


def seconds(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after a warm-up call (oneDNN builds its kernels)."""
    return common.medians({"fn": fn}, repeats)["fn"]


def main() -> None:
    args = common.parser(__doc__).parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / seconds(lambda: a @ b, 10) / 1e9

    encoder = Encoder("resnet152", pretrained=False).folded()
    images = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        per_image = seconds(lambda: encoder(images), 1) / 32

    model = build_model(ModelConfig(pretrained=False), VOCAB)            # d_model 512, 6 + 6 layers
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    rows = STEP_IMAGES * CAPTIONS
    tokens = torch.randint(4, VOCAB, (rows, TOKENS))
    batch = Batch(tokens, torch.arange(STEP_IMAGES).repeat_interleave(CAPTIONS), [],
                  features=torch.randn(STEP_IMAGES, 49, 2048).half())

    def step():
        loss, _ = caption_loss(model, batch, "fp32", torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = seconds(step, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    matmul = (self_us.get("aten::mm", 0) + self_us.get("aten::addmm", 0)) / total
    dropout = self_us.get("aten::bernoulli_", 0) / total

    cache_s = per_image * IMAGES
    epoch_matmul_s = step_s * matmul * IMAGES * CAPTIONS / rows
    floor = cache_s + epoch_matmul_s
    env = common.machine("cpu", "fp32")
    print(f"{torch.get_num_threads()} threads, fp32")
    print(f"a @ b:                         {peak:6.1f} GFLOP/s")
    print(f"ResNet-152, batch 32:          {per_image * 1000:6.0f} ms an image -> {cache_s:.1f} s for {IMAGES} images")
    print(f"training step ({rows} rows):      {step_s:6.2f} s: matrix products {matmul:.0%}, "
          f"dropout's random numbers {dropout:.0%}")
    print(f"epoch's matrix products:       {epoch_matmul_s:6.1f} s for {IMAGES * CAPTIONS} rows")
    common.finish("train_bound", {"floor_s": f"{floor:.1f}", "cache_s": f"{cache_s:.1f}",
                                  "epoch_matmul_s": f"{epoch_matmul_s:.1f}", "step_s": f"{step_s:.2f}",
                                  "matmul_share": f"{matmul:.2f}", "peak_gflops": f"{peak:.0f}"}, env, args.json)


if __name__ == "__main__":
    main()
