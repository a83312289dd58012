"""Checks for chapter 04's exercises: HF `tokenizers` judges the byte table (4.1), encoding one word (4.4) and
the trainer (4.5); counting and merging (4.2, 4.3) are judged by references that work differently from the
obvious loop (a Counter over zipped neighbours, and `str.replace`, which also replaces left to right without
overlaps)."""

import json
import os
import random
from collections import Counter

from minillm.exercises import Mismatch, check

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF: one thread, and no warning after a fork


def _hf_byte_table() -> dict[int, str]:
    """Byte -> character as HF's ByteLevel pre-tokenizer writes it, for all 256 bytes.

    HF shows the character of every byte that occurs in UTF-8 when it pre-tokenizes one character per lead
    byte; the 13 bytes that never occur (0xC0, 0xC1, 0xF5-0xFF) get the 13 characters of HF's alphabet that
    are left, in order.
    """
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table = {}
    lead_bytes_examples = [0x800, *range(0x1000, 0x10000, 0x1000), 0x10000, *range(0x40000, 0x110000, 0x40000)]
    for code_point in [*range(0x800), *lead_bytes_examples]:
        char = chr(code_point)
        ((piece, _),) = splitter.pre_tokenize_str(char)
        table.update(zip(char.encode("utf-8"), piece))
    unseen_bytes = sorted(set(range(256)) - set(table))
    unused_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(table.values()))
    table.update(zip(unseen_bytes, unused_chars))
    return dict(sorted(table.items()))


def check_bytes_to_unicode(bytes_to_unicode) -> None:
    """Exercise 4.1: GPT-2's table from the 256 byte values to printable characters."""

    def run():
        got = bytes_to_unicode()
        if not isinstance(got, dict):
            raise Mismatch(f"expected a dict {{byte: character}}, got {type(got).__name__}")
        expected = _hf_byte_table()
        missing = [byte for byte in expected if byte not in got]
        if missing:
            raise Mismatch(f"{len(missing)} of the 256 bytes are missing as keys, the first is {missing[0]}")
        for byte, char in expected.items():
            if got[byte] != char:
                raise Mismatch(f"byte {byte} ({bytes([byte])!r}): expected {char!r}, got {got[byte]!r}")
        if len(got) != 256:
            raise Mismatch(f"expected exactly the 256 keys 0..255, got {len(got)} keys")

    check("Exercise 4.1 (bytes_to_unicode)", [run],
          hint="bytes in '!'..'~', '¡'..'¬' and '®'..'ÿ' stand for themselves (chr(byte)); the other 68 bytes, "
               "taken in increasing order, get chr(256), chr(257), ... - so byte 0 is 'Ā' and the space (32) is 'Ġ'")


def check_get_pair_counts(get_pair_counts) -> None:
    """Exercise 4.2: how often each adjacent pair occurs, over words that each occur `count` times."""
    rng = random.Random(42)

    def case(word_counts):
        def run():
            expected = Counter()
            for word, count in word_counts.items():
                for pair in zip(word, word[1:]):
                    expected[pair] += count
            got = get_pair_counts(dict(word_counts))
            if not isinstance(got, dict):
                raise Mismatch(f"expected a dict {{pair: count}}, got {type(got).__name__}")
            got = {pair: n for pair, n in got.items() if n != 0}  # a pair counted 0 times may be left out
            for pair in sorted(set(expected) | set(got), key=str):
                if got.get(pair, 0) != expected.get(pair, 0):
                    raise Mismatch(f"for words {_short(word_counts)}: pair {pair!r} expected count "
                                   f"{expected.get(pair, 0)}, got {got.get(pair, 0)}")
        return run

    random_words = {tuple(rng.randrange(6) for _ in range(rng.randint(1, 8))): rng.randint(1, 50) for _ in range(30)}
    cases = [case({(1, 2, 3): 1}), case({(1, 2, 3): 5, (2, 3): 2, (7,): 9}), case({(4, 4, 4, 4): 3}),
             case({}), case(random_words)]
    check("Exercise 4.2 (get_pair_counts)", cases,
          hint="for each word, zip(word, word[1:]) gives its adjacent pairs; add the word's count (not 1) for "
               "each, and count a pair again each time it repeats inside a word ((4, 4, 4) has (4, 4) twice)")


