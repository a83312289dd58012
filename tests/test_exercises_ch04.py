"""Chapter 04's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the two build
exercises, plugged into minillm.tokenizer, drive the chapter's cross-check with HF tokenizers and leave nothing behind."""

from collections import Counter

import pytest

from minillm import tokenizer as tk
from minillm.exercises import ch04, use
from exercise_helpers import outputs, run_three, stub


# --- 4.3 bytes_to_unicode -------------------------------------------------------------------------


def bytes_to_unicode(printable=(*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                                *range(ord("®"), ord("ÿ") + 1))):
    table = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


def test_bytes_to_unicode_check(capsys):
    ch04.check_bytes_to_unicode(bytes_to_unicode)
    ch04.check_bytes_to_unicode(stub)
    ch04.check_bytes_to_unicode(lambda: {byte: chr(byte) for byte in range(256)})  # no shifting at all
    ch04.check_bytes_to_unicode(lambda: bytes_to_unicode(printable=range(ord("!"), 256)))  # kept the soft hyphen
    ch04.check_bytes_to_unicode(lambda: list(bytes_to_unicode().values()))
    passed, stubbed, identity, soft_hyphen, a_list = outputs(capsys)
    assert passed == "Exercise 4.3 (bytes_to_unicode): passed ✓"
    assert stubbed.startswith("Exercise 4.3 (bytes_to_unicode): not attempted yet")
    assert identity == ("Exercise 4.3 (bytes_to_unicode): not yet ✗ - case 1: byte 0 (b'\\x00'): "
                        "expected 'Ā', got '\\x00'")
    assert soft_hyphen.startswith("Exercise 4.3 (bytes_to_unicode): not yet ✗ - case 1: byte 127 (b'\\x7f'): "
                                  "expected 'ġ'")
    assert a_list.endswith("case 1: expected a dict {byte: character}, got list")


# --- 4.4 get_pair_counts --------------------------------------------------------------------------


def get_pair_counts(word_counts, weighted=True, distinct=False):
    counts = {}
    for word, count in word_counts.items():
        pairs = list(zip(word, word[1:]))
        for pair in set(pairs) if distinct else pairs:
            counts[pair] = counts.get(pair, 0) + (count if weighted else 1)
    return counts


def test_get_pair_counts_check(capsys):
    ch04.check_get_pair_counts(get_pair_counts)
    ch04.check_get_pair_counts(stub)
    ch04.check_get_pair_counts(lambda wc: get_pair_counts(wc, weighted=False))  # each word once
    ch04.check_get_pair_counts(lambda wc: get_pair_counts(wc, distinct=True))  # a repeated pair counted once
    passed, stubbed, unweighted, once_per_word = outputs(capsys)
    assert passed == "Exercise 4.4 (get_pair_counts): passed ✓"
    assert "not attempted yet" in stubbed
    assert unweighted.startswith("Exercise 4.4 (get_pair_counts): not yet ✗ - case 2: for words ")
    assert unweighted.endswith("pair (1, 2) expected count 5, got 1")
    assert once_per_word.endswith("case 3: for words {(4, 4, 4, 4): 3}: pair (4, 4) expected count 9, got 3")


# --- 4.5 merge ------------------------------------------------------------------------------------


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_overlapping(ids, pair, new_id):
    # Checks every position, so in 3 3 3 the middle 3 is used twice.
    out = [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:])]
    return out


def test_merge_check(capsys):
    ch04.check_merge(merge)
    ch04.check_merge(stub)
    ch04.check_merge(merge_overlapping)
    ch04.check_merge(lambda ids, pair, new_id: merge(ids, pair, new_id)[:-1] if ids else [])  # drops the end
    ch04.check_merge(lambda ids, pair, new_id: tuple(merge(ids, pair, new_id)))
    passed, stubbed, overlapping, drops_last, a_tuple = outputs(capsys)
    assert passed == "Exercise 4.5 (merge): passed ✓"
    assert "not attempted yet" in stubbed
    assert overlapping == ("Exercise 4.5 (merge): not yet ✗ - case 1: merge([1, 2, 3, 1, 2], (1, 2), 9): "
                           "expected [9, 3, 9], got [9, 2, 3, 9]")
    assert drops_last == ("Exercise 4.5 (merge): not yet ✗ - case 1: merge([1, 2, 3, 1, 2], (1, 2), 9): "
                          "expected [9, 3, 9], got [9, 3]")
    assert a_tuple.endswith("case 1: expected a list of ids, got tuple")


