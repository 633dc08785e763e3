"""The cached decoder against the training path, and greedy/beam search invariants.

Random weights give near-uniform next-word distributions, so every model here
has its head scaled up: argmax and beams then depend on the image and on the
words so far, and the tests first check that the captions really differ and
end at different lengths, so they cannot pass vacuously.
"""
import pytest
import torch

from captioning.config import ModelConfig
from captioning.decode.search import beam_search, greedy
from captioning.decode.torch_engine import greedy_reference
from captioning.model.caption_model import build_model, init_cache, step

V, PAD, BOS, EOS = 40, 0, 1, 2
D, L = 64, 9


def make_model(seed=0, norm_first=False, eos_bias=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", pretrained=False, d_model=D, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=2, dim_feedforward=128, dropout=0.1, max_tokens=32)
    model = build_model(cfg, V, pad_id=PAD).eval()
    for layer in model.transformer.decoder.layers:
        layer.norm_first = norm_first      # same weights, the other residual arrangement
    model.head.weight.data *= 4            # peaky distributions (see the module docstring)
    model.head.bias.data[EOS] += eos_bias  # make captions end sooner or later
    return model


def make_memory(B, seed=1, dtype=torch.float32):
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


# seed and <eos> bias picked to give varied captions (which assert_nontrivial checks)
POST_NORM = {"seed": 7, "eos_bias": 3.0}


@pytest.fixture(scope="module")
def model():
    return make_model(**POST_NORM)


def assert_nontrivial(captions, max_len):
    """Captions differ across images, and at least two stop at <eos> at different lengths."""
    assert len({tuple(c) for c in captions}) > 1, captions
    ended = {len(c) for c in captions if len(c) < max_len}
    assert len(ended) >= 2, captions


def log_prob(model, memory, ids, finished=True):
    """Sum of log-probs of ids (+ <eos>) for one image, by the training path, <pad> and <bos> excluded as in
    decoding."""
    tokens = torch.tensor([[BOS] + ids + [EOS] * finished])
    logits = model.decode(memory[None], tokens[:, :-1])[0].float()
    logits[:, [PAD, BOS]] = float("-inf")
    return logits.log_softmax(-1).gather(1, tokens[0, 1:, None]).sum().item()


# -- the cached decoder holds the training path's logits


@pytest.mark.parametrize("norm_first", [False, True])
def test_step_matches_decode_at_every_position(norm_first):
    model = make_model(norm_first=norm_first)
    B, T = 3, 10
    memory = make_memory(B)
    tokens = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = BOS
    cache = init_cache(model, memory)
    # read at every step: as strided views (slices of the packed k/v projection) each step's product would copy them
    assert all(k.is_contiguous() and v.is_contiguous() for k, v in zip(cache.cross_k, cache.cross_v))
    with torch.no_grad():
        for t in range(T):
            got = step(model, cache, tokens[:, t])                         # (B, V)
            want = model.decode(memory, tokens[:, :t + 1])[:, -1]
            assert cache.length == t + 1
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the check has teeth: another memory gives other logits
        other = model.decode(make_memory(B, seed=9), tokens)[:, -1]
        assert (got - other).abs().max() > 1e-2


def test_grouped_cache_and_reordering_match_decode():
    """K sequences per image sharing its keys, then reordered as beam search does: same logits as the training path."""
    model = make_model()
    M, K, T = 2, 3, 6
    memory = make_memory(M)
    tokens = torch.randint(3, V, (M * K, T), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = BOS
    cache = init_cache(model, memory, group=K)
    assert cache.group == K
    rows_memory = memory.repeat_interleave(K, dim=0)                       # (M*K, L, D)
    with torch.no_grad():
        for t in range(T):
            if t == 3:                                                     # beams swap places within each image
                order = torch.tensor([2, 0, 0, 4, 5, 3])
                cache, tokens = cache.select(order), tokens[order]
            got = step(model, cache, tokens[:, t])
            want = model.decode(rows_memory, tokens[:, :t + 1])[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # dropping image 0 keeps image 1's rows right
        cache = cache.select(torch.tensor([3, 4, 5]), torch.tensor([1]))
        nxt = torch.randint(3, V, (3, 1), generator=torch.Generator().manual_seed(4))
        got = step(model, cache, nxt[:, 0])
        want = model.decode(rows_memory[3:], torch.cat([tokens[3:], nxt], 1))[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cached_decoding_feeds_each_position_once(model, monkeypatch):
    fed = []                                                               # ((rows, T), offset) of every call
    embed = model.embed_tokens

    def counting_embed(tokens, offset=0):
        fed.append((tuple(tokens.shape), offset))
        return embed(tokens, offset)

    monkeypatch.setattr(model, "embed_tokens", counting_embed)
    memory = make_memory(6)
    captions = greedy(model, memory, BOS, EOS, max_words=12)
    assert all(T == 1 for (_, T), _ in fed)                               # one new word per sequence per step
    assert [offset for _, offset in fed] == list(range(len(fed)))          # positions 0, 1, 2, ...
    steps = max(len(c) + 1 for c in captions)
    assert len(fed) == min(steps, 12)
    # finished sequences leave the batch: rows fed = words + <eos> of each caption
    assert sum(n for (n, _), _ in fed) == sum(min(len(c) + 1, 12) for c in captions)


# -- greedy


def test_greedy_matches_reference_and_stops_at_own_eos(model):
    memory = make_memory(8)
    cached = greedy(model, memory, BOS, EOS, max_words=15)
    assert cached == greedy_reference(model, memory, BOS, EOS, max_words=15)
    assert_nontrivial(cached, 15)
    assert all(EOS not in c and BOS not in c and PAD not in c for c in cached)


# seeds and biases picked to give varied captions, which assert_nontrivial checks
@pytest.mark.parametrize("norm_first, seed, eos_bias", [(False, 7, 3.0), (True, 1, 4.0)])
def test_greedy_batched_equals_one_at_a_time(norm_first, seed, eos_bias):
    model = make_model(seed=seed, norm_first=norm_first, eos_bias=eos_bias)
    memory = make_memory(6, seed=5)
    batched = greedy(model, memory, BOS, EOS, max_words=15)
    assert batched == [greedy(model, memory[i:i + 1], BOS, EOS, max_words=15)[0] for i in range(6)]
    assert batched == greedy_reference(model, memory, BOS, EOS, max_words=15)
    assert_nontrivial(batched, 15)


def test_greedy_max_len_cuts_and_too_long_raises(model):
    memory = make_memory(4)
    assert all(len(c) <= 3 for c in greedy(model, memory, BOS, EOS, max_words=3))
    never = -1                                                # an <eos> no argmax gives: always max_len words
    assert [len(c) for c in greedy(model, memory, BOS, never, max_words=32)] == [32] * 4
    with pytest.raises(ValueError, match="max_tokens"):
        greedy(model, memory, BOS, never, max_words=33)
    assert greedy(model, memory[:0], BOS, EOS, 5) == [] and beam_search(model, memory[:0], BOS, EOS, 5) == []


def test_bf16_autocast_runs_and_mostly_agrees(model):
    memory = make_memory(8)
    fp32 = greedy(model, memory, BOS, EOS, max_words=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = init_cache(model, memory.bfloat16())
        assert cache.cross_k[0].dtype == torch.bfloat16
        bf16 = greedy(model, memory.bfloat16(), BOS, EOS, max_words=15)
        beams = beam_search(model, memory.bfloat16(), BOS, EOS, max_words=15, beam_size=3)
    assert len(beams) == 8 and all(len(b) == 1 for b in beams)
    # compare the first few words, before a single flip sends a caption elsewhere
    pairs = [(a, b) for x, y in zip(fp32, bf16) for a, b in zip(x[:3], y[:3])]
    assert len(pairs) >= 12
    assert sum(a == b for a, b in pairs) >= 0.7 * len(pairs)
    # a model cast to bf16, no autocast
    model16 = make_model(**POST_NORM).bfloat16()
    out = greedy(model16, memory.bfloat16(), BOS, EOS, max_words=15)
    assert sum(a == b for x, y in zip(fp32, out) for a, b in zip(x[:3], y[:3])) >= 0.7 * len(pairs)


# -- beam search


def test_beam_size_one_is_greedy(model):
    memory = make_memory(8)
    for max_len in (4, 15):
        beams = beam_search(model, memory, BOS, EOS, max_len, beam_size=1)
        assert [b[0][0] for b in beams] == greedy(model, memory, BOS, EOS, max_len)
    assert_nontrivial([b[0][0] for b in beams], 15)


def test_beam_batched_equals_one_at_a_time(model):
    memory = make_memory(5, seed=4)
    batched = beam_search(model, memory, BOS, EOS, max_words=12, beam_size=4, n_best=2)
    alone = [beam_search(model, memory[i:i + 1], BOS, EOS, max_words=12, beam_size=4, n_best=2)[0] for i in range(5)]
    assert [[ids for ids, _ in b] for b in batched] == [[ids for ids, _ in b] for b in alone]
    for b, a in zip(batched, alone):
        assert [s for _, s in b] == pytest.approx([s for _, s in a], abs=1e-4)
    assert_nontrivial([b[0][0] for b in batched], 12)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_scores_are_right_and_beat_greedy(model, length_penalty):
    B, max_len = 8, 15
    memory = make_memory(B, seed=1)
    beams = beam_search(model, memory, BOS, EOS, max_len, beam_size=4, length_penalty=length_penalty, n_best=3)
    greedy_ids = greedy(model, memory, BOS, EOS, max_len)

    def norm(ids):
        return (len(ids) + 1) ** length_penalty

    unfinished, compared, better = 0, 0, 0
    for i in range(B):
        hyps = beams[i]
        assert len(hyps) == 3 and len({tuple(ids) for ids, _ in hyps}) == 3                # distinct
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)         # best first
        for ids, s in hyps:                                                                # scored as documented
            if len(ids) == max_len:                                                        # a live beam filling in
                unfinished += 1
                assert s == pytest.approx(log_prob(model, memory[i], ids, False) / len(ids) ** length_penalty, abs=1e-4)
            else:
                assert s == pytest.approx(log_prob(model, memory[i], ids) / norm(ids), abs=1e-4)
        if len(greedy_ids[i]) < max_len:               # greedy's caption is a finished hypothesis too
            g = log_prob(model, memory[i], greedy_ids[i]) / norm(greedy_ids[i])
            assert hyps[0][1] >= g - 1e-5
            compared += 1
            better += hyps[0][1] > g + 1e-5
    assert unfinished < 3 * B and compared >= 3
    assert better > 0                                         # the search found more than greedy did


def test_beam_without_eos_returns_best_unfinished(model):
    memory = make_memory(3)
    beams = beam_search(model, memory, BOS, -1, max_words=5, beam_size=3, length_penalty=0.0, n_best=2)
    for hyps in beams:
        assert len(hyps) == 2 and all(len(ids) == 5 for ids, _ in hyps)
        assert hyps[0][1] >= hyps[1][1]
    assert [b[0][0] for b in beam_search(model, memory, BOS, -1, max_words=5, beam_size=1)] == \
        greedy(model, memory, BOS, -1, max_words=5)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, memory, BOS, EOS, max_words=5, beam_size=2, n_best=3)
