"""Byte-level BPE, the tokenizer of GPT-2: train, encode, decode, save and load. Chapter 04 teaches it.

Text becomes token ids in three steps:

1. **Pre-tokenize.** GPT-2's regex (`GPT2_SPLIT_PATTERN`) cuts text into words with their leading space,
   runs of digits, runs of punctuation and runs of whitespace. Merges never cross these cuts, so " cat." can
   become " cat" + "." but never " ca" + "t.".
2. **Bytes.** Each piece becomes its UTF-8 bytes, and each byte is written as one printable character
   (`bytes_to_unicode`: a space is "Ġ", a newline "Ċ"). The 256 byte characters are the first tokens, so
   every string, emoji and CJK included, can be encoded and nothing is ever unknown.
3. **Merges.** Training repeatedly glues the most frequent adjacent pair of tokens into a new token;
   encoding replays those merges on each piece, earliest-learned first.

Reference: Hugging Face `tokenizers` 0.23 built as
`Tokenizer(models.BPE())` with `pre_tokenizers.ByteLevel(add_prefix_space=False)`, `decoders.ByteLevel()`,
trained by `trainers.BpeTrainer(vocab_size=..., special_tokens=[...],
initial_alphabet=pre_tokenizers.ByteLevel.alphabet())`. On the same texts `BPETokenizer.train` learns the
same vocabulary (ids included) and the same merges in the same order, and `encode` returns the same ids;
tests/test_tokenizer.py checks all three. `save` writes HF's tokenizer.json format, so either library can
load the other's file; `load` also reads the tokenizer.json that transformers' `GPT2Tokenizer` writes (its
empty `continuing_subword_prefix` and `end_of_word_suffix` mean null to HF, and to us; tests/test_bad_input.py).

Special tokens (e.g. "<|endoftext|>") get the first ids, in the order given, as in HF. Like HF's added
special tokens, `encode` cuts the text at every exact occurrence of one (the longest one where two start at
the same place) and encodes the stretches in between on their own; training does not cut at them (HF's
trainer does not either), so keep them out of training text. `decode` turns a special token back into its own
text; HF's `decode(ids, skip_special_tokens=False)` does the same for special tokens made of printable
ASCII, and drops them by default.

One known difference: which characters count as letters (\\p{L}) and numbers (\\p{N}) comes from Unicode
tables, and the `regex` module has newer ones (Unicode 18) than HF's Oniguruma (Unicode 16). About 17,500
letters and digits first assigned in Unicode 17 or 18 can therefore be split differently; every other code
point splits the same (tests/test_tokenizer.py samples all of Unicode).
"""

from __future__ import annotations

import heapq
import itertools
import json
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

from minillm.files import read_json, write_files_atomically

# Contractions, then a word, a number or a punctuation run each with at most one leading space, then
# whitespace. `\s+(?!\S)` leaves the last space of a run for the next word, so "a  b" -> "a", " ", " b".
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)
_DIGIT = regex.compile(r"(\p{N})")  # HF's Digits(individual_digits=True): every numeric character on its own
ENCODE_CACHE_SIZE = 100_000  # pre-tokens whose ids `encode` remembers; text repeats its words a lot


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte (0-255) to one printable character.

    Printable bytes stand for themselves ("a" is "a"); the other 68 (controls, space, the non-printing
    Latin-1 ones) are moved to chr(256), chr(257), ... in byte order, so a space (byte 32) is "Ġ" (chr(288))
    and a newline "Ċ". Tokens are then ordinary strings that can be printed and stored in JSON.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + moved)
            moved += 1
    return dict(sorted(table.items()))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def to_byte_chars(text: str) -> str:
    """`text` as its UTF-8 bytes, one `bytes_to_unicode` character per byte: " hé" -> "ĠhÃ©"."""
    return "".join(BYTE_TO_CHAR[byte] for byte in text.encode("utf-8"))


def pre_tokenize(text: str) -> list[str]:
    """Split `text` with GPT-2's regex and write each piece in byte characters.

    The same pieces as HF's `pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)`.
    """
    return [to_byte_chars(piece) for piece in _SPLIT.findall(text)]


def merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[tuple[tuple[int, int], int]]:
    """Replace each occurrence of `pair` in `word` (in place, left to right) by `new_id`.

    Returns how the counts of neighbouring pairs change: merging (b, c) in a b c d removes (a, b) and (c, d)
    and adds (a, bc) and (bc, d). Training adds these changes to its pair counts instead of recounting
    every word. The count of `pair` itself is left alone, exactly as HF's trainer does (it never asks again).
    """
    first, second = pair
    changes = []
    i = 0
    while i < len(word) - 1:
        if word[i] == first and word[i + 1] == second:
            if i > 0:
                changes += [((word[i - 1], first), -1), ((word[i - 1], new_id), +1)]
            word[i:i + 2] = [new_id]
            if i < len(word) - 1:
                changes += [((second, word[i + 1]), -1), ((new_id, word[i + 1]), +1)]
        i += 1
    return changes


def learn_merges(word_counts: dict[str, int], tokens: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """The BPE training loop: merge the most frequent adjacent pair until there are `vocab_size` tokens.

    `word_counts` maps each pre-token (in byte characters) to how often it occurs; `tokens` holds the
    starting vocabulary (special tokens, then the 256 byte characters) and is extended in place.

    Ties go to the pair with the smaller (left id, right id), HF's rule. Counts are kept up to date
    incrementally: `pair_counts` says how often each pair occurs, and a max-heap keyed by count holds, for
    each pair, the words it was seen in, so a merge visits only those words. An entry whose count fell after
    it was pushed is pushed back with its current count when it reaches the top (a "lazy" heap). This is
    the bookkeeping of HF's trainer, step for step, so that even its corner cases come out the same.
    """
    token_id = {token: i for i, token in enumerate(tokens)}
    words = [[token_id[char] for char in word] for word in word_counts]
    counts = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    seen_in: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            seen_in[pair].add(w)

    heap: list = []
    order = itertools.count()  # breaks exact ties between two entries of one pair, so sets are never compared

    def push(found_in: dict[tuple[int, int], set[int]]) -> None:
        for pair, where in found_in.items():
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair, next(order), where))

    push(seen_in)
    merges = []
    while len(token_id) < vocab_size and heap:
        negative_count, pair, _, where = heapq.heappop(heap)
        if -negative_count != pair_counts[pair]:  # stale: the count changed after this push
            heapq.heappush(heap, (-pair_counts[pair], pair, next(order), where))
            continue
        if pair_counts[pair] < 1:
            break
        left, right = tokens[pair[0]], tokens[pair[1]]
        new_id = token_id.setdefault(left + right, len(tokens))  # HF reuses the id if the string exists
        if new_id == len(tokens):
            tokens.append(left + right)
        merges.append((left, right))

        created_in: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w in where:
            for changed, delta in merge_word(words[w], pair, new_id):
                pair_counts[changed] += delta * counts[w]
                if delta > 0:
                    created_in[changed].add(w)
        push(created_in)
    return merges


