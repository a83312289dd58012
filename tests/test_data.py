"""minillm.data: deterministic, disjoint splits, grammatical stories, answerable questions.

There is no reference library for a synthetic corpus, so these tests check the promises later chapters rely
on: the same text on every machine (chapter 08's shipped checkpoint is trained on it), splits that share no
story (chapter 08's val loss), and questions whose one correct answer is in the story (chapter 09).
"""

import hashlib
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from minillm import data

N = 2000


@pytest.fixture(scope="module")
def stories():
    return data.generate_stories(N, seed=0)


@pytest.fixture(scope="module")
def default_splits():
    return {split: data.split_stories(split) for split in data.SPLITS}


def word_pattern(words):
    return re.compile(r"\b(" + "|".join(re.escape(word) for word in words) + r")\b")


# --- determinism -------------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_stories_and_other_seeds_differ():
    assert data.generate_stories(300, seed=7) == data.generate_stories(300, seed=7), \
        "generate_stories must be a pure function of (n, seed): draw only from random.Random(seed)"
    same = sum(a.text == b.text for a, b in zip(data.generate_stories(300, 7), data.generate_stories(300, 8)))
    assert same == 0, f"seeds 7 and 8 produced {same} identical stories; different seeds must differ"


def test_more_stories_extend_fewer():
    assert data.generate_stories(500, seed=3)[:120] == data.generate_stories(120, seed=3), \
        "stories are drawn one after another from one stream: a shorter list must be a prefix of a longer one"


def test_global_random_state_is_neither_used_nor_changed():
    random.seed(1)
    before = random.getstate()
    first = data.generate_stories(50)
    assert random.getstate() == before, \
        "generate_stories changed the global random state; draw from random.Random(seed)"
    random.seed(2)
    assert data.generate_stories(50) == first, "the output depended on the global random state"


def test_output_does_not_depend_on_string_hashing():
    fingerprint = ("hashlib.sha256((data.corpus('train', 5, 300) + data.corpus('val', 5, 300)).encode())"
                   ".hexdigest()")
    here = eval(fingerprint)
    code = f"import hashlib; from minillm import data; print({fingerprint})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == here, \
            f"PYTHONHASHSEED={hash_seed} changed the corpus: something iterates over a set or hash order"


# --- splits and sizes --------------------------------------------------------------------------------------

def test_splits_partition_the_stories_and_share_no_text(default_splits):
    train, val = default_splits["train"], default_splits["val"]
    everything = data.generate_stories(data.DEFAULT_N_STORIES)
    assert len(train) + len(val) == len(everything), "every story must land in exactly one split"
    shared = {s.text for s in train} & {s.text for s in val}
    assert not shared, f"{len(shared)} story texts are in both splits, e.g. {sorted(shared)[0]!r}"
    train_pairs = {(s.hero, s.place) for s in train}
    leaked = [(s.hero, s.place) for s in val if (s.hero, s.place) in train_pairs]
    assert not leaked, f"val (hero, place) pairs must never occur in train; these do: {leaked[:3]}"


def test_every_word_occurs_in_train(default_splits):
    # Held-out pairs, not held-out words: val must not need a name or place the model never saw.
    train = default_splits["train"]
    assert {s.hero for s in train} == set(data.vocabulary()["names"]), "some name never heads a train story"
    assert {s.place for s in train} == set(data.PLACES), "some place never occurs in a train story"


def test_default_sizes_are_in_the_documented_ranges():
    train, val = data.corpus("train"), data.corpus("val")
    assert 200_000 <= len(train) <= 300_000, \
        f"default train corpus is {len(train)} chars; documented as 200-300 KB"
    fraction = len(val) / (len(train) + len(val))
    assert 0.07 <= fraction <= 0.13, f"val is {fraction:.1%} of the text; documented as about a tenth"
    assert data.corpus("train", n_stories=0) == "" and data.generate_stories(0) == []


def test_corpus_uses_only_printable_ascii_and_newline():
    # The alphabet chapter 03's character model embeds: the 95 printable ASCII characters plus "\n".
    text = data.corpus("train") + data.corpus("val")
    stray = set(text) - data.ALPHABET
    assert not stray, f"characters outside printable ASCII + newline: {sorted(stray)}"
    pieces = text.split(data.STORY_SEPARATOR)
    assert all("\n" not in piece and piece for piece in pieces), \
        "a story must be one non-empty line so that STORY_SEPARATOR alone marks story boundaries"


# --- grammar -----------------------------------------------------------------------------------------------

def test_story_length_is_40_to_120_words(stories):
    counts = [len(s.text.split()) for s in stories]
    assert 40 <= min(counts) and max(counts) <= 120, \
        f"word counts range {min(counts)}-{max(counts)}; templates must keep stories at 40-120 words"


def test_pronouns_agree_with_the_hero(stories):
    pronoun_words = word_pattern(sorted({p for forms in data.PRONOUNS.values() for p in forms}))
    for story in stories:
        used = set(pronoun_words.findall(story.text.lower()))
        allowed = set(data.PRONOUNS[story.pronoun])
        assert used <= allowed, \
            f"{story.hero} is '{story.pronoun}' but the story uses {sorted(used - allowed)}: {story.text!r}"
    assert {s.pronoun for s in stories} == set(data.PRONOUNS), "heroes of every gender must occur"


