"""minillm.tokenizer against Hugging Face `tokenizers`, trained side by side inside the tests.

Both learn from the same texts (a few hundred stories from minillm.data plus awkward strings) with the same
settings; then vocabulary, merges, pre-tokenization, encodings and decodings must agree exactly. Round trips
are checked on arbitrary Unicode with hypothesis, and every bad input must raise a clear error.
"""

import json
import os
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread, and no fork warning from HF

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm import data
from minillm.tokenizer import BPETokenizer, bytes_to_unicode, merge_word, pre_tokenize

VOCAB_SIZE = 600
SPECIALS = ["<|endoftext|>", "<pad>"]
EDGE_CASES = [
    "can't won't I'm you're they've we'll he'd it's", "DON'T SHOUT'S", "rock 'n' roll ''s 're",
    "a\u00a0b \u00a0\u00a0x", "line1\r\nline2\r\n\r\nline3\r", "\n\n\n", "tabs\t\tand  spaces   end",
    "   leading", "trailing   ", " ", "", "a  b   c", "\t \n \u3000x \u2009y \u2028 \u2029 \x85",
    "🎉🎉 party 👩‍👩‍👧 family 🇫🇷 👍🏽", "東京は日本の首都です。", "한국어 텍스트", "中文，标点！",
    "12345 3.14159 1,000,000 2024-01-01 007", "٣٤٥ ①② ¾ Ⅻ", "naïve café résumé", "Ελληνικά",
    "Привет, мир!", "עברית مرحبا", "!!! ??? ... --- *** $$$", "a\u200bb e\u0301 \ufeffBOM",
    "\x00\x01\x7f control", "<|endoftext|>", "x<|endoftext|>y <|endoftext|> <pad><|endoftext|><pad>",
]


