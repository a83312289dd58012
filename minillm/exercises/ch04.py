"""Checks for chapter 04's exercises. HF `tokenizers` judges the two build exercises, BPE training (4.1,
`learn_merges`) and encoding one pre-token (4.2, `BPETokenizer.apply_merges`), and the byte table (4.3); counting
and merging (4.4, 4.5) are judged by references that work differently from the obvious loop (a Counter over zipped
neighbours, and `str.replace`, which also replaces left to right without overlaps).

Plugged in with `use(learn_merges=...)` or `use(apply_merges=...)`, `end_to_end_tokenizer()` re-runs the chapter's
cross-check (section 7): a `BPETokenizer` trained on the stories must have HF's vocabulary, merges and ids.
"""

import json
import os
import random
from collections import Counter

from minillm.exercises import Mismatch, check, exercise, verdict

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


def _hf_trainer_result(texts, vocab_size: int, special_tokens=()) -> tuple[list[str], list[tuple[str, str]]]:
    """HF's byte-level BpeTrainer on `texts`: its vocabulary in id order and its merges in the order learned."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    vocab = tokenizer.get_vocab()
    merges = [tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"]]
    return sorted(vocab, key=vocab.get), merges


def _story_texts(count: int, seed: int) -> list[str]:
    from minillm.data import generate_stories

    return [story.text for story in generate_stories(count, seed=seed)]


@exercise("4.1", "BPE training", kind="build", component="learn_merges", replaces="minillm.tokenizer:learn_merges",
          hides=("tk.learn_merges",))
def check_learn_merges(learn_merges) -> None:
    """Exercise 4.1: `learn_merges(word_counts, tokens, vocab_size)`, judged by HF's BpeTrainer on the same texts."""
    from minillm.tokenizer import BYTE_TO_CHAR, pre_tokenize

    def case(texts, vocab_size, special_tokens=()):
        def run():
            # The learner gets what HF's trainer counts: each pre-token (in byte characters) and how often.
            word_counts = dict(Counter(piece for text in texts for piece in pre_tokenize(text)))
            tokens = list(special_tokens) + sorted(BYTE_TO_CHAR.values())
            expected_tokens, expected = _hf_trainer_result(texts, vocab_size, special_tokens)
            got = learn_merges(word_counts, tokens, vocab_size)
            what = f"vocab_size={vocab_size} on {_short(texts, 50)}"
            if not isinstance(got, list):
                raise Mismatch(f"{what}: expected a list of (left, right) pairs, got {type(got).__name__}")
            got = [tuple(merge) if isinstance(merge, (list, tuple)) else merge for merge in got]
            for rank, (want, have) in enumerate(zip(expected, got)):
                if want != have:
                    raise Mismatch(f"{what}: merge {rank} of {len(expected)}: expected {want!r}, got {have!r}")
            if len(got) != len(expected):
                raise Mismatch(f"{what}: expected {len(expected)} merges, got {len(got)}")
            for i, (want, have) in enumerate(zip(expected_tokens, tokens)):
                if want != have:
                    raise Mismatch(f"{what}: tokens[{i}] (the token with id {i}) expected {want!r}, got {have!r}")
            if len(tokens) != len(expected_tokens):
                raise Mismatch(f"{what}: `tokens` should end with {len(expected_tokens)} entries (one per id), "
                               f"has {len(tokens)}")
        return run

    toy = ["low " * 5 + "lower " * 2 + "newest " * 6 + "widest " * 3]
    cases = [case(toy, 266), case([" x", "ab"], 257), case(["aaaa aaa", "héhé 東京東京"], 262),
             case(_story_texts(60, seed=45), 336), case(["ab"], 261),
             case(_story_texts(20, seed=46), 300, special_tokens=["<|endoftext|>", "<pad>"])]
    check("4.1", cases,
          hint="each step merges the most frequent adjacent pair, counting a word as often as it occurs; ties go to "
               "the smaller pair of ids, and ids are positions in `tokens`, which grows by one token per merge",
          more="count pairs over all words (weighted by their counts), pick the best by (highest count, then "
               "smallest (left id, right id)), append left + right to `tokens`, record (left, right) as strings and "
               "replace the pair in every word, left to right without overlaps. Stop when `tokens` has vocab_size "
               "entries or no word has two tokens left. Exercises 4.4 and 4.5 are the two halves of a step.")


def _bpe_twins(merges):
    """Our BPETokenizer and HF's BPE model over the same vocabulary: 256 byte characters, then each merge's token."""
    from tokenizers import models, pre_tokenizers

    from minillm.tokenizer import BPETokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(dict.fromkeys(alphabet + [a + b for a, b in merges]))}
    return BPETokenizer(vocab, merges), models.BPE(vocab, merges)


@exercise("4.2", "BPE encoding", kind="build", component="apply_merges",
          replaces="minillm.tokenizer:BPETokenizer.apply_merges", hides=("BPETokenizer.apply_merges",))
