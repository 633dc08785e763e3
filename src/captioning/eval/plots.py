"""Figures: training history, and images with their captions."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def plot_history(history: list[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (train and val cross-entropy) and lr.png, from history.csv's rows; cider.png too
    when the run monitored validation CIDEr, and reward.png (the samples' mean reward and baseline)
    for SCST."""
    out_dir = Path(out_dir)
    # SCST's train_loss is not a cross-entropy
    scst = any(h.get("reward") not in (None, "") for h in history)
    figures = [("loss.png", ("val_loss",) if scst else ("train_loss", "val_loss"), "cross-entropy"),
               ("lr.png", ("lr",), "learning rate")]
    if any(h.get("val_cider") not in (None, "") for h in history):
        figures.append(("cider.png", ("val_cider",), "validation CIDEr"))
    if scst:
        figures.append(("reward.png", ("reward", "baseline"), "CIDEr-D of the samples"))
    paths = []
    for name, keys, ylabel in figures:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in keys:
            points = [(h["epoch"], float(h[key])) for h in history if h.get(key) not in (None, "")]
            ax.plot(*zip(*points), marker="o", ms=3, label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def show_captions(images, captions, titles=None, cols: int = 4, width: float = 3.2):
    """A grid of images, each with its caption underneath; returns the figure."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    wrapped = ["\n".join(_wrap(caption, 34)) for caption in captions]
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)     # room for the longest caption
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, (width + 0.2 * lines + 0.3) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, caption) in enumerate(zip(axes.flat, images, wrapped)):
        ax.imshow(image)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        ax.text(0.5, -0.04, caption, transform=ax.transAxes, ha="center", va="top", fontsize=9)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def show_attention(image, words: list[str], maps, cols: int = 5, size: float = 2.2,
                   image_size: int | None = None):
    """Where the decoder looked for each word: one panel per word, titled by it, its map upsampled
    smoothly onto the image as the encoder saw it.

    `image`: a PIL image (resized to image_size x image_size when given, as the encoder does);
    `maps`: (words, h, w), each summing to 1 over the encoder's grid
    (Captioner.caption(attention=True)).
    """
    import numpy as np
    from PIL import Image

    maps = np.asarray(maps, dtype=np.float32)
    if len(words) != len(maps):
        raise ValueError(f"{len(words)} words but {len(maps)} maps: one map per word")
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.BILINEAR)
    pixels = np.asarray(image.convert("RGB"))
    rows = (len(words) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, word, grid in zip(axes.flat, words, maps):
        h, w = grid.shape
        # bicubic upsampling of the h x w grid to the picture: each cell's weight lands on its patch
        overlay = np.asarray(Image.fromarray(grid / max(grid.max(), 1e-12))
                             .resize(image.size, Image.BICUBIC))
        ax.imshow(pixels)
        ax.imshow(overlay.clip(0, 1), cmap="jet", alpha=0.45,
                  extent=(0, image.size[0], image.size[1], 0))
        ax.set_title(word, fontsize=10)
    fig.tight_layout()
    return fig