# --- 4.1 BPE training (build) ---------------------------------------------------------------------


def by_count_then_ids(counts, tokens):
    return min(counts, key=lambda pair: (-counts[pair], pair))


def learn_merges(word_counts, tokens, vocab_size, pick=by_count_then_ids):
    """The simple trainer: recount every pair at each step (the package updates its counts incrementally)."""
    token_id = {token: i for i, token in enumerate(tokens)}
    words = {tuple(token_id[char] for char in word): count for word, count in word_counts.items()}
    merges = []
    while len(tokens) < vocab_size:
        counts = get_pair_counts(words)
        if not counts:
            break
        best = pick(counts, tokens)
        merges.append((tokens[best[0]], tokens[best[1]]))
        tokens.append(tokens[best[0]] + tokens[best[1]])
        words = {tuple(merge(list(word), best, len(tokens) - 1)): count for word, count in words.items()}
    return merges


def learn_merges_first_seen(word_counts, tokens, vocab_size):  # ties go to the pair counted first, not the smallest
    return learn_merges(word_counts, tokens, vocab_size, pick=lambda counts, tokens: max(counts, key=counts.get))


def learn_merges_by_spelling(word_counts, tokens, vocab_size):  # ties by the tokens' text: wrong once merges exist
    return learn_merges(word_counts, tokens, vocab_size, pick=lambda counts, tokens: min(
        counts, key=lambda pair: (-counts[pair], tokens[pair[0]], tokens[pair[1]])))


def test_learn_merges_check(capsys):
    passed, stubbed, first_seen = run_three(ch04.check_learn_merges, learn_merges, learn_merges_first_seen, capsys)
    ch04.check_learn_merges(learn_merges_by_spelling)
    ch04.check_learn_merges(lambda word_counts, tokens, vocab_size: learn_merges(word_counts, tokens, vocab_size)[:-1])
    by_spelling, one_short = outputs(capsys)
    assert passed == "Exercise 4.1 (BPE training): passed ✓"
    assert stubbed.startswith("Exercise 4.1 (BPE training): not attempted yet")
    assert first_seen.startswith("Exercise 4.1 (BPE training): not yet ✗ - case 1: vocab_size=266 on ['low low ")
    assert first_seen.endswith("...: merge 4 of 10: expected ('e', 'w'), got ('Ġ', 'low')")
    assert by_spelling.endswith(": merge 5 of 10: expected ('n', 'ew'), got ('ew', 'est')")
    assert one_short.endswith("...: expected 10 merges, got 9")


def test_learn_merges_check_wants_special_tokens_kept_first(capsys):
    def drops_special_tokens(word_counts, tokens, vocab_size):
        specials = [token for token in tokens if len(token) > 1]
        del tokens[:len(specials)]
        return learn_merges(word_counts, tokens, vocab_size)

    ch04.check_learn_merges(drops_special_tokens)
    assert "case 6: vocab_size=300 on [" in outputs(capsys)[0]


# --- 4.2 BPE encoding (build) ---------------------------------------------------------------------


