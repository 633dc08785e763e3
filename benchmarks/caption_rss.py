"""Peak RSS of a process that only captions from an export: 1 image, then 32 (benchmarks/decode.py runs it).

It imports only what captioning from an export needs: not torch (the search runs on numpy arrays),
nor decode.py's torchvision and data imports, so it runs in any environment with the package and
onnxruntime. Prints one JSON line: its peak RSS (VmHWM, MB), its RSS after the imports, and which of
torch, torchvision, pandas and matplotlib got imported (none, unless something regressed).

    python benchmarks/caption_rss.py EXPORT_DIR [WORDS]     (WORDS: the caption length to check, if forced)
"""
import json
import re
import sys

import numpy as np
from PIL import Image

from captioning import Captioner


def peak_mb() -> int:
    """VmHWM, this process's own peak: ru_maxrss would start at the parent's RSS, carried over by fork and exec."""
    return round(int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024)


def main() -> None:
    before = peak_mb()
    captioner = Captioner.from_export(sys.argv[1])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(32)]
    first = captioner.caption(images[:1])[0].caption
    if len(sys.argv) > 2:
        assert len(first.split()) == int(sys.argv[2]), first
    captioner.caption(images, batch_size=32)
    heavy = sorted(m for m in ("torch", "torchvision", "pandas", "matplotlib") if m in sys.modules)
    print(json.dumps({"rss_mb": peak_mb(), "rss_after_imports_mb": before, "imported": heavy}))


if __name__ == "__main__":
    main()