def hf_train(texts, vocab_size, special_tokens=()):
    """The reference: HF's byte-level BPE configured as documented in minillm.tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def hf_merges(tokenizer):
    return [tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def texts():
    return [story.text for story in data.generate_stories(300, seed=4)] + EDGE_CASES


@pytest.fixture(scope="module")
def pair(texts):
    """(ours, HF's), trained on the same texts with the same settings."""
    return BPETokenizer.train(texts, VOCAB_SIZE, SPECIALS), hf_train(texts, VOCAB_SIZE, SPECIALS)


def test_training_learns_hf_vocab_and_merges(pair):
    ours, hf = pair
    assert ours.vocab == hf.get_vocab(), (
        "vocab differs from HF's: ids go to the special tokens, then the 256 byte characters sorted by code point, "
        "then each merge's token in the order learned")
    expected = hf_merges(hf)
    first_difference = next((i for i, (a, b) in enumerate(zip(ours.merges, expected)) if a != b), None)
    assert ours.merges == expected, (
        f"merges differ from HF's (first at rank {first_difference}; {len(ours.merges)} vs {len(expected)} merges): "
        "pick the highest count, and on equal counts the smallest (left id, right id)")


@pytest.mark.parametrize("vocab_size", [256, 300, 5000])
def test_training_matches_hf_at_other_sizes(texts, vocab_size):
    # 256: no merge at all; 5000: the corpus runs out of repeated pairs before reaching the size.
    ours, hf = BPETokenizer.train(texts[:80], vocab_size), hf_train(texts[:80], vocab_size)
    assert ours.vocab == hf.get_vocab() and ours.merges == hf_merges(hf), (
        f"vocab_size={vocab_size}: stop when the vocabulary is full or no pair occurs at all, as HF does")


def test_ties_go_to_the_smaller_pair_of_ids():
    # ' x' and 'ab' both occur once; 'Ġ' (chr(288)) has a larger id than 'a', so HF merges 'a'+'b' first.
    ours, hf = BPETokenizer.train([" x", "ab"], 258), hf_train([" x", "ab"], 258)
    assert ours.merges == hf_merges(hf), "on equal counts, merge the pair with the smaller (left id, right id)"


def test_bytes_to_unicode_is_hfs_byte_alphabet():
    table = bytes_to_unicode()
    assert list(table) == list(range(256)), "bytes_to_unicode must map every byte 0..255, in byte order"
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet()), (
        "the 256 characters must be HF's ByteLevel.alphabet()")
    # HF shows which character each byte becomes when it pre-tokenizes text that contains that byte.
    shown = {}
    # All 1- and 2-byte characters, then one character per lead byte of 3-byte (0xE0-0xEF) and 4-byte (0xF0-0xF4)
    # sequences.
    longer = [0x800, *range(0x1000, 0x10000, 0x1000), 0x10000, *range(0x40000, 0x110000, 0x40000)]
    for code_point in [*range(0x800), *longer]:
        char = chr(code_point)
        ((piece, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(char)
        shown.update(zip(char.encode("utf-8"), piece))
    assert len(shown) == 243, "every byte except 0xC0, 0xC1 and 0xF5-0xFF (never in UTF-8) should be shown"
    wrong = {byte: (table[byte], char) for byte, char in shown.items() if table[byte] != char}
    assert not wrong, f"byte -> (ours, HF's) where they differ: {wrong}"


def test_pre_tokenize_matches_hf():
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in EDGE_CASES:
        assert pre_tokenize(text) == [piece for piece, _ in hf.pre_tokenize_str(text)], (
            f"pre-tokens of {text!r} differ from HF's: use GPT2_SPLIT_PATTERN with the `regex` module "
            "(contractions are lower case only; whitespace before a word stays with the word)")


def test_pre_tokenize_matches_hf_across_unicode():
    # Every 31st code point of every plane, as a letter, digit, symbol and space would meet it. Code points
    # unassigned in Python's own Unicode database are skipped: among them are the Unicode 17-18 letters that
    # the `regex` module knows and HF's Oniguruma (Unicode 16) does not.
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False)
    differ = []
    for code_point in range(0, 0x110000, 31):
        char = chr(code_point)
        if unicodedata.category(char) in ("Cs", "Cn"):
            continue
        text = f"a{char}b 1{char}2 !{char}? \t{char} {char}{char}x"
        if pre_tokenize(text) != [piece for piece, _ in hf.pre_tokenize_str(text)]:
            differ.append(f"U+{code_point:04X}")
    assert not differ, f"pre-tokens differ from HF's around {len(differ)} code points, e.g. {differ[:10]}"


def test_encode_matches_hf(pair):
    ours, hf = pair
    unseen = [story.text for story in data.generate_stories(40, seed=99)]
    for text in EDGE_CASES + unseen + ["\n\n".join(unseen)]:
        assert ours.encode(text) == hf.encode(text).ids, (
            f"encode({text[:60]!r}) differs from HF: apply the lowest-ranked merge first, the leftmost on ties")


def test_special_tokens_split_the_text_like_hf():
    specials = ["<eos>", "<eos><eos>", "[X]"]
    texts = ["a<eos>b", "hello world", "hello there"]
    ours, hf = BPETokenizer.train(texts, 300, specials), hf_train(texts, 300, specials)
    assert ours.vocab == hf.get_vocab(), "special tokens take the first ids, in the order given"
    for text in ["<eos><eos><eos>", "x<eos> [X][X]y", "<eos", "eos>", " <eos> ", "hello<eos><eos>world"]:
        assert ours.encode(text) == hf.encode(text).ids, (
            f"encode({text!r}): cut at special tokens first, the longest one where two start at the same place")
        assert ours.decode(ours.encode(text)) == text


# A mix of story words, punctuation and spaces exercises the merges; arbitrary characters test the rest.
# Code points Python's unicodedata calls unassigned (Cn) are left out of the HF comparison: the `regex`
# module knows Unicode 17 and 18 letters that HF's Oniguruma (Unicode 16) does not (see the module docstring).
STORY_WORDS = sorted(set(" ".join(story.text for story in data.generate_stories(50)).split()))
story_like = st.lists(st.sampled_from(STORY_WORDS + [" ", "  ", "\n", ",", "'s", "12", "🎉", "<|endoftext|>"]),
                      max_size=30).map(" ".join)
assigned_text = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=40)


