"""Self-critical sequence training (Rennie et al. 2017): one batch's loss, CIDEr-D as the reward.

For each image, `samples` captions are drawn from the model with the cached decoder (no gradient),
each is rewarded with its CIDEr-D against all of that image's references (reward.py), and the
baseline is the mean reward of the image's other samples (Luo 2020's "new SCST", the default) or the
reward of its greedy caption (Rennie et al.). One teacher-forced pass over the sampled captions then
gives their log-probabilities:

    loss = - sum_i (reward_i - baseline_i) * sum_t log p(w_it)  /  sum_i T_i

summed over each caption's words up to and including <eos> (a caption that learns to stop early is
rewarded or punished for the stop too: leaving <eos> out is how captions learn to end on "a"),
averaged over all the words of the batch.

    drawn = draw(model, memory, keys, cider, rules)              # no gradient: the cached decoder
    logits = net(drawn.tokens[:, :-1], drawn.image_index, ...)    # with gradient: the training path
    loss, words = policy_loss(logits, drawn.tokens, drawn.advantage, pad)

`ScstObjective` is that, as train.py's objective for `train.objective: scst`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.vocab import tokenize
from ..decode.rules import Rules, Sampling
from ..decode.search import sample_or_greedy
from ..device import autocast
from ..model.caption_model import CaptionModel
from .reward import CiderD


@dataclass
class ScstStats:
    reward: float          # mean reward of the samples
    baseline: float        # mean baseline
    words: int             # words (with <eos>) the loss averages over


@dataclass
class Drawn:
    """The sampled captions of B images, `samples` each, as a teacher-forced batch."""
    tokens: torch.Tensor          # (B*samples, T) <bos> w1 ... wn [<eos>] <pad>...
    image_index: torch.Tensor     # (B*samples,) the image of each
    advantage: torch.Tensor       # (B*samples,) reward minus baseline
    reward: torch.Tensor          # (B*samples,)
    baseline: torch.Tensor        # (B*samples,)


def advantages(rewards: torch.Tensor, samples: int,
               greedy: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (B*samples,), grouped by image -> reward minus baseline: the mean of the image's
    other samples, or its greedy caption's reward (greedy (B,)) when given."""
    r = rewards.view(-1, samples)                                      # (B, samples)
    if greedy is not None:
        baseline = greedy[:, None].expand_as(r)
    else:
        if samples < 2:
            raise ValueError("the mean-of-others baseline needs scst.samples >= 2")
        baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)
    return (r - baseline).reshape(-1), baseline.reshape(-1)


