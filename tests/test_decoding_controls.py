"""Attention maps per word and the decoding controls: n-best lists, sampling, n-gram blocking, minimum length,
no caption ending on a function word. The models are test_decoding's: random weights with a peaky head, so
captions differ across images and end at different lengths."""
import pytest
import torch

from captioning.decode.rules import AttentionSpec, DecodeOptions, Rules, rules_for
from captioning.decode.search import beam_search_hypotheses, greedy, sample_or_greedy, search
from captioning.model.caption_model import init_cache, step
from test_decoding import BOS, EOS, PAD, POST_NORM, V, make_memory, make_model

WORDS = {f"w{i}": i for i in range(8, V)} | {"a": 5, "the": 6, "of": 7}     # ids 5..7 read as function words


@pytest.fixture(scope="module")
def model():
    return make_model(**POST_NORM)


def rules(**kw) -> Rules:
    return Rules(PAD, BOS, EOS, **kw)


def opts(**kw) -> DecodeOptions:
    return DecodeOptions(max_words=15, **kw).check(2, 4)


# ---------------------------------------------------------------- attention maps

@pytest.mark.parametrize("beam_size", [1, 3])
def test_every_map_sums_to_one_and_there_is_one_per_word_and_eos(model, beam_size):
    hyps = search(model, make_memory(5), opts(beam_size=beam_size, attention=True), rules())
    ended = 0
    for (h,) in hyps:
        assert h.maps.shape[1] == 9 and torch.allclose(h.maps.sum(-1), torch.ones(len(h.maps)), atol=1e-5)
        assert len(h.maps) in (len(h.ids), len(h.ids) + 1)         # + the map that chose <eos>
        ended += len(h.maps) == len(h.ids) + 1
    assert ended >= 2


@pytest.mark.parametrize("layer, head", [(None, None), (1, None), (0, 3)])
def test_cached_maps_equal_the_teacher_forced_attention_weights(model, layer, head):
    memory = make_memory(4)
    spec = AttentionSpec(layer, head)
    for image, (h,) in enumerate(search(model, memory, opts(attention=True, attention_layer=layer,
                                                            attention_head=head), rules())):
        tokens = torch.tensor([[BOS] + h.ids + [EOS]])[:, :len(h.maps)]   # the inputs that chose each word
        weights = []
        model.decode(memory[image:image + 1], tokens, attention=weights)   # per layer (1, H, T, L)
        expected = spec.reduce([w[0].transpose(0, 1) for w in weights])   # (T, L)
        assert torch.allclose(h.maps, expected, atol=1e-5)


def test_beam_size_one_gives_greedys_maps_and_words(model):
    memory = make_memory(6)
    greedy_hyps = sample_or_greedy(model, memory, rules(), 15, attention=AttentionSpec())
    beam_hyps = beam_search_hypotheses(model, memory, rules(), 15, beam_size=1, attention=AttentionSpec())
    for g, (b,) in zip(greedy_hyps, beam_hyps):
        assert g.ids == b.ids and torch.allclose(g.maps, b.maps, atol=1e-6)


def test_beam_maps_follow_the_back_pointers(model):
    """Each returned hypothesis's maps are those of its own words: rerun teacher-forced over its tokens."""
    memory = make_memory(3)
    for image, hyps in enumerate(search(model, memory, opts(beam_size=4, num_captions=3, attention=True), rules())):
        for h in hyps:
            weights = []
            tokens = torch.tensor([[BOS] + h.ids + [EOS]])[:, :len(h.maps)]
            model.decode(memory[image:image + 1], tokens, attention=weights)
            assert torch.allclose(h.maps, AttentionSpec().reduce([w[0].transpose(0, 1) for w in weights]), atol=1e-5)


def test_capturing_attention_leaves_the_logits_as_they_were(model):
    memory = make_memory(3)
    plain, kept = init_cache(model, memory), init_cache(model, memory)
    tokens = torch.full((3,), BOS)
    for word in (9, 11, 4):
        a, b = step(model, plain, tokens), step(model, kept, tokens, attention=[])
        assert torch.allclose(a, b, atol=1e-5)
        tokens = torch.full((3,), word)


# ---------------------------------------------------------------- n best

def test_num_captions_are_distinct_best_first_with_consistent_scores(model):
    hyps = search(model, make_memory(5), opts(beam_size=4, num_captions=3, length_penalty=1.0), rules())
    for image in hyps:
        assert len(image) == 3 and len({tuple(h.ids) for h in image}) == 3
        assert [h.score for h in image] == sorted((h.score for h in image), reverse=True)
        for h in image:
            length = len(h.ids) + (len(h.ids) < 15)               # <eos> counts when it ended
            assert h.score == pytest.approx(h.logprob / length)
    best_alone = search(model, make_memory(5), opts(beam_size=4), rules())
    assert [image[0].ids for image in hyps] == [image[0].ids for image in best_alone]


def test_captioner_returns_the_n_best_with_the_best_as_caption(tiny_run, shapes_dir):
    from captioning import Captioner
    captioner = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32")
    images = sorted((shapes_dir / "flickr30k_images").iterdir())[:3]
    for result in captioner.caption(images, beam_size=3, num_captions=3):
        assert len(result.captions) == 3 and result.caption == result.captions[0]["caption"]
        assert {"caption", "score", "logprob"} == set(result.captions[0])
        assert result.to_dict()["captions"] == result.captions


# ---------------------------------------------------------------- sampling