@settings(max_examples=50, deadline=None)
@given(text=st.one_of(story_like, assigned_text))
def test_encode_matches_hf_on_random_text(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf.encode(text).ids, f"encode({text!r}) differs from HF's"


@settings(max_examples=50, deadline=None)
@given(text=st.one_of(story_like, st.text(max_size=60)))
def test_round_trip_on_any_unicode(pair, text):
    ours, _ = pair
    ids = ours.encode(text)
    assert ours.decode(ids) == text, "decode(encode(text)) must give the text back: every byte has a token"
    assert ours.encode(ours.decode(ids)) == ids, "encode(decode(ids)) must give the same ids back"


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=12))
def test_decode_matches_hf_on_any_ids(pair, ids):
    # Random ids often cut a character in half: both must show the broken bytes as U+FFFD the same way.
    ours, hf = pair
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), f"decode({ids}) differs from HF's"


def test_merge_word_reports_exact_count_changes():
    # The incremental update must equal a full recount of the word's pairs, except for the merged pair,
    # whose count the trainer never reads again (HF leaves it alone too).
    for word, pair in [([1, 2, 3, 2, 3, 4], (2, 3)), ([5, 5, 5, 5, 5], (5, 5)), ([7, 8], (7, 8)),
                       ([1, 1, 2, 1, 1], (1, 1)), ([3, 3, 3], (3, 4))]:
        before = Counter(zip(word, word[1:]))
        changes = merge_word(word, pair, 99)
        after = Counter(zip(word, word[1:]))
        net = Counter()
        for changed, delta in changes:
            net[changed] += delta
        expected = {p: after[p] - before[p] for p in before | after if p != pair and after[p] != before[p]}
        assert {p: d for p, d in net.items() if d and p != pair} == expected, (
            f"merging {pair} gave changes {changes}; a recount says {expected}")
        assert pair not in after, f"{pair} still occurs in {word} after merging it"


def test_encode_cache_gives_the_same_ids(pair, texts):
    ours, _ = pair
    fresh = BPETokenizer(ours.vocab, ours.merges, ours.special_tokens)
    story = texts[0]
    assert fresh.encode(story) == fresh.encode(story) == ours.encode(story), "a cached pre-token must encode the same"


def test_save_and_load_share_hfs_file_format(pair, tmp_path):
    ours, hf = pair
    ours.save(tmp_path / "ours.json")
    hf.save(str(tmp_path / "hf.json"))
    assert json.loads((tmp_path / "ours.json").read_text()) == json.loads((tmp_path / "hf.json").read_text()), (
        "save must write exactly what HF saves for the same tokenizer")
    loaded, hf_loaded = BPETokenizer.load(tmp_path / "hf.json"), Tokenizer.from_file(str(tmp_path / "ours.json"))
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (ours.vocab, ours.merges, ours.special_tokens)
    for text in EDGE_CASES:
        assert loaded.encode(text) == hf_loaded.encode(text).ids == ours.encode(text)


def test_load_reads_hfs_older_merge_format(pair, tmp_path):
    ours, _ = pair
    config = ours._to_hf_json()
    config["model"]["merges"] = [" ".join(merge) for merge in ours.merges]  # "left right", as before HF 0.20
    (tmp_path / "old.json").write_text(json.dumps(config))
    assert BPETokenizer.load(tmp_path / "old.json").merges == ours.merges


# --- bad input ------------------------------------------------------------------------------------


def test_decode_rejects_unknown_ids(pair):
    ours, _ = pair
    for bad in (VOCAB_SIZE, -1, 10**9):
        with pytest.raises(ValueError, match=rf"unknown token id {bad}: .* from 0 to {VOCAB_SIZE - 1}"):
            ours.decode([5, bad])
    with pytest.raises(TypeError, match="integer token ids, got float"):
        ours.decode([1.0])