def apply_merges(self, ids):
    ranks = {(self.vocab[a], self.vocab[b]): rank for rank, (a, b) in enumerate(self.merges)}
    ids = list(ids)
    while len(ids) > 1:
        pairs = list(zip(ids, ids[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))  # the leftmost of equal ranks
        if best not in ranks:
            break
        i = pairs.index(best)
        left, right = self.merges[ranks[best]]
        ids[i:i + 2] = [self.vocab[left + right]]
    return ids


def apply_merges_left_to_right(self, ids):  # joins a pair as soon as it is a merge, whatever its rank
    known = {(self.vocab[a], self.vocab[b]): self.vocab[a + b] for a, b in self.merges}
    out = list(ids[:1])
    for i in ids[1:]:
        if (out[-1], i) in known:
            out[-1] = known[out[-1], i]
        else:
            out.append(i)
    return out


def test_apply_merges_check(capsys):
    passed, stubbed, left_to_right = run_three(ch04.check_apply_merges, apply_merges, apply_merges_left_to_right,
                                               capsys)
    ch04.check_apply_merges(lambda self, ids: None)
    (nothing,) = outputs(capsys)
    assert passed == "Exercise 4.2 (BPE encoding): passed ✓"
    assert stubbed.startswith("Exercise 4.2 (BPE encoding): not attempted yet")
    assert left_to_right.startswith("Exercise 4.2 (BPE encoding): not yet ✗ - case 1: apply_merges on 'abc' (ids "
                                    "[64, 65, 66]) with 2 merges: expected tokens ['a', 'bc'] (ids [64, 256]), got "
                                    "['ab', 'c'] (ids [257, 66])")
    assert nothing.endswith("expected a list of int ids, got None")


# --- the plug-in ------------------------------------------------------------------------------------

RIGHT_AND_WRONG = [("learn_merges", learn_merges, learn_merges_first_seen),
                   ("apply_merges", apply_merges, apply_merges_left_to_right)]
CLAIM = ("BPETokenizer on your code, trained on the stories (vocab_size 1024): vocab, merges and the ids of 86 unseen "
         "texts equal HF tokenizers'")


@pytest.mark.parametrize("component, right, wrong", RIGHT_AND_WRONG, ids=[c for c, _, _ in RIGHT_AND_WRONG])
def test_plug_in_verdict(component, right, wrong, capsys):
    with use(**{component: right}):
        assert ch04.end_to_end_tokenizer()
    with use(**{component: wrong}):
        assert not ch04.end_to_end_tokenizer()
    right_line, wrong_line = capsys.readouterr().out.splitlines()
    assert right_line == f"{CLAIM}: ✓"
    assert wrong_line.startswith(f"{CLAIM}: ✗ - ")


def test_plug_in_failures_name_the_first_mismatch(capsys):
    with use(learn_merges=learn_merges_first_seen):
        ch04.end_to_end_tokenizer()
    with use(apply_merges=apply_merges_left_to_right):
        ch04.end_to_end_tokenizer()
    training, encoding = capsys.readouterr().out.splitlines()
    assert training.endswith("✗ - 768 merges, HF 768; first difference at merge 89")
    assert encoding.startswith(f"{CLAIM}: ✗ - encoding ") and ": first different id at position " in encoding


def test_plug_in_of_a_stub_is_skipped(capsys):
    for component, _, _ in RIGHT_AND_WRONG:
        with use(**{component: stub}):
            ch04.end_to_end_tokenizer()
    assert [line.split(" is not written")[0] for line in capsys.readouterr().out.splitlines()] == [
        "plug-in skipped: your learn_merges (exercise 4.1)", "plug-in skipped: your apply_merges (exercise 4.2)"]


@pytest.mark.parametrize("component, right, wrong", RIGHT_AND_WRONG, ids=[c for c, _, _ in RIGHT_AND_WRONG])
def test_plug_in_leaves_the_package_unchanged(component, right, wrong):
    from minillm import data

    originals = (tk.learn_merges, tk.BPETokenizer.apply_merges)
    stories = data.corpus("train").split(data.STORY_SEPARATOR)[:100]
    text = data.corpus("val")[:3000]

    def reference():
        tokenizer = tk.BPETokenizer.train(stories, 600)
        return tokenizer.vocab, tokenizer.merges, tokenizer.encode(text)

    before = reference()
    with use(**{component: wrong}):
        reference()
    with pytest.raises(RuntimeError, match="boom"), use(**{component: right}):
        raise RuntimeError("boom")
    assert (tk.learn_merges, tk.BPETokenizer.apply_merges) == originals
    assert reference() == before


def test_the_simple_trainer_learns_the_packages_merges_on_the_stories():
    """Why the build exercise may recount: on the chapter's corpus it learns what HF's incremental bookkeeping does."""
    from minillm import data

    stories = data.corpus("train").split(data.STORY_SEPARATOR)
    word_counts = {tk.to_byte_chars(piece): n for piece, n in Counter(p for s in stories for p in tk._SPLIT.findall(s)).items()}
    ours, theirs = sorted(tk.BYTE_TO_CHAR.values()), sorted(tk.BYTE_TO_CHAR.values())
    assert learn_merges(word_counts, ours, 1024) == tk.learn_merges(word_counts, theirs, 1024)
    assert ours == theirs
