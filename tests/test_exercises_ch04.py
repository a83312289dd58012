"""Chapter 04's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

from minillm.exercises import ch04
from exercise_helpers import stub, outputs


# --- 4.1 bytes_to_unicode -------------------------------------------------------------------------


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
    assert passed == "Exercise 4.1 (bytes_to_unicode): passed ✓"
    assert stubbed.startswith("Exercise 4.1 (bytes_to_unicode): not attempted yet")
    assert identity == ("Exercise 4.1 (bytes_to_unicode): not yet ✗ - case 1: byte 0 (b'\\x00'): "
                        "expected 'Ā', got '\\x00'")
    assert soft_hyphen.startswith("Exercise 4.1 (bytes_to_unicode): not yet ✗ - case 1: byte 127 (b'\\x7f'): "
                                  "expected 'ġ'")
    assert a_list.endswith("case 1: expected a dict {byte: character}, got list")


# --- 4.2 get_pair_counts --------------------------------------------------------------------------


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
    assert passed == "Exercise 4.2 (get_pair_counts): passed ✓"
    assert "not attempted yet" in stubbed
    assert unweighted.startswith("Exercise 4.2 (get_pair_counts): not yet ✗ - case 2: for words ")
    assert unweighted.endswith("pair (1, 2) expected count 5, got 1")
    assert once_per_word.endswith("case 3: for words {(4, 4, 4, 4): 3}: pair (4, 4) expected count 9, got 3")


# --- 4.3 merge ------------------------------------------------------------------------------------


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
    assert passed == "Exercise 4.3 (merge): passed ✓"
    assert "not attempted yet" in stubbed
    assert overlapping == ("Exercise 4.3 (merge): not yet ✗ - case 1: merge([1, 2, 3, 1, 2], (1, 2), 9): "
                           "expected [9, 3, 9], got [9, 2, 3, 9]")
    assert drops_last == ("Exercise 4.3 (merge): not yet ✗ - case 1: merge([1, 2, 3, 1, 2], (1, 2), 9): "
                          "expected [9, 3, 9], got [9, 3]")
    assert a_tuple.endswith("case 1: expected a list of ids, got tuple")


# --- 4.4 encode one word --------------------------------------------------------------------------


def encode_word(word, merges):
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    tokens = list(word)
    while len(tokens) > 1:
        pairs = list(zip(tokens, tokens[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))  # the leftmost on ties
        if best not in ranks:
            break
        i = pairs.index(best)
        tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
    return tokens


def encode_left_to_right(word, merges):
    # Joins a pair as soon as it is a merge, ignoring which merge was learned first.
    known = set(merges)
    tokens = [word[0]] if word else []
    for char in word[1:]:
        if (tokens[-1], char) in known:
            tokens[-1] += char
        else:
            tokens.append(char)
    return tokens


def encode_longest_prefix(word, merges):
    # WordPiece-style: the longest known token from the left, repeatedly.
    vocab = {a + b for a, b in merges} | set(word)
    tokens = []
    while word:
        end = max(n for n in range(1, len(word) + 1) if word[:n] in vocab)
        tokens.append(word[:end])
        word = word[end:]
    return tokens


def test_encode_word_check(capsys):
    ch04.check_encode_word(encode_word)
    ch04.check_encode_word(stub)
    ch04.check_encode_word(encode_left_to_right)
    ch04.check_encode_word(encode_longest_prefix)
    passed, stubbed, left_to_right, longest_prefix = outputs(capsys)
    assert passed == "Exercise 4.4 (encode one word): passed ✓"
    assert "not attempted yet" in stubbed
    expected_abc = "case 1: encode_word('abc') with 2 merges: expected ['a', 'bc'], got ['ab', 'c']"
    assert left_to_right == f"Exercise 4.4 (encode one word): not yet ✗ - {expected_abc}"
    assert longest_prefix == f"Exercise 4.4 (encode one word): not yet ✗ - {expected_abc}"


# --- 4.5 train merges -----------------------------------------------------------------------------


def train_merges(word_counts, num_merges, tie_break_by_ids=True):
    from minillm.tokenizer import bytes_to_unicode

    tokens = sorted(bytes_to_unicode().values())
    token_id = {token: i for i, token in enumerate(tokens)}
    words = {tuple(token_id[char] for char in word): count for word, count in word_counts.items()}
    merges = []
    for _ in range(num_merges):
        counts = get_pair_counts(words)
        if not counts:
            break
        if tie_break_by_ids:
            best = min(counts, key=lambda pair: (-counts[pair], pair))
        else:  # by spelling: right for single bytes, but a merged token's id is its creation order, not its spelling
            best = min(counts, key=lambda pair: (-counts[pair], tokens[pair[0]], tokens[pair[1]]))
        tokens.append(tokens[best[0]] + tokens[best[1]])
        merges.append((tokens[best[0]], tokens[best[1]]))
        words = {tuple(merge(list(word), best, len(tokens) - 1)): count for word, count in words.items()}
    return merges


def train_merges_by_first_seen(word_counts, num_merges):
    # On ties takes the pair seen first (what max() over a dict does) instead of the smallest ids.
    from minillm.tokenizer import bytes_to_unicode

    tokens = sorted(bytes_to_unicode().values())
    token_id = {token: i for i, token in enumerate(tokens)}
    words = {tuple(token_id[char] for char in word): count for word, count in word_counts.items()}
    merges = []
    for _ in range(num_merges):
        counts = get_pair_counts(words)
        if not counts:
            break
        best = max(counts, key=counts.get)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        merges.append((tokens[best[0]], tokens[best[1]]))
        words = {tuple(merge(list(word), best, len(tokens) - 1)): count for word, count in words.items()}
    return merges


def test_train_merges_check(capsys):
    ch04.check_train_merges(train_merges)
    ch04.check_train_merges(stub)
    ch04.check_train_merges(train_merges_by_first_seen)
    ch04.check_train_merges(lambda word_counts, num_merges: train_merges(word_counts, num_merges, False))
    ch04.check_train_merges(lambda word_counts, num_merges: train_merges(word_counts, num_merges)[:-1])
    passed, stubbed, first_seen, by_spelling, one_short = outputs(capsys)
    assert passed == "Exercise 4.5 (train merges): passed ✓"
    assert "not attempted yet" in stubbed
    assert first_seen.startswith("Exercise 4.5 (train merges): not yet ✗ - case 1: merge 4 of 10 on ['low low ")
    assert first_seen.endswith("...: expected ('e', 'w'), got ('Ġ', 'low')")
    assert by_spelling.endswith(": expected ('n', 'ew'), got ('ew', 'est')")
    assert one_short == "Exercise 4.5 (train merges): not yet ✗ - case 1: expected 10 merges, got 9"
