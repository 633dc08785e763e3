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


# --- a model handed in is left as it is; the one prediction path -----------------------------------

def test_a_model_handed_in_keeps_its_dtype_and_training_flag(tiny_run, images):
    import torch

    from captioning import load_checkpoint

    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    model.train()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    captioner = Captioner(model, vocab, cfg, device="cpu", precision="bf16")
    results = captioner.caption(images[:3])
    assert all(r.ok and isinstance(r.caption, str) for r in results)
    captioner.predict(images=torch.stack([captioner.transform(Image.open(p).convert("RGB")) for p in images[:2]]))
    assert model.training and all(m.training for m in model.modules())      # still training, every submodule
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())   # nor cast and back
    assert next(model.encoder.parameters()).is_contiguous()                 # nor made channels_last


def test_from_checkpoint_at_bf16_casts_its_own_encoder(tiny_run, images):
    import torch

    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", device="cpu", precision="bf16")
    assert captioner.precision == "bf16"
    assert {p.dtype for p in captioner.model.encoder.parameters()} == {torch.bfloat16}
    rest = [p for name, p in captioner.model.named_parameters() if not name.startswith("encoder.")]
    assert rest and {p.dtype for p in rest} == {torch.float32}                # the transformer stays fp32
    assert not captioner.model.training
    assert all(r.ok for r in captioner.caption(images[:2]))
    fp32 = Captioner.from_checkpoint(tiny_run / "best.pt", device="cpu", precision="fp32", engine="torch")
    assert {p.dtype for p in fp32.model.encoder.parameters()} == {torch.float32}


def test_an_own_model_on_the_cpu_reads_its_linear_weights_column_major_and_captions_as_a_model_handed_in(tiny_run,
                                                                                                      images):
    """prepare_for_inference lays each linear weight out as its transpose, contiguous; the values do not change."""
    import torch

    from captioning import load_checkpoint

    own = Captioner.from_checkpoint(tiny_run / "best.pt", device="cpu", precision="fp32", engine="torch")
    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    handed = Captioner(model.eval(), vocab, cfg, device="cpu", precision="fp32")
    assert own.model.head.weight.t().is_contiguous() and not own.model.head.weight.is_contiguous()
    assert model.head.weight.is_contiguous()                                   # a model handed in is left as it is
    assert torch.equal(own.model.head.weight, model.head.weight)
    for options in ({}, {"beam_size": 3}, {"beam_size": 2, "num_captions": 2}):
        assert ([r.captions for r in own.caption(images[:4], **options)]
                == [r.captions for r in handed.caption(images[:4], **options)]), options


def test_validation_batches_and_image_files_get_the_same_captions(tiny_run):
    """val_cider captions loader batches with Captioner.predict, evaluate image files with Captioner.caption:
    the two must agree, and val_cider must score exactly those captions."""
    import torch

    from captioning import load_checkpoint
    from captioning.data.corpus import load_splits, read_corpus
    from captioning.data.dataset import CaptionDataset, build_loader
    from captioning.eval.metrics import score_captions
    from captioning.train.loop import val_cider

    model, vocab, cfg = load_checkpoint(tiny_run / "best.pt")
    corpus = read_corpus(cfg)
    names = load_splits(tiny_run / "splits.json")["val"]
    dataset = CaptionDataset(corpus, names, vocab, cfg.data.image_size, cfg.data.max_words)
    captioner = Captioner(model, vocab, cfg, device="cpu", precision="fp32")
    predicted = {}
    for batch in build_loader(dataset, batch_size=4, shuffle=False, num_workers=0, pad_id=vocab.pad):
        predicted.update(zip(batch.names, captioner.predict(**batch.model_inputs())))
    assert list(predicted) == names
    from_files = {n: r.caption for n, r in zip(names, captioner.caption([corpus.images_dir / n for n in names]))}
    assert predicted == from_files
    assert len(set(predicted.values())) >= 1 and all(isinstance(c, str) for c in predicted.values())
    references = {n: corpus.captions[n] for n in names}
    expected = score_captions(predicted, references, metrics=("CIDEr",))[0]["CIDEr"]
    assert val_cider(model, dataset, vocab, cfg, "fp32", torch.device("cpu")) == pytest.approx(expected, abs=1e-12)


def test_max_words_beyond_the_models_positions_is_refused_up_front(tiny_run):
    from captioning import Captioner
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32")
    limit = captioner.cfg.model.max_tokens - 2
    assert captioner.options(max_words=limit).max_words == limit
    with pytest.raises(ValueError, match="max_words.*max_tokens"):
        captioner.options(max_words=limit + 1)
