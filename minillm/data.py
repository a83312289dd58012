"""A tiny synthetic story corpus: seeded, offline, pure standard library.

Every chapter that needs text takes it from here, so nothing is ever downloaded. Chapter 03 trains a
character-level MLP on `corpus()`, chapter 04 trains the BPE tokenizer on it, chapter 08 pretrains the
course's GPT on the train split and reports loss on the val split, and chapter 09 fine-tunes on
`qa_pairs()` and scores exact-match accuracy on held-out stories.

A story is a handful of facts (who, with whom, where, what was found, ...) drawn from small word lists
and rendered through a few sentence templates per step. The templates give a tiny model structure it
can learn in minutes; the more than 10^10 combinations of facts mean it cannot memorise the stories.

The split is decided by construction, not by chance: a story belongs to the val split exactly when its
(hero, place) pair is one of the held-out tenth of pairs (`split_of`). Every name and every place still
occurs in both splits, so val needs no unseen word; but no val story shares its text with a train story,
and "Where did Mia go?" on a val story has an answer the model never saw paired with Mia in training.

Randomness comes only from `random.Random(seed)` (never the global state), whose integer seeding and
`choice`/`random` are stable across platforms and Python 3.11+. Nothing iterates over a set, so string
hashing (PYTHONHASHSEED) cannot change the output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

# (name, subject pronoun): half "she", half "he", so pronoun agreement is something a model must learn.
CHARACTERS = (
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Lily", "she"), ("Omar", "he"),
    ("Zoe", "she"), ("Ben", "he"), ("Ella", "she"), ("Max", "he"), ("Nora", "she"), ("Finn", "he"),
    ("Ruby", "she"), ("Jack", "he"), ("Ivy", "she"), ("Theo", "he"), ("Maya", "she"), ("Eli", "he"),
    ("Rosa", "she"), ("Hugo", "he"), ("Lucy", "she"), ("Kai", "he"), ("Anna", "she"), ("Tom", "he"),
    ("Grace", "she"), ("Luis", "he"), ("Emma", "she"), ("Ravi", "he"), ("Sara", "she"), ("Owen", "he"),
)
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}  # subject, object, possessive
PLACES = (
    "the park", "the beach", "the library", "the forest", "the garden", "the zoo", "the market",
    "the farm", "the lake", "the museum", "the playground", "the river", "the hill", "the castle",
    "the bakery", "the meadow", "the harbor", "the old barn", "the train station", "the village square",
)
ITEMS = (
    "kite", "ball", "book", "hat", "key", "lamp", "shell", "feather", "drum", "umbrella",
    "box", "bell", "coin", "ribbon", "rope", "jar", "boat", "whistle", "marble", "puzzle",
    "basket", "blanket", "clock", "crayon", "flute", "mirror", "compass", "lantern", "teapot", "scarf",
)
ADJECTIVES = (
    "red", "blue", "green", "yellow", "orange", "shiny", "old", "tiny", "big", "soft",
    "strange", "golden", "striped", "little", "odd", "heavy",
)
# Past-tense verb phrases, so that "they {action}." and the answer to "What did X and Y do?" agree.
ACTIONS = (
    "built a tall tower", "sang a silly song", "drew a funny picture", "played a game of tag",
    "had a small picnic", "told each other stories", "danced in a circle", "counted the clouds",
    "made up a new game", "looked for hidden treasure", "shared a snack", "played hide and seek",
    "practiced a magic trick", "wrote a short poem", "watched the birds", "made a paper crown",
    "planned a secret club", "laughed at silly jokes", "learned a new dance", "raced to the fence",
)
FEELINGS = ("happy", "proud", "excited", "surprised", "curious", "brave", "cheerful", "glad",
            "thrilled", "amazed")
TIMES = ("morning", "afternoon", "evening", "Saturday", "Sunday", "summer day", "rainy day", "windy day")

# One template is drawn per step; steps whose name ends in "?" (see STEPS) are skipped half the time.
# Only the hero is ever a pronoun, so every he/she/him/her/his in a story refers to the hero.
OPENINGS = (
    "One {time}, {hero} went to {place}.",
    "{hero} walked to {place} one {time}.",
    "Early one {time}, {hero} ran all the way to {place}.",
    "One {time}, {hero} put on {pos} shoes and went to {place}.",
    "{hero} had never been to {place}, so one {time} {sub} went there.",
)
SCENES = (
    "{Place} was quiet, and the sky was bright.",
    "{Place} was full of people and noise.",
    "There was nobody else around.",
    "The wind moved the leaves, and everything smelled fresh.",
)
FINDS = (
    "There {sub} found {thing}.",
    "Near the gate, {sub} found {thing} lying on the ground.",
    "Behind a bench, {hero} spotted {thing}.",
    "Suddenly {sub} discovered {thing} in the grass.",
    "{Sub} looked around and found {thing} under a pile of leaves.",
)
DETAILS = (
    "The {item} was a little dusty, but it still looked nice.",
    "{Sub} picked up the {item} and turned it over in {pos} hands.",
    "It looked like nobody had touched the {item} for years.",
    "{Sub} wondered who had left the {item} there.",
)
REACTIONS = (
    "{Sub} felt {feeling}.",
    "This made {hero} very {feeling}.",
    "{hero} was so {feeling} that {sub} smiled.",
    "{Pos} heart jumped, and {sub} felt {feeling}.",
)
DIALOGUES = (
    '"Look at this!" {sub} said.',
    '"I will take good care of it," {hero} said.',
    '"Is it magic?" {sub} wondered.',
    '{hero} held it up and said, "What a find!"',
)
ARRIVALS = (
    "Then {pos} friend {friend} came by.",
    "Soon {friend} arrived and asked to see it.",
    "{Pos} friend {friend} came running over.",
    "A moment later, {friend} walked up to {obj}.",
)
TOGETHER = (
    "Together they {action}.",
    "Then {hero} and {friend} {action}.",
    "{friend} had an idea, so they {action}.",
    "They took the {item} with them and {action}.",
)
ENDINGS = (
    "When the sun went down, {hero} went home with the {item}.",
    '"This was the best day ever," said {hero}.',
    "{hero} kept the {item} safe for a long time.",
    "{hero} and {friend} promised to meet again soon.",
    "In the end, {hero} gave the {item} a special place in {pos} room.",
)
STEPS = (("opening", OPENINGS), ("scene?", SCENES), ("find", FINDS), ("detail", DETAILS),
         ("reaction", REACTIONS), ("dialogue?", DIALOGUES), ("arrival", ARRIVALS), ("together", TOGETHER),
         ("ending", ENDINGS))

SPLITS = ("train", "val")
HELD_OUT_EVERY = 10  # one (hero, place) pair in ten goes to val
DEFAULT_N_STORIES = 800  # train ~255 KB, val ~27 KB (about a tenth); each story is 45-95 words
STORY_SEPARATOR = "\n\n"  # between stories; a story itself is one line
ALPHABET = frozenset(chr(code) for code in range(32, 127)) | {"\n"}  # printable ASCII plus newline
QUESTIONS = {
    "place": "Where did {hero} go?",
    "friend": "Who played with {hero}?",
    "item": "What did {hero} find?",
    "action": "What did {hero} and {friend} do?",
    "feeling": "How did {hero} feel?",
}
QUESTION_KINDS = tuple(QUESTIONS)

_NAME_INDEX = {name: index for index, (name, _) in enumerate(CHARACTERS)}
_PLACE_INDEX = {place: index for index, place in enumerate(PLACES)}


@dataclass(frozen=True)
class Story:
    """The facts of one story and the text rendered from them. `generate_stories` makes these."""

    hero: str
    friend: str
    place: str  # with its article: "the park"
    item: str  # a bare noun: "kite"
    adjective: str
    action: str  # past tense: "built a tall tower"
    feeling: str
    time: str
    text: str

    @property
    def pronoun(self) -> str:
        """The hero's subject pronoun, "she" or "he"."""
        return CHARACTERS[_NAME_INDEX[self.hero]][1]

    @property
    def thing(self) -> str:
        """What the hero found, with the article that agrees with the adjective: "an old kite"."""
        return _with_article(self.adjective, self.item)


