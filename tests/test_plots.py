"""Figures: history plots and the image + caption grid used by the notebooks."""
import matplotlib

matplotlib.use("Agg")
from PIL import Image  # noqa: E402

from captioning.eval.plots import plot_history, show_captions  # noqa: E402


def test_show_captions_draws_each_image_with_its_caption():
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "white")]
    captions = ["a red square", "a blue square", "a very long caption that has to wrap over more than one line"]
    fig = show_captions(images, captions, cols=2)
    axes_with_images = [ax for ax in fig.axes if ax.images]
    assert len(axes_with_images) == 3 and len(fig.axes) == 4       # a 2x2 grid, the spare cell blank
    texts = [t.get_text() for ax in axes_with_images for t in ax.texts]
    assert texts[0] == "a red square" and "\n" in texts[2]


def test_plot_history_writes_both_plots(tmp_path):
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "lr": 1e-3 * 0.9 ** e, "seconds": 1.0}
               for e in (1, 2, 3)]
    paths = plot_history(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    assert all(Image.open(p).size[0] > 100 for p in paths)