class BPETokenizer:
    """A trained byte-level BPE tokenizer: `vocab` (token -> id) and `merges` (in the order learned).

    Make one with `BPETokenizer.train(texts, vocab_size)` or `BPETokenizer.load(path)`. Tokens are strings
    of byte characters (see `bytes_to_unicode`): "Ġthe" is " the".
    """

    def __init__(self, vocab: dict[str, int], merges: Iterable[tuple[str, str]], special_tokens: Iterable[str] = (),
                 split_digits: bool = False):
        special_tokens = list(special_tokens)
        # Some checkpoints' tokenizers (SmolLM's, StarCoder's) cut every digit out on its own before GPT-2's
        # regex runs: HF's pre-tokenizer Sequence [Digits(individual_digits=True), ByteLevel].
        self.split_digits = split_digits
        _check_special_tokens(special_tokens)
        self.vocab = dict(vocab)
        self.merges = [tuple(merge) if isinstance(merge, (list, tuple)) else merge for merge in merges]
        self.special_tokens = {token: self.vocab.get(token, -1) for token in special_tokens}
        _check_consistent(self.vocab, self.merges, self.special_tokens)

        self._bytes_of = [b""] * len(self.vocab)  # id -> the bytes it stands for
        for token, i in self.vocab.items():
            # A special token means its own text; every other token is spelled in byte characters.
            special = token in self.special_tokens
            self._bytes_of[i] = token.encode("utf-8") if special else bytes(CHAR_TO_BYTE[char] for char in token)
        self._byte_ids = [self.vocab[BYTE_TO_CHAR[byte]] for byte in range(256)]
        # (left id, right id) -> (rank, merged id); a pair listed twice keeps its last rank, as in HF.
        self._merge_table = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b])
                             for rank, (a, b) in enumerate(self.merges)}
        # Longest first, so that where two special tokens start at one place the longer one wins (as in HF).
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, by_length)) + ")") if by_length else None
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> BPETokenizer:
        """Learn merges from `texts` until the vocabulary has `vocab_size` tokens or no adjacent pair is left.

        Ids: the special tokens first, then the 256 byte characters in code-point order, then each merge's
        new token in the order learned, as HF's BpeTrainer with the byte-level alphabet assigns them.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, got one str; pass [text]")
        special_tokens = list(special_tokens)
        _check_special_tokens(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        smallest = 256 + len(special_tokens)
        if vocab_size < smallest:
            raise ValueError(f"vocab_size must be at least 256 (one token per byte) + {len(special_tokens)} "
                             f"special token(s) = {smallest}, got {vocab_size}")

        pieces: Counter[str] = Counter()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must contain only str, found {type(text).__name__}")
            pieces.update(_SPLIT.findall(text))
        word_counts = {to_byte_chars(piece): count for piece, count in pieces.items()}

        tokens = list(special_tokens)
        tokens += [char for char in sorted(BYTE_TO_CHAR.values()) if char not in tokens]
        merges = learn_merges(word_counts, tokens, vocab_size)
        return cls({token: i for i, token in enumerate(tokens)}, merges, special_tokens)

    def apply_merges(self, ids: list[int]) -> list[int]:
        """Merge adjacent pairs of one pre-token's ids, lowest rank first (the leftmost on ties), until no
        learned merge applies. Returns a new list.

        HF's BPE model takes the same order with a priority queue; here a list of the ranks of adjacent
        pairs plays that role (`min` finds the best rank, `index` the leftmost pair that has it).
        """
        ids = list(ids)
        no_merge = len(self.merges)  # larger than any rank
        table = self._merge_table

        def rank(pair):
            return table[pair][0] if pair in table else no_merge

        ranks = [rank(pair) for pair in zip(ids, ids[1:])]  # ranks[i] belongs to (ids[i], ids[i + 1])
        while ranks and (best := min(ranks)) != no_merge:
            i = ranks.index(best)
            ids[i:i + 2] = [table[ids[i], ids[i + 1]][1]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank((ids[i - 1], ids[i]))
            if i < len(ranks):
                ranks[i] = rank((ids[i], ids[i + 1]))
        return ids

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`. Pre-tokens seen before come from a cache: text repeats its words."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        # With a capturing group, split returns [text, special, text, special, ..., text].
        parts = self._special_split.split(text) if self._special_split else [text]
        ids: list[int] = []
        cache = self._cache
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
                continue
            chunks = _DIGIT.split(part) if self.split_digits else [part]
            for piece in (piece for chunk in chunks for piece in _SPLIT.findall(chunk)):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = self.apply_merges([self._byte_ids[byte] for byte in piece.encode("utf-8")])
                    if len(cache) < ENCODE_CACHE_SIZE:
                        cache[piece] = piece_ids
                ids.extend(piece_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Bytes that do not form valid UTF-8 (half an emoji) become "�", like HF."""
        pieces = []
        for i in ids:
            try:
                index = operator.index(i)
            except TypeError:
                raise TypeError(f"decode takes integer token ids, got {type(i).__name__} {i!r}") from None
            if not 0 <= index < len(self._bytes_of):
                raise ValueError(f"unknown token id {index}: this tokenizer's ids run from 0 to "
                                 f"{len(self._bytes_of) - 1} (vocab_size {len(self._bytes_of)})")
            pieces.append(self._bytes_of[index])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        """Write HF's tokenizer.json format; `tokenizers.Tokenizer.from_file(path)` loads it too.

        Atomic (minillm.files): a save that fails halfway leaves the old file at `path` whole."""
        write_files_atomically({Path(path): json.dumps(self._to_hf_json(), ensure_ascii=False, indent=1) + "\n"})

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a file written by `save`, or a tokenizer.json that HF saved for the configuration above."""
        config = read_json(path, "BPETokenizer.load", "a tokenizer.json written by BPETokenizer.save or HF tokenizers")
        try:
            vocab, merges, special_tokens, split_digits = _from_hf_json(config)
            return cls(vocab, merges, special_tokens, split_digits)
        except (ValueError, TypeError, AttributeError) as err:  # a damaged file can break any of these
            raise ValueError(f"{path} is not a valid tokenizer file: {err}") from None

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)})")

    def _to_hf_json(self) -> dict:
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        # decoders.ByteLevel() stores add_prefix_space=True; it changes nothing when decoding.
        decoder = dict(byte_level, add_prefix_space=True)
        added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for token, i in self.special_tokens.items()]
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": dict(sorted(self.vocab.items(), key=lambda item: item[1])),
                 "merges": [list(merge) for merge in self.merges]}
        digits = {"type": "Digits", "individual_digits": True}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [digits, byte_level]} if self.split_digits else byte_level
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


def _check_special_tokens(special_tokens: list) -> None:
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
    repeated = [token for token, n in Counter(special_tokens).items() if n > 1]
    if repeated:
        raise ValueError(f"special tokens must be distinct; repeated: {repeated}")


def _check_consistent(vocab: dict, merges: list, special_tokens: dict) -> None:
    """Raise ValueError unless vocab, merges and special tokens describe a usable byte-level BPE."""
    if not all(isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) for t, i in vocab.items()):
        raise ValueError("vocab must map token strings to integer ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"vocab ids must be 0..{len(vocab) - 1}, each used once")
    missing = [char for char in BYTE_TO_CHAR.values() if char not in vocab]
    if missing:
        raise ValueError(f"vocab lacks {len(missing)} of the 256 byte characters (e.g. {missing[0]!r}); a byte-level "
                         "BPE needs all of them so that any text can be encoded")
    for token, i in special_tokens.items():
        if i < 0:
            raise ValueError(f"special token {token!r} is not in vocab")
    for rank, merge in enumerate(merges):
        if not (isinstance(merge, tuple) and len(merge) == 2 and all(isinstance(part, str) for part in merge)):
            raise ValueError(f"merge {rank} must be a pair of token strings, got {merge!r}")
        for token in (merge[0], merge[1], merge[0] + merge[1]):
            if token not in vocab:
                raise ValueError(f"merge {rank} {merge!r} uses {token!r}, which is not in vocab")
    for token in vocab:
        if token not in special_tokens and any(char not in CHAR_TO_BYTE for char in token):
            raise ValueError(f"vocab token {token!r} is neither a special token nor made of byte characters")


def _from_hf_json(config) -> tuple[dict, list, list, bool]:
    """vocab, merges, special tokens and split_digits from a tokenizer.json; ValueError naming what is not
    supported."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError("expected a JSON object with a 'model' entry (HF tokenizer.json format)")
    model = config["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"model type must be 'BPE', got {model.get('type')!r}")
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    digits = {"type": "Digits", "individual_digits": True}
    split_digits = isinstance(steps, list) and len(steps) == 2 and steps[0] == digits
    byte_level = steps[-1] if isinstance(steps, list) and len(steps) == 1 + split_digits else {}
    if (not isinstance(byte_level, dict) or byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space")
            or not byte_level.get("use_regex", True)):
        raise ValueError("only pre_tokenizer ByteLevel with add_prefix_space=false and use_regex=true is supported "
                         f"(alone, or after Digits with individual_digits=true), got {pre!r}")
    if config.get("normalizer") is not None:
        raise ValueError(f"a normalizer is not supported (expected null), got {config['normalizer']!r}")
    if model.get("dropout") is not None:
        raise ValueError(f"BPE option dropout is not supported (expected null), got {model['dropout']!r}")
    # An empty prefix or suffix changes nothing, and HF reads "" as null: transformers' GPT2Tokenizer writes "".
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option) not in (None, ""):
            raise ValueError(f"BPE option {option} is not supported (expected null or \"\"), got {model[option]!r}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ValueError("model must have 'vocab' (an object token -> id) and 'merges' (a list)")
    not_int = next(((token, i) for token, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool)), None)
    if not_int:
        raise ValueError(f"vocab ids must be integers, got {not_int[0]!r}: {not_int[1]!r}")
    # Older HF files store a merge as one string "left right"; newer ones as a pair [left, right].
    merges = [tuple(m.split(" ")) if isinstance(m, str) else m for m in merges]
    special_tokens = []
    for added in config.get("added_tokens") or []:
        if not isinstance(added, dict):
            raise ValueError(f"added_tokens must hold objects, got {added!r}")
        if not added.get("special"):
            raise ValueError(f"only special added tokens are supported, got {added!r}")
        if vocab.get(added.get("content")) != added.get("id"):
            raise ValueError(f"added token {added!r} does not match its vocab entry")
        special_tokens.append(added["content"])
    return vocab, merges, special_tokens, split_digits