class QAPair(NamedTuple):
    """A fine-tuning example (chapter 09): `prompt` ends with "A:", `answer` starts with a space.

    Train on `prompt + answer + "\\n"`; evaluate by greedy generation from `prompt` up to the first
    newline, scored as an exact match with `answer`.
    """

    prompt: str
    answer: str


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        # Also for seeds: random.Random(-s) is the same stream as random.Random(s).
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(map(repr, SPLITS))}")


def _with_article(adjective: str, noun: str) -> str:
    return f"{'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {noun}"


def _render(rng: random.Random, fields: dict[str, str]) -> str:
    sentences = []
    for step, templates in STEPS:
        if step.endswith("?") and rng.random() < 0.5:
            continue
        sentences.append(rng.choice(templates).format(**fields))
    return " ".join(sentences)


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """Return `n` stories drawn from `random.Random(seed)`; the same list for the same arguments.

    Stories are drawn one after another from one stream, so `generate_stories(m, s)` is the first `m`
    of `generate_stories(n, s)` for m <= n.
    """
    _check_count("n", n)
    _check_count("seed", seed)
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        hero, pronoun = rng.choice(CHARACTERS)
        friend = rng.choice([name for name, _ in CHARACTERS if name != hero])
        facts = dict(hero=hero, friend=friend, place=rng.choice(PLACES), item=rng.choice(ITEMS),
                     adjective=rng.choice(ADJECTIVES), action=rng.choice(ACTIONS),
                     feeling=rng.choice(FEELINGS), time=rng.choice(TIMES))
        sub, obj, pos = PRONOUNS[pronoun]
        # Capitalised variants for templates that start a sentence with a pronoun or the place.
        fields = dict(facts, sub=sub, Sub=sub.capitalize(), obj=obj, pos=pos, Pos=pos.capitalize(),
                      Place=facts["place"].capitalize(),
                      thing=_with_article(facts["adjective"], facts["item"]))
        stories.append(Story(**facts, text=_render(rng, fields)))
    return stories


