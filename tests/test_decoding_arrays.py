"""The search on numpy arrays: decode/search.py runs on whatever its engine returns (NumpyOps for ONNX Runtime's
arrays, TorchOps for tensors) and gives the same captions either way; it never imports torch itself.

`NumpyEngine` is the PyTorch engine seen through numpy (arrays in, arrays out), so the numpy path is held to
the tensor path without onnxruntime; test_export holds the real ONNX Runtime engine to the checkpoint.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioning.decode.arrays import NumpyOps
from captioning.decode.draw import inverse_cdf
from captioning.decode.rules import DecodeOptions, Rules
from captioning.decode.search import search
from captioning.decode.torch_ops import TorchOps
from captioning.model.kv_cache import DecoderCache
from test_decoding import BOS, EOS, PAD, POST_NORM, make_memory, make_model


class NumpyEngine:
    """The PyTorch model as an engine, with numpy arrays in and out: the search sees what OrtEngine gives it."""

    def __init__(self, model):
        self.torch, self.pad_id = model, model.pad_id

    def init_cache(self, memory, group=1):
        cache = self.torch.init_cache(torch.from_numpy(memory), group)
        return DecoderCache(*([t.numpy() for t in ts] for ts in (cache.self_k, cache.self_v, cache.cross_k,
                                                                   cache.cross_v)))

    def step(self, cache, tokens, attention=None):
        tensors = DecoderCache(*([torch.from_numpy(a) for a in ts] for ts in (cache.self_k, cache.self_v,
                                                                              cache.cross_k, cache.cross_v)))
        weights = None if attention is None else []
        logits = self.torch.step(tensors, torch.from_numpy(tokens), weights)
        cache.self_k[:], cache.self_v[:] = [t.numpy() for t in tensors.self_k], [t.numpy() for t in tensors.self_v]
        if attention is not None:
            attention.extend(w.numpy() for w in weights)
        return logits.numpy()


@pytest.fixture(scope="module")
def model():
    return make_model(**POST_NORM)


RULES = Rules(PAD, BOS, EOS, min_words=2, no_repeat_ngram_size=2, banned_endings=frozenset({5, 6}))


@pytest.mark.parametrize("options", [
    {}, {"beam_size": 3, "num_captions": 3}, {"beam_size": 4, "length_penalty": 0.0},
    {"attention": True}, {"beam_size": 2, "attention": True, "attention_layer": 1, "attention_head": 0},
    {"temperature": 1.5, "num_captions": 2, "seed": 3}, {"top_k": 4, "top_p": 0.8, "seed": 1}])
def test_the_search_on_numpy_arrays_gives_the_tensor_searchs_captions(model, options):
    memory = make_memory(6)
    opts = DecodeOptions(max_words=12, **options).check(2, 4)
    generator = (lambda: np.random.default_rng(opts.seed)) if opts.sampling else (lambda: None)
    ours = search(model, memory, opts, RULES, generator())
    arrays = search(NumpyEngine(model), memory.numpy(), opts, RULES, generator())
    assert len({tuple(hyps[0].ids) for hyps in ours}) > 1                 # captions differ: not vacuous
    for a, b in zip(ours, arrays):
        assert [h.ids for h in a] == [h.ids for h in b] and [h.ended for h in a] == [h.ended for h in b]
        np.testing.assert_allclose([h.logprob for h in a], [h.logprob for h in b], rtol=1e-5, atol=1e-5)
        for x, y in zip(a, b):
            assert (x.maps is None) == (y.maps is None) and isinstance(y.maps, (np.ndarray, type(None)))
            if x.maps is not None:
                np.testing.assert_allclose(x.maps.numpy(), y.maps, atol=1e-6)


def test_numpy_ops_are_torch_ops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 30)).astype(np.float32)
    x[1, [3, 7]] = float("-inf")
    t, ours, theirs = torch.from_numpy(x), NumpyOps(), TorchOps(torch.device("cpu"))
    for name in ("log_softmax", "softmax"):
        np.testing.assert_allclose(getattr(ours, name)(x), getattr(theirs, name)(t).numpy(), rtol=1e-6, atol=1e-6)
    for k in (1, 4, 28):                                  # the two -inf tie: which comes first is not defined
        for a, b in zip(ours.topk(x, k), theirs.topk(t, k)):
            np.testing.assert_array_equal(a, b.numpy())
    x[1, [3, 7]] = -100.0, -101.0                     # t shares x's memory
    order = ours.sort_descending(x)[1]
    np.testing.assert_array_equal(order, theirs.sort_descending(t)[1].numpy())
    np.testing.assert_array_equal(ours.scatter(x, order, -x), theirs.scatter(t, torch.from_numpy(order), -t).numpy())
    np.testing.assert_array_equal(ours.where(x > 0, -1.0, x), theirs.where(t > 0, -1.0, t).numpy())
    np.testing.assert_array_equal(ours.repeat_rows(x, 3), theirs.repeat_rows(t, 3).numpy())
    np.testing.assert_array_equal(ours.concat([x, x[:2]]), theirs.concat([t, t[:2]]).numpy())
    cast = ours.cast(x, "float32")
    cast[0, 0] = 42.0
    assert x[0, 0] != 42.0 and theirs.cast(t, "float32").data_ptr() != t.data_ptr()   # a copy to write into


def test_the_inverse_cdf_draws_by_probability_never_a_word_of_probability_zero():
    probs = np.array([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]] * 20_000, dtype=np.float32)
    words = inverse_cdf(NumpyOps(), probs, np.random.default_rng(0))
    counts = np.bincount(words, minlength=6) / len(words)
    assert set(np.unique(words)) == {1, 3, 4}
    np.testing.assert_allclose(counts, probs[0], atol=0.015)
    ones = inverse_cdf(NumpyOps(), np.eye(6, dtype=np.float32), np.random.default_rng(1))
    np.testing.assert_array_equal(ones, np.arange(6))                    # a sure word is always drawn
    # either kind of array draws the same words from the same seed: a seed means the same on either engine
    torch_words = TorchOps(torch.device("cpu")).multinomial(torch.from_numpy(probs), np.random.default_rng(0))
    np.testing.assert_array_equal(torch_words.numpy(), words)


def test_the_search_the_captioner_and_the_package_import_no_torch():
    code = ("import sys, captioning, captioning.decode.search, captioning.captioner, captioning.decode.onnx_engine; "
            "print('torch' in sys.modules, captioning.CaptionModel.__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "CaptionModel", "True"], out       # the names that need torch import it when used


def test_an_empty_batch_gives_no_hypotheses_on_either_kind_of_array(model):
    from captioning.decode.search import beam_search_hypotheses, sample_or_greedy

    memory = make_memory(0)
    for engine, x in ((model, memory), (NumpyEngine(model), memory.numpy())):
        assert beam_search_hypotheses(engine, x, RULES, 5, beam_size=3) == []
        assert sample_or_greedy(engine, x, RULES, 5) == []


def test_a_draw_from_a_row_without_probabilities_or_with_a_torch_generator_on_arrays_is_an_error():
    rows = np.array([[0.5, 0.5], [np.nan, np.nan]], dtype=np.float32)
    for ops, probs in ((NumpyOps(), rows), (TorchOps(torch.device("cpu")), torch.from_numpy(rows))):
        with pytest.raises(ValueError, match="temperature too low"):
            inverse_cdf(ops, probs, np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy Generator"):
        NumpyOps().multinomial(rows[:1], torch.Generator())
