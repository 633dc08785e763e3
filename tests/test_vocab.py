"""Tokenizer and vocabulary: exact thresholds, fixed ids, and a plain-list round trip."""
import json
import random

import pytest
import torch

from captioning.data.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocabulary, tokenize

CAPTIONS = [
    "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
    "Two young , White males are outside near many bushes .",
    "Two men in green shirts are standing in a yard .",
    "A man in a blue shirt standing in a garden .",
    "Two friends enjoy time spent together .",
]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Two young , White males are outside near many bushes .") == \
        ["two", "young", "white", "males", "are", "outside", "near", "many", "bushes"]
    assert tokenize('A man says "Hello, World!" (loudly); then-leaves...') == \
        ["a", "man", "says", "hello", "world", "loudly", "then", "leaves"]
    assert tokenize("A dog's ball.") == ["a", "dog's", "ball"]
    assert tokenize("3 DOGS") == ["3", "dogs"]
    assert tokenize(" .,;!? ") == []


def test_specials_come_first_with_ids_0_to_3():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    assert SPECIALS == (PAD, BOS, EOS, UNK) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert vocab.to_list()[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unk) == (0, 1, 2, 3)


def test_min_freq_threshold_is_exact():
    # "seen" 3 times, "twice" 2 times, "once" 1 time
    captions = ["seen twice once", "seen twice", "seen"]
    for min_freq, kept in [(1, {"seen", "twice", "once"}), (2, {"seen", "twice"}), (3, {"seen"}), (4, set())]:
        vocab = Vocabulary.build(captions, min_freq)
        assert set(vocab.to_list()[4:]) == kept, min_freq
        assert len(vocab) == 4 + len(kept)


def test_counts_are_over_words_not_captions_and_case_insensitive():
    vocab = Vocabulary.build(["Dog dog DOG."], min_freq=3)
    assert vocab.to_list()[4:] == ["dog"]


def test_words_by_frequency_then_alphabetically():
    vocab = Vocabulary.build(["b a c c", "c b z"], min_freq=1)
    assert vocab.to_list()[4:] == ["c", "b", "a", "z"]


def test_order_is_deterministic_and_independent_of_caption_order():
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != CAPTIONS
    a = Vocabulary.build(CAPTIONS, min_freq=1).to_list()
    assert a == Vocabulary.build(CAPTIONS, min_freq=1).to_list()
    assert a == Vocabulary.build(shuffled, min_freq=1).to_list()


def test_list_round_trip_encodes_identically():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    stored = json.loads(json.dumps(vocab.to_list()))  # what a checkpoint holds: a plain list of str
    assert all(type(t) is str for t in stored)
    again = Vocabulary.from_list(stored)
    assert again.to_list() == vocab.to_list()
    for text in CAPTIONS + ["a never seen word , zebra"]:
        assert again.encode(text) == vocab.encode(text)
    assert again.decode(vocab.encode(CAPTIONS[2])) == vocab.decode(vocab.encode(CAPTIONS[2]))


def test_to_list_is_a_copy():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    tokens = vocab.to_list()
    tokens.append("extra")
    assert "extra" not in vocab.to_list()


def test_unknown_word_gets_the_unk_id():
    vocab = Vocabulary.build(["a dog runs", "a dog sits"], min_freq=2)
    assert vocab.to_list()[4:] == ["a", "dog"]
    a, dog = vocab.index["a"], vocab.index["dog"]
    assert vocab.encode("A zebra dog runs") == [vocab.bos, a, vocab.unk, dog, vocab.unk, vocab.eos]


def test_encode_wraps_in_bos_eos_and_truncates_words():
    vocab = Vocabulary.build(["one two three four five"], min_freq=1)
    ids = [vocab.index[w] for w in ["one", "two", "three", "four", "five"]]
    assert vocab.encode("One two three four five .") == [1, *ids, 2]
    assert vocab.encode("One two three four five .", max_words=3) == [1, *ids[:3], 2]
    assert vocab.encode("One two three four five .", max_words=10) == [1, *ids, 2]
    assert vocab.encode("One two", max_words=0) == [1, 2]
    assert vocab.encode("...") == [1, 2]


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    vocab = Vocabulary.build(["a red circle", "a blue square"], min_freq=1)
    i = vocab.index
    ids = [vocab.bos, i["a"], vocab.pad, i["red"], i["circle"], vocab.eos, i["blue"], i["square"], vocab.pad]
    assert vocab.decode(ids) == "a red circle"
    assert vocab.decode(torch.tensor(ids)) == "a red circle"   # a row of model output works as well
    assert vocab.decode([i["a"], vocab.unk, i["square"]]) == "a <unk> square"  # no eos: to the end
    assert vocab.decode([vocab.eos, i["a"]]) == ""


def test_decode_inverts_encode_for_known_words():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    for text in CAPTIONS:
        assert vocab.decode(vocab.encode(text)) == " ".join(tokenize(text))


@pytest.mark.parametrize("tokens", [
    ["a", "b"],
    ["<bos>", "<pad>", "<eos>", "<unk>", "a"],       # specials in the wrong order
    ["<pad>", "<bos>", "<eos>", "a"],                # one special missing
    [],
])
def test_from_list_rejects_a_list_without_the_specials_first(tokens):
    with pytest.raises(ValueError, match="<pad>"):
        Vocabulary.from_list(tokens)


def test_from_list_rejects_repeated_tokens():
    with pytest.raises(ValueError, match="repeat"):
        Vocabulary.from_list(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"])