def caption_tokens(ids: list[list[int]], ended: list[bool], bos: int, eos: int,
                   pad: int) -> torch.Tensor:
    """(N, T) <bos> w1 ... wn [<eos>] <pad>...: the sampled captions as a teacher-forced batch."""
    rows = [[bos, *w, *([eos] if e else [])] for w, e in zip(ids, ended)]
    width = max(map(len, rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


@torch.no_grad()
def draw(model: CaptionModel, memory: torch.Tensor, keys: list[str], cider: CiderD, rules: Rules,
         samples: int = 5, max_words: int = 20, baseline: str = "mean",
         generator: torch.Generator | None = None,
         greedy_ids: list[list[int]] | None = None) -> Drawn:
    """Sample `samples` captions per image of memory (B, L, D), reward them, and set their baselines
    (baseline greedy: the rewards of `greedy_ids`, each image's greedy caption, decoded here when
    not given)."""
    B, device = memory.size(0), memory.device
    drawn = sample_or_greedy(model, memory.repeat_interleave(samples, 0), rules, max_words,
                             Sampling(generator=generator))
    rewards = torch.tensor(cider.scores([h.ids for h in drawn],
                                        [k for k in keys for _ in range(samples)]),
                           dtype=torch.float32)
    greedy = None
    if baseline == "greedy":
        greedy_ids = greedy_ids or [h.ids for h in sample_or_greedy(model, memory, rules,
                                                                    max_words)]
        greedy = torch.tensor(cider.scores(greedy_ids, keys), dtype=torch.float32)
    advantage, base = advantages(rewards, samples, greedy)
    tokens = caption_tokens([h.ids for h in drawn], [h.ended for h in drawn], rules.bos, rules.eos,
                            model.pad_id)
    index = torch.arange(B, device=device).repeat_interleave(samples)
    return Drawn(tokens.to(device), index, advantage.to(device), rewards, base)


def _picked(logits: torch.Tensor, targets: torch.Tensor, pad: int,
            rules: Rules | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each target word (N, T), 0 at <pad>; and the real words' mask. With `rules`, <eos>
    is out of the first rules.min_words positions' distributions, as it was when they were drawn."""
    real = targets != pad
    logits = logits.float()
    if rules is not None and rules.min_words:
        logits = logits.clone()
        logits[:, :rules.min_words, rules.eos] = float("-inf")
    logp = F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * real, real


def policy_loss(logits: torch.Tensor, tokens: torch.Tensor, advantage: torch.Tensor,
                pad: int, rules: Rules | None = None) -> tuple[torch.Tensor, int]:
    """The SCST loss from the teacher-forced logits (N, T-1, V) of tokens (N, T); and the words it
    averages over."""
    picked, real = _picked(logits, tokens[:, 1:], pad, rules)
    words = int(real.sum())
    return -(advantage * picked.sum(1)).sum() / max(words, 1), words


def sequence_logprobs(model: CaptionModel, memory: torch.Tensor, tokens: torch.Tensor,
                      image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each caption's words and <eos>, (N,); their count, (N,)), with
    gradient."""
    picked, real = _picked(model.decode(memory, tokens[:, :-1], image_index), tokens[:, 1:],
                           model.pad_id)
    return picked.sum(1), real.sum(1)


def scst_loss(model: CaptionModel, memory: torch.Tensor, keys: list[str], cider: CiderD,
              rules: Rules, samples: int = 5, max_words: int = 20, baseline: str = "mean",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, ScstStats]:
    """The SCST loss of B images (memory (B, L, D), with gradient; keys: each image's key in
    `cider`)."""
    drawn = draw(model, memory.detach(), keys, cider, rules, samples, max_words, baseline,
                 generator)
    logits = model.decode(memory, drawn.tokens[:, :-1], drawn.image_index)
    loss, words = policy_loss(logits, drawn.tokens, drawn.advantage, model.pad_id, rules)
    return loss, ScstStats(float(drawn.reward.mean()), float(drawn.baseline.mean()), words)


class ScstObjective:
    """train.objective=scst: `objective(net, batch)` -> (loss, words, sums of the batch's rewards
    and baselines).

    Samples are drawn without gradient from the policy the loss differentiates: the model in train
    mode (dropout on, a trained backbone's BatchNorm on the batch), with a generator seeded by
    (`seed`, `step()`) so a resumed run draws the same. The greedy baseline is the test-time
    caption, so it is decoded in eval mode. The teacher-forced pass goes through `net` (DDP with
    several processes, so gradients are averaged over them).
    """

    def __init__(self, model: CaptionModel, cider: CiderD, rules: Rules, samples: int,
                 max_words: int, baseline: str, precision: str, device: torch.device, seed: int = 0,
                 step=None):
        self.model, self.cider, self.rules = model, cider, rules
        self.samples, self.max_words, self.baseline = samples, max_words, baseline
        self.precision, self.device, self.seed, self.step = precision, device, seed, step

    def _memory(self, batch) -> torch.Tensor:
        inputs = batch.model_inputs()
        return (self.model.memory(inputs["features"]) if "features" in inputs
                else self.model.encode(inputs["images"]))

    def _greedy(self, batch) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()
        try:
            return [h.ids for h in sample_or_greedy(self.model, self._memory(batch), self.rules,
                                                    self.max_words)]
        finally:
            self.model.train(was_training)

    def _sample(self, batch) -> Drawn:
        generator = None
        if self.step is not None:
            generator = torch.Generator(self.device).manual_seed(
                (self.seed * 1_000_033 + self.step()) % 2 ** 62)
        with torch.no_grad(), autocast(self.precision, self.device):
            greedy = self._greedy(batch) if self.baseline == "greedy" else None
            return draw(self.model, self._memory(batch), batch.names, self.cider, self.rules,
                        self.samples, self.max_words, self.baseline, generator, greedy)

    def __call__(self, net: torch.nn.Module, batch) -> tuple[torch.Tensor, int, dict]:
        drawn = self._sample(batch)
        with autocast(self.precision, self.device):
            logits = net(drawn.tokens[:, :-1], drawn.image_index, **batch.model_inputs())
        loss, words = policy_loss(logits, drawn.tokens, drawn.advantage, self.model.pad_id)
        return loss, words, {"reward": float(drawn.reward.sum()),
                             "baseline": float(drawn.baseline.sum()),
                             "samples": drawn.reward.numel()}


def reference_ids(dataset, vocab) -> dict[str, list[list[int]]]:
    """image name -> the token ids of its captions (no <bos>/<eos>), as CiderD.build takes them.

    A word the vocabulary lacks gets its own id below 0, which no sample can have: a sampled <unk>
    matches nothing, as coco-caption's CIDEr-D (on the words themselves) would score it.
    """
    unknown: dict[str, int] = {}

    def ids(caption: str) -> list[int]:
        return [vocab.index.get(w) if w in vocab.index else unknown.setdefault(w, -1 - len(unknown))
                for w in tokenize(caption)]
    return {name: [ids(c) for c in refs] for name, refs in zip(dataset.names, dataset.references)}