def test_sampling_with_one_seed_gives_the_same_captions_and_another_seed_others(model):
    memory = make_memory(6)

    def sample(seed, **kw):
        generator = torch.Generator().manual_seed(seed)
        return [[h.ids for h in image] for image in search(model, memory, opts(temperature=1.5, num_captions=2, **kw),
                                                           rules(), generator)]

    assert sample(0) == sample(0) and sample(0) != sample(1)
    greedy_ids = greedy(model, memory, BOS, EOS, 15)
    assert [image[0] for image in sample(3, top_k=1)] == greedy_ids           # top-1 sampling is greedy
    assert [image[0] for image in sample(4, top_p=1e-6)] == greedy_ids        # so is a nucleus of one word


def test_top_k_draws_only_among_the_k_likeliest(model):
    memory = make_memory(4)
    cache = init_cache(model, memory)
    first = rules().apply(step(model, cache, torch.full((4,), BOS)), [[]] * 4).topk(3, dim=-1).indices
    for seed in range(5):
        hyps = search(model, memory, opts(temperature=2.0, top_k=3), rules(), torch.Generator().manual_seed(seed))
        for row, (h,) in zip(first.tolist(), hyps):
            assert (h.ids[:1] or [EOS])[0] in row


# ---------------------------------------------------------------- what a caption may say

def test_no_repeat_ngram_size_means_no_repeated_ngram(model):
    memory = make_memory(8)
    plain = greedy(model, memory, BOS, EOS, 15)

    def bigrams(ids):
        return [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]

    assert any(len(set(bigrams(c))) < len(bigrams(c)) for c in plain)        # the plain model does repeat
    for beam_size in (1, 3):
        for (h,) in search(model, memory, opts(beam_size=beam_size, no_repeat_ngram_size=2),
                           rules(no_repeat_ngram_size=2)):
            assert len(set(bigrams(h.ids))) == len(bigrams(h.ids)), h.ids


def test_min_words_holds_and_function_words_never_end_a_caption(model):
    memory = make_memory(8)
    assert min(len(c) for c in greedy(model, memory, BOS, EOS, 15)) < 4
    endings = rules_for(DecodeOptions(min_words=4), PAD, BOS, EOS, WORDS)
    assert endings.banned_endings == frozenset({5, 6, 7}) and endings.min_words == 4
    for beam_size in (1, 3):
        for (h,) in search(model, memory, opts(beam_size=beam_size, min_words=4), endings):
            assert len(h.ids) >= 4
            assert len(h.ids) == 15 or h.ids[-1] not in (5, 6, 7)
    allowed = rules_for(DecodeOptions(allow_function_word_end=True), PAD, BOS, EOS, WORDS)
    assert allowed.banned_endings == frozenset()


def test_a_caption_that_would_end_on_a_banned_word_goes_on(model):
    """Ban the very words the plain captions end on: then none ends on them, and those captions go on."""
    memory = make_memory(8)
    plain = greedy(model, memory, BOS, EOS, 15)
    endings = frozenset(c[-1] for c in plain if 0 < len(c) < 15)
    assert endings
    held = [h for (h,) in search(model, memory, opts(), rules(banned_endings=endings))]
    for before, after in zip(plain, held):
        assert len(after.ids) == 15 or not after.ids or after.ids[-1] not in endings
        if 0 < len(before) < 15:
            assert after.ids[:len(before)] == before and len(after.ids) > len(before)
    logits = torch.zeros(2, V)
    applied = rules(banned_endings=frozenset({5})).apply(logits, [[9, 5], [5, 9]])
    assert applied[0, EOS] == float("-inf") and applied[1, EOS] == 0.0



def test_a_caption_cut_at_max_words_does_not_end_on_a_function_word_either(model):
    memory = make_memory(8)
    for max_words in (2, 3, 15):
        held = rules_for(DecodeOptions(max_words=max_words), PAD, BOS, EOS, WORDS)
        assert held.max_words == max_words
        for beam_size in (1, 3):
            for (h,) in search(model, memory, DecodeOptions(beam_size=beam_size, max_words=max_words), held):
                assert h.ids and h.ids[-1] not in (5, 6, 7), h.ids
    last = rules(banned_endings=frozenset({5, 6}), max_words=3).apply(torch.zeros(2, V), [[9, 8], [9]])
    assert (last[0, [5, 6]] == float("-inf")).all() and (last[1, [5, 6]] == 0).all()   # only the last word

# ---------------------------------------------------------------- batch size, precision

@pytest.mark.parametrize("kw", [{"beam_size": 3, "num_captions": 2, "no_repeat_ngram_size": 2},
                                {"min_words": 3}, {"attention": True, "beam_size": 2}])
def test_controls_give_the_same_captions_at_every_batch_size(model, kw):
    memory = make_memory(5)
    same = rules(min_words=kw.get("min_words", 0), no_repeat_ngram_size=kw.get("no_repeat_ngram_size", 0))
    batched = search(model, memory, opts(**kw), same)
    for i in range(5):
        alone = search(model, memory[i:i + 1], opts(**kw), same)
        assert [h.ids for h in alone[0]] == [h.ids for h in batched[i]]


def test_controls_run_in_bf16(model):
    memory = make_memory(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hyps = search(model, memory, opts(beam_size=2, num_captions=2, attention=True, no_repeat_ngram_size=2,
                                          min_words=2), rules(min_words=2, no_repeat_ngram_size=2))
    for image in hyps:
        assert len(image) == 2 and all(len(h.ids) >= 2 for h in image)
        assert torch.allclose(image[0].maps.sum(-1), torch.ones(len(image[0].maps)), atol=1e-2)


@pytest.mark.parametrize("bad, named", [
    ({"beam_size": 0}, "beam_size"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0.0}, "temperature"),
    ({"attention_layer": 2}, "attention_layer"), ({"temperature": 1.0, "beam_size": 3}, "beam_size")])
def test_bad_options_are_named(bad, named):
    with pytest.raises(ValueError, match=named):
        DecodeOptions(**bad).check(2, 4)