def check_merge(merge) -> None:
    """Exercise 4.3: replace every occurrence of `pair` in `ids` by `new_id`, left to right."""
    rng = random.Random(43)

    def reference(ids, pair, new_id):
        # Map ids to characters so that str.replace (left to right, no overlaps) does the merge.
        text = "".join(chr(0x4E00 + i) for i in ids).replace(chr(0x4E00 + pair[0]) + chr(0x4E00 + pair[1]),
                                                             chr(0x4E00 + new_id))
        return [ord(char) - 0x4E00 for char in text]

    def case(ids, pair, new_id):
        def run():
            expected = reference(ids, pair, new_id)
            got = merge(list(ids), pair, new_id)
            if not isinstance(got, list):
                raise Mismatch(f"expected a list of ids, got {type(got).__name__}")
            if got != expected:
                raise Mismatch(f"merge({ids}, {pair}, {new_id}): expected {expected}, got {got}")
        return run

    random_ids = [rng.randrange(4) for _ in range(40)]
    cases = [case([1, 2, 3, 1, 2], (1, 2), 9), case([5, 6], (5, 6), 7), case([3, 3, 3], (3, 3), 8),
             case([3, 3, 3, 3], (3, 3), 8), case([1, 2, 3], (2, 1), 9), case([], (1, 2), 9),
             case([4, 1, 2], (1, 2), 9), case(random_ids, (random_ids[0], random_ids[1]), 10)]
    check("Exercise 4.3 (merge)", cases,
          hint="walk with an index i: if ids[i], ids[i + 1] is the pair, append new_id and jump 2, else append "
               "ids[i] and step 1; don't forget the last id, and never merge overlapping pairs ((3, 3) in 3 3 3 "
               "gives [8, 3])")


def check_encode_word(encode_word) -> None:
    """Exercise 4.4: split one pre-token into tokens by replaying ranked merges, as HF's BPE model does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from minillm.data import generate_stories

    def hf_model(merges):
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {token: i for i, token in enumerate(dict.fromkeys(alphabet + [a + b for a, b in merges]))}
        return models.BPE(vocab, merges)

    def case(word, merges):
        def run():
            expected = [token.value for token in hf_model(merges).tokenize(word)]
            got = encode_word(word, list(merges))
            if got != expected:
                raise Mismatch(f"encode_word({word!r}) with {len(merges)} merges: expected {expected}, got {got}")
        return run

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([story.text for story in generate_stories(200, seed=44)],
                                trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    story_merges = [tuple(merge) for merge in json.loads(trained.to_str())["model"]["merges"]]
    cases = [case("abc", [("b", "c"), ("a", "b")]),  # rank order, not left to right: a + bc
             case("aaaa", [("a", "a"), ("aa", "aa")]),
             case("Ġlantern", story_merges), case("Ġthe", story_merges), case("Ġunbelievable", story_merges),
             case("ĠcafÃ©", story_merges), case("x", story_merges), case("ĠĠĠĠĠ", story_merges)]
    check("Exercise 4.4 (encode one word)", cases,
          hint="start from the single characters; repeatedly find the adjacent pair that comes earliest in "
               "merges (the leftmost one if it occurs twice) and join it; stop when no adjacent pair is a merge. "
               "Merging left to right or in a single pass gives different tokens")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_train_merges(train_merges) -> None:
    """Exercise 4.5: a from-scratch BPE trainer (recounting every pair each step), judged by HF's BpeTrainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from minillm.data import generate_stories
    from minillm.tokenizer import pre_tokenize

    def hf_merges(texts, num_merges):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        return [tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"]]

    def case(texts, num_merges):
        def run():
            # The learner gets what HF's trainer counts: each pre-token (in byte characters) and how often.
            word_counts = dict(Counter(piece for text in texts for piece in pre_tokenize(text)))
            expected = hf_merges(texts, num_merges)
            got = train_merges(word_counts, num_merges)
            if not isinstance(got, list):
                raise Mismatch(f"expected a list of (left, right) pairs, got {type(got).__name__}")
            got = [tuple(merge) for merge in got]
            for rank, (want, have) in enumerate(zip(expected, got)):
                if want != have:
                    raise Mismatch(f"merge {rank} of {len(expected)} on {_short(texts, 50)}: "
                                   f"expected {want!r}, got {have!r}")
            if len(got) != len(expected):
                raise Mismatch(f"expected {len(expected)} merges, got {len(got)}")
        return run

    toy = ["low " * 5 + "lower " * 2 + "newest " * 6 + "widest " * 3]
    stories = [story.text for story in generate_stories(60, seed=45)]
    cases = [case(toy, 10), case([" x", "ab"], 1), case(["aaaa aaa", "héhé 東京東京"], 6), case(stories, 80),
             case(["ab"], 5)]
    check("Exercise 4.5 (train merges)", cases,
          hint="each step: count pairs over words weighted by their counts (4.2), take the highest count and on "
               "ties the smallest (left id, right id), where ids are the 256 byte characters sorted by code point "
               "followed by each new token in order; merge it everywhere (4.3); stop early when no pair is left")