def test_every_fact_appears_in_the_text(stories):
    for story in stories:
        assert story.hero != story.friend, \
            f"{story.hero} is both hero and friend; draw the friend from the other names"
        expected = [story.hero, story.friend, story.place, story.thing, story.action, story.feeling,
                    story.time]
        missing = [fact for fact in expected if fact not in story.text]
        assert not missing, f"facts {missing} are not in the text: {story.text!r}"


def test_no_competing_fact_of_the_same_kind(stories):
    # Each question must have one answer: a story names one place, one item, one feeling, one action.
    vocab = data.vocabulary()
    checks = {"places": (lambda s: {s.place}, re.IGNORECASE), "items": (lambda s: {s.item}, 0),
              "feelings": (lambda s: {s.feeling}, 0), "actions": (lambda s: {s.action}, 0),
              "names": (lambda s: {s.hero, s.friend}, 0)}
    for kind, (facts, flags) in checks.items():
        pattern = re.compile(word_pattern(vocab[kind]).pattern, flags)
        for story in stories:
            found = {match.lower() for match in pattern.findall(story.text)}
            assert found == {fact.lower() for fact in facts(story)}, \
                f"{kind}: story facts are {sorted(facts(story))} but the text mentions {sorted(found)}"


def test_a_and_an_agree_with_the_adjective(stories):
    for story in stories:
        article = story.thing.split()[0]
        assert article == ("an" if story.adjective[0] in "aeiou" else "a"), \
            f"wrong article in {story.thing!r}"


# --- variety -----------------------------------------------------------------------------------------------

def test_stories_are_varied_enough_not_to_be_memorised(stories):
    distinct = len({s.text for s in stories})
    assert distinct >= 0.99 * N, f"only {distinct} distinct stories out of {N}; want at least 99%"
    for kind, words in data.vocabulary().items():
        key = {"names": "hero", "places": "place", "items": "item", "adjectives": "adjective",
               "actions": "action", "feelings": "feeling", "times": "time"}[kind]
        unused = set(words) - {getattr(s, key) for s in stories}
        assert not unused, f"{kind} never drawn in {N} stories: {sorted(unused)}"


def test_distinct_word_bigrams_keep_growing(stories):
    def bigrams(some):
        words = " ".join(s.text for s in some).split()
        return len(set(zip(words, words[1:])))

    small, large = bigrams(stories[:200]), bigrams(stories)
    assert large > 1.2 * small, \
        f"distinct bigrams {small} (200 stories) -> {large} ({N} stories): the corpus saturates"


def test_templates_give_learnable_structure(stories):
    # Regularity a tiny model can pick up: the same sentence openings recur across many stories.
    openings = Counter(s.text.split()[0] for s in stories)
    assert openings.most_common(1)[0][1] >= N // 10, "no sentence opening recurs; the corpus has no structure"


# --- questions ---------------------------------------------------------------------------------------------

def test_qa_answers_are_in_their_story(stories):
    some = stories[:300]
    pairs = data.qa_pairs(some)
    assert len(pairs) == len(some) * len(data.QUESTION_KINDS)
    for index, (prompt, answer) in enumerate(pairs):
        story = some[index // len(data.QUESTION_KINDS)]
        assert prompt.startswith(f"Story: {story.text}\nQ: ") and prompt.endswith("\nA:"), prompt
        assert answer.startswith(" ") and answer.strip() in story.text, \
            f"answer {answer!r} is not in its story {story.text!r}"


def test_qa_kinds_select_questions(stories):
    story = stories[0]
    place_only = data.qa_pairs([story], kinds=("place",))
    assert place_only == [data.QAPair(place_only[0].prompt, f" {story.place}")]
    assert data.qa_pairs([story], kinds=("feeling", "item"))[1].answer == f" {story.thing}"


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, words", [
    (lambda: data.generate_stories(-1), ValueError, "n must be >= 0"),
    (lambda: data.generate_stories(10, seed=-3), ValueError, "seed must be >= 0"),
    (lambda: data.generate_stories(2.5), TypeError, "n must be an int"),
    (lambda: data.generate_stories(True), TypeError, "n must be an int"),
    (lambda: data.corpus("test"), ValueError, "'train', 'val'"),
    (lambda: data.split_stories("validation"), ValueError, "'validation'"),
    (lambda: data.corpus("train", n_stories=-5), ValueError, "n_stories must be >= 0"),
    (lambda: data.qa_pairs([], kinds=("colour",)), ValueError,
     "'place', 'friend', 'item', 'action', 'feeling'"),
])
def test_bad_input_names_what_is_allowed(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


def test_vocabulary_has_the_documented_shape():
    vocab = data.vocabulary()
    for kind, words in vocab.items():
        assert len(set(words)) == len(words), f"{kind} has duplicates"
    assert 20 <= len(vocab["names"]) <= 40 and len(vocab["places"]) >= 20 and len(vocab["items"]) >= 30
    assert len(vocab["actions"]) >= 20
    genders = Counter(pronoun for _, pronoun in data.CHARACTERS)
    assert set(genders) == set(data.PRONOUNS) and min(genders.values()) >= 10, \
        f"unbalanced genders: {genders}"