def split_of(story: Story) -> str:
    """Return "val" if the story's (hero, place) pair is held out, else "train".

    (name index + place index) % 10 == 0 holds for exactly one pair in ten, and for every name it holds
    for 2 of the 20 places (for every place, 3 of the 30 names), so each word still appears in train.
    """
    held_out = (_NAME_INDEX[story.hero] + _PLACE_INDEX[story.place]) % HELD_OUT_EVERY == 0
    return "val" if held_out else "train"


def split_stories(split: str = "train", seed: int = 0, n_stories: int = DEFAULT_N_STORIES) -> list[Story]:
    """The stories of one split ("train" or "val") among the first `n_stories` drawn with `seed`."""
    _check_split(split)
    _check_count("n_stories", n_stories)
    return [story for story in generate_stories(n_stories, seed) if split_of(story) == split]


def corpus(split: str = "train", seed: int = 0, n_stories: int = DEFAULT_N_STORIES) -> str:
    """The text of one split: its stories joined by a blank line. Train is ~255 KB by default."""
    return STORY_SEPARATOR.join(story.text for story in split_stories(split, seed, n_stories))


def qa_pairs(stories: list[Story], kinds: tuple[str, ...] = QUESTION_KINDS) -> list[QAPair]:
    """One question per story and kind, in that order; each answer is copied from the story's text.

    Kinds are "place", "friend", "item", "action" and "feeling". Use train stories to fine-tune and val
    stories to score: there the (hero, place) pair never occurred in training.
    """
    for kind in kinds:
        if kind not in QUESTIONS:
            raise ValueError(f"unknown question kind {kind!r}; allowed: {', '.join(map(repr, QUESTIONS))}")
    pairs = []
    for story in stories:
        answers = dict(place=story.place, friend=story.friend, item=story.thing, action=story.action,
                       feeling=story.feeling)
        for kind in kinds:
            question = QUESTIONS[kind].format(hero=story.hero, friend=story.friend)
            pairs.append(QAPair(f"Story: {story.text}\nQ: {question}\nA:", f" {answers[kind]}"))
    return pairs


def vocabulary() -> dict[str, tuple[str, ...]]:
    """The word lists the grammar draws from, for chapters to show (names in `CHARACTERS` order)."""
    return {"names": tuple(name for name, _ in CHARACTERS), "places": PLACES, "items": ITEMS,
            "adjectives": ADJECTIVES, "actions": ACTIONS, "feelings": FEELINGS, "times": TIMES}