def check_apply_merges(apply_merges) -> None:
    """Exercise 4.2: `BPETokenizer.apply_merges(self, ids)` on one pre-token, judged by HF's BPE model."""

    def case(word, merges):
        def run():
            ours, theirs = _bpe_twins(merges)
            expected = [token.id for token in theirs.tokenize(word)]
            ids = [ours.vocab[char] for char in word]
            got = apply_merges(ours, list(ids))
            what = f"apply_merges on {word!r} (ids {_short(ids, 40)}) with {len(merges)} merges"
            if not (isinstance(got, list) and all(isinstance(i, int) for i in got)):
                raise Mismatch(f"{what}: expected a list of int ids, got {_short(got, 60)}")
            if got != expected:
                names = {i: token for token, i in ours.vocab.items()}
                spelled = [names.get(i, f"<unknown id {i}>") for i in got]
                raise Mismatch(f"{what}: expected tokens {[names[i] for i in expected]} (ids {expected}), "
                               f"got {spelled} (ids {got})")
        return run

    _, story_merges = _hf_trainer_result(_story_texts(200, seed=44), 500)
    cases = [case("abc", [("b", "c"), ("a", "b")]),  # rank order, not left to right: a + bc
             case("aaaa", [("a", "a"), ("aa", "aa")]),
             case("Ġlantern", story_merges), case("Ġthe", story_merges), case("Ġunbelievable", story_merges),
             case("ĠcafÃ©", story_merges), case("x", story_merges), case("ĠĠĠĠĠ", story_merges)]
    check("4.2", cases,
          hint="the merge learned earliest wins wherever it sits in the word; the leftmost pair is not the point",
          more="a merge's rank is its position in self.merges. Repeatedly find, among the adjacent pairs of ids, "
               "the one whose (left token, right token) has the lowest rank (the leftmost of equal ranks), replace "
               "it by the id of the joined token (self.vocab[left + right]), and stop when no adjacent pair is a "
               "merge. Joining pairs in one left-to-right pass gives tokens that training never made.")


# --- the plugged-in end-to-end check: the chapter's cross-check with HF (section 7) -------------------------------

UNSEEN_EXTRAS = ["Hello world, it's 2024!", "a   b\n\nc  ", "東京 🎉🎉 ok!!", "x\u00a0y\r\nz", "can't won't I'm",
                 "👩‍👩‍👧 family", "tabs\t\tand  spaces \r\n", ""]


def end_to_end_tokenizer(vocab_size: int = 1024) -> bool:
    """Plug-in verdict for 4.1 and 4.2: `BPETokenizer.train` on the stories (through `learn_merges`) and `encode` (through
    `apply_merges`) must give HF tokenizers' vocabulary, merges and ids exactly (integers and strings: no rounding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from minillm import data
    from minillm.tokenizer import BPETokenizer

    stories = data.corpus("train").split(data.STORY_SEPARATOR)
    val_text = data.corpus("val")
    unseen = val_text.split(data.STORY_SEPARATOR) + [val_text] + UNSEEN_EXTRAS
    claim = (f"BPETokenizer on your code, trained on the stories (vocab_size {vocab_size}): vocab, merges and the ids "
             f"of {len(unseen)} unseen texts equal HF tokenizers'")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(stories, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_merges = [tuple(merge) for merge in json.loads(hf.to_str())["model"]["merges"]]
    try:
        ours = BPETokenizer.train(stories, vocab_size)
        ids = [ours.encode(text) for text in unseen]
    except NotImplementedError:
        raise
    except Exception as error:  # noqa: BLE001 - the learner's code broke the run: report it, do not crash the cell
        return verdict(False, claim, f"the run raised {type(error).__name__}: {error}")
    if ours.merges != hf_merges:
        rank = next((r for r, (a, b) in enumerate(zip(ours.merges, hf_merges)) if a != b), min(len(ours.merges),
                                                                                               len(hf_merges)))
        return verdict(False, claim, f"{len(ours.merges)} merges, HF {len(hf_merges)}; first difference at merge {rank}")
    if ours.vocab != hf.get_vocab():
        return verdict(False, claim, "the merges agree but the token ids do not")
    for text, got in zip(unseen, ids):
        expected = hf.encode(text).ids
        if got != expected:
            position = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            return verdict(False, claim, f"encoding {_short(text, 40)}: first different id at position {position}")
    return verdict(True, claim)


# --- practice ------------------------------------------------------------------------------------------------------


@exercise("4.3", "bytes_to_unicode")
def check_bytes_to_unicode(bytes_to_unicode) -> None:
    """Exercise 4.3: GPT-2's table from the 256 byte values to printable characters."""

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

    check("4.3", [run],
          hint="three ranges of printable bytes keep their own character; every other byte moves past the end of "
               "Latin-1, in byte order",
          more="put the printable ranges in the table first; then walk the bytes 0..255 in order and give each one "
               "that is still missing the next unused code point counting up from 256. Byte 0 is the first one moved.")


@exercise("4.4", "get_pair_counts")
def check_get_pair_counts(get_pair_counts) -> None:
    """Exercise 4.4: how often each adjacent pair occurs, over words that each occur `count` times."""
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
    check("4.4", cases,
          hint="every adjacent pair of every word counts, weighted by how often the word occurs",
          more="add the word's count, not 1, for each adjacent pair; a pair that repeats inside one word counts each "
               "time ((4, 4, 4) holds (4, 4) twice); a word of one id has no pairs, and no words give an empty dict.")


@exercise("4.5", "merge")
def check_merge(merge) -> None:
    """Exercise 4.5: replace every occurrence of `pair` in `ids` by `new_id`, left to right."""
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
    check("4.5", cases,
          hint="scan left to right; once two ids are merged, the second of them cannot start another pair",
          more="where the pair starts at the current position, emit new_id and move past both ids; otherwise emit "
               "the current id and move one. Take care of the last id when it is not part of a pair, and of an "
               "empty list.")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
