"""The Captioner: one result per input in order, bad inputs reported, batching and beams consistent."""
import io

import pytest
from PIL import Image

from captioning import Captioner, ImageLoadError


@pytest.fixture(scope="module")
def captioner(tiny_run):
    return Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32")


@pytest.fixture(scope="module")
def images(shapes_dir):
    return sorted((shapes_dir / "flickr30k_images").iterdir())[:6]


def test_preprocessing_comes_from_the_checkpoint(captioner):
    assert captioner.cfg.data.image_size == 32
    assert captioner.transform(Image.new("RGB", (300, 100))).shape == (3, 32, 32)


def test_every_kind_of_input_in_order(captioner, images, tmp_path):
    png = io.BytesIO()
    Image.open(images[2]).save(png, format="PNG")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    inputs = [str(images[0]), images[1], png.getvalue(), Image.open(images[3]), str(tmp_path / "broken.png")]
    results = captioner.caption(inputs)
    assert [r.ok for r in results] == [True, True, True, True, False]
    assert "broken.png" in results[4].error and results[4].caption is None
    assert results[0].input == str(images[0]) and results[2].input.startswith("<bytes")
    # the same image reaches the same caption whichever way it came in
    assert results[2].caption == captioner(images[2])


def test_call_raises_on_a_bad_input(captioner, tmp_path):
    with pytest.raises(ImageLoadError, match="nothing.jpg"):
        captioner(tmp_path / "nothing.jpg")


def test_batched_equals_one_at_a_time(captioner, images):
    batched = [r.caption for r in captioner.caption(images, batch_size=4)]
    assert batched == [captioner(p) for p in images]


def test_beam_size_one_is_greedy_and_beams_run(captioner, images):
    greedy = [r.caption for r in captioner.caption(images)]
    assert [r.caption for r in captioner.caption(images, beam_size=1)] == greedy
    beams = captioner.caption(images, beam_size=3)
    assert all(r.ok and isinstance(r.caption, str) for r in beams)
    with pytest.raises(ValueError, match="beam_size"):
        captioner.caption(images, beam_size=0)
