"""Self-critical sequence training (Rennie et al. 2017): the loss of one batch, CIDEr-D as the reward.

For each image, `samples` captions are drawn from the model with the cached decoder (no gradient),
each is rewarded with its CIDEr-D against all of that image's references (reward.py), and the
baseline is the mean reward of the image's other samples (Luo 2020's "new SCST", the default) or the
reward of its greedy caption (Rennie et al.). One teacher-forced pass over the sampled captions then
gives their log-probabilities:

    loss = - sum_i (reward_i - baseline_i) * sum_t log p(w_it)  /  sum_i T_i

summed over each caption's words up to and including <eos> (a caption that learns to stop early is
rewarded or punished for the stop too: leaving <eos> out is how captions learn to end on "a"),
averaged over all the words of the batch. Not yet a config objective of train.py: the functions here
are what its SCST phase will call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoding import Rules, Sampling, sample_or_greedy
from .model import CaptionModel
from .reward import CiderD


@dataclass
class ScstStats:
    reward: float          # mean reward of the samples
    baseline: float        # mean baseline
    words: int             # words (with <eos>) the loss averages over


def advantages(rewards: torch.Tensor, samples: int, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (B*samples,), grouped by image -> reward minus baseline: the mean of the image's other
    samples, or its greedy caption's reward (greedy (B,)) when given."""
    r = rewards.view(-1, samples)                                      # (B, samples)
    if greedy is not None:
        baseline = greedy[:, None].expand_as(r)
    else:
        if samples < 2:
            raise ValueError("the mean-of-others baseline needs scst.samples >= 2")
        baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)
    return (r - baseline).reshape(-1), baseline.reshape(-1)


def caption_tokens(ids: list[list[int]], ended: list[bool], bos: int, eos: int, pad: int) -> torch.Tensor:
    """(N, T) <bos> w1 ... wn [<eos>] <pad>...: the sampled captions as a teacher-forced batch."""
    rows = [[bos, *w, *([eos] if e else [])] for w, e in zip(ids, ended)]
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def sequence_logprobs(model: CaptionModel, memory: torch.Tensor, tokens: torch.Tensor,
                      image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each caption's words and <eos>, (N,); their count, (N,)), with gradient."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logp = F.log_softmax(model.decode(memory, inputs, image_index).float(), -1)    # (N, T-1, V)
    real = targets != model.pad_id
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * real
    return picked.sum(1), real.sum(1)


def scst_loss(model: CaptionModel, memory: torch.Tensor, keys: list[str], cider: CiderD, rules: Rules,
              samples: int = 5, max_words: int = 20, baseline: str = "mean",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, ScstStats]:
    """The SCST loss of B images (memory (B, L, D), with gradient; keys: each image's key in `cider`)."""
    B, device = memory.size(0), memory.device
    with torch.no_grad():
        drawn = sample_or_greedy(model, memory.detach().repeat_interleave(samples, 0), rules, max_words,
                                 Sampling(generator=generator))
        ids = [h.ids for h in drawn]
        rewards = torch.tensor(cider.scores(ids, [k for k in keys for _ in range(samples)]), dtype=torch.float32)
        greedy = None
        if baseline == "greedy":
            best = sample_or_greedy(model, memory.detach(), rules, max_words)
            greedy = torch.tensor(cider.scores([h.ids for h in best], keys), dtype=torch.float32)
        advantage, base = advantages(rewards, samples, greedy)
    tokens = caption_tokens(ids, [h.ended for h in drawn], rules.bos, rules.eos, model.pad_id).to(device)
    index = torch.arange(B, device=device).repeat_interleave(samples)
    logp, words = sequence_logprobs(model, memory, tokens, index)
    loss = -(advantage.to(device) * logp).sum() / words.sum().clamp(min=1)
    return loss, ScstStats(float(rewards.mean()), float(base.mean()), int(words.sum()))