def test_vocab_size_must_leave_room_for_every_byte_and_special():
    with pytest.raises(ValueError, match=r"at least 256 \(one token per byte\) \+ 0 special token\(s\) = 256, got 255"):
        BPETokenizer.train(["hello"], 255)
    with pytest.raises(ValueError, match="= 258, got 257"):
        BPETokenizer.train(["hello"], 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        BPETokenizer.train(["hello"], 300.0)


def test_train_rejects_bad_texts_and_special_tokens():
    with pytest.raises(TypeError, match=r"iterable of strings, got one str; pass \[text\]"):
        BPETokenizer.train("hello world", 300)
    with pytest.raises(TypeError, match="only str, found bytes"):
        BPETokenizer.train([b"hello"], 300)
    with pytest.raises(ValueError, match="special tokens must be distinct; repeated: \\['<a>'\\]"):
        BPETokenizer.train(["hello"], 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="non-empty strings, got ''"):
        BPETokenizer.train(["hello"], 300, special_tokens=[""])


def damaged_files(good: dict):
    """(description, file text, what the error must say) for ways a tokenizer file can be broken."""
    def edited(change):
        config = json.loads(json.dumps(good))
        change(config)
        return json.dumps(config)

    yield "not JSON", '{"model": {"type": "BPE", "vocab": {', "not valid UTF-8 JSON"
    yield "a list", "[1, 2, 3]", "expected a JSON object with a 'model' entry"
    yield "WordPiece", edited(lambda c: c["model"].update(type="WordPiece")), "model type must be 'BPE'"
    yield "prefix space", edited(lambda c: c["pre_tokenizer"].update(add_prefix_space=True)), "add_prefix_space=false"
    yield "normalizer", edited(lambda c: c.update(normalizer={"type": "NFC"})), "a normalizer is not supported"
    yield "no merges", edited(lambda c: c["model"].pop("merges")), "'merges' \\(a list\\)"
    yield "merge of unknown", edited(lambda c: c["model"]["merges"].append(["zz", "q"])), \
        "uses 'zz', which is not in vocab"
    yield "missing byte", edited(lambda c: c["model"]["vocab"].update(aaaaaaaaaa=c["model"]["vocab"].pop("a"))), \
        "lacks 1 of the 256 byte characters \\(e.g. 'a'\\)"
    yield "bad ids", edited(lambda c: c["model"]["vocab"].update(a=10**6)), "vocab ids must be 0\\.\\."
    yield "bad merge", edited(lambda c: c["model"]["merges"].append(5)), "must be a pair of token strings"
    yield "bad added", edited(lambda c: c["added_tokens"].append(7)), "added_tokens must hold objects, got 7"
    yield "added mismatch", edited(lambda c: c["added_tokens"][0].update(id=3)), "does not match its vocab entry"


def test_load_rejects_damaged_files(pair, tmp_path):
    ours, _ = pair
    for description, text, message in damaged_files(ours._to_hf_json()):
        path = tmp_path / "broken.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            BPETokenizer.load(path)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        BPETokenizer.load(tmp_path / "binary.json")


def test_encode_rejects_non_text(pair):
    with pytest.raises(TypeError, match="encode takes a str, got bytes"):
        pair[0].encode(b"hello")


def test_digits_split_tokenizer_json_equals_hf():
    """Checkpoints such as SmolLM's cut each digit out before GPT-2's regex: HF's pre-tokenizer Sequence
    [Digits(individual_digits=True), ByteLevel]. Loaded and saved, the ids equal HF tokenizers' on real text."""
    from minillm.hub import real_text

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    text = real_text()
    hf.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    samples = [text[:4000], "In 2001, 1.5 million: ٣٤ and ½ or 10,000 apples  42\n\n7"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        hf.save(str(path))
        ours = BPETokenizer.load(path)
        assert ours.split_digits
        for sample in samples:
            assert ours.encode(sample) == hf.encode(sample).ids
        ours.save(path)
        again = Tokenizer.from_file(str(path))
        for sample in samples:
            assert again.encode(sample).ids == hf.encode(sample).ids
