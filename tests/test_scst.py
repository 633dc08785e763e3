"""The self-critical loss: baselines, the words it averages over (with <eos>), and that a step on it makes
the better-rewarded captions likelier."""
import pytest
import torch

from captioning.decode.rules import Rules, Sampling
from captioning.decode.search import sample_or_greedy
from captioning.train.reward import CiderD
from captioning.train.scst import advantages, caption_tokens, scst_loss, sequence_logprobs
from test_decoding import BOS, EOS, PAD, POST_NORM, make_memory, make_model


def test_mean_baseline_is_the_mean_of_the_images_other_samples_and_greedy_is_given():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    advantage, baseline = advantages(rewards, samples=3)
    assert baseline.tolist() == [2.5, 2.0, 1.5, 10.0, 10.0, 10.0]
    assert advantage.tolist() == [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]
    advantage, baseline = advantages(rewards, 3, greedy=torch.tensor([2.0, 9.0]))
    assert advantage.tolist() == [-1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="samples >= 2"):
        advantages(rewards, 1)


def test_teacher_forced_logprobs_count_eos_and_equal_the_samplers():
    model = make_model(**POST_NORM)
    memory = make_memory(3)
    sampling = Sampling(generator=torch.Generator().manual_seed(0))
    drawn = sample_or_greedy(model, memory, Rules(PAD, BOS, EOS), 15, sampling)
    tokens = caption_tokens([h.ids for h in drawn], [h.ended for h in drawn], BOS, EOS, PAD)
    with torch.no_grad():
        logp, words = sequence_logprobs(model, memory, tokens, torch.arange(3))
    assert words.tolist() == [len(h.ids) + h.ended for h in drawn]
    assert any(h.ended for h in drawn)
    # the sampler's own log-probabilities (the rules only ban <pad>/<bos>, which the samples never are)
    expected = torch.tensor([h.logprob for h in drawn])
    full = torch.log_softmax(model.decode(memory, tokens[:, :-1], torch.arange(3)).float()
                             .index_fill(-1, torch.tensor([PAD, BOS]), float("-inf")), -1)
    picked = torch.where(tokens[:, 1:] != PAD, full.gather(-1, tokens[:, 1:, None]).squeeze(-1), 0.0)
    assert picked.sum(1).tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    # without the ban, <pad> and <bos> keep a little of the mass: never more likely than the sampler's
    assert (logp <= expected + 1e-5).all() and (logp < expected).any()


def test_a_step_on_the_loss_raises_the_reward():
    """References that favour some words: SCST steps make the sampled captions' mean CIDEr-D rise."""
    torch.manual_seed(0)
    model = make_model(**POST_NORM).train()
    for module in model.modules():                  # no dropout: the test follows the reward alone
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    memory = make_memory(4)
    keys = ["a", "b", "c", "d"]
    # each image its own words (an n-gram in every image's references would weigh nothing: idf 0)
    cider = CiderD.build({k: [[w, w + 1, w + 2, w + 3], [w, w + 1, w + 2], [w + 1, w + 2, w + 3]]
                          for k, w in zip(keys, (9, 15, 21, 27))})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rules = Rules(PAD, BOS, EOS)
    generator = torch.Generator().manual_seed(1)
    rewards = []
    for _ in range(25):
        loss, stats = scst_loss(model, memory, keys, cider, rules, samples=5, max_words=8, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(stats.reward)
        assert stats.words > 0
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.5, rewards
