"""Task data for the steering and circuit evals, generated offline from word lists.

Steering: named *concepts*, each a small labelled prompt set (texts that express the concept, and
target words), plus neutral *steering prompts* to continue.

Circuits: clean/corrupt prompt pairs with answer and wrong-answer token sets, scored by a
logit-difference metric ``m = mean logit(answers) − mean logit(wrongs)`` at the last position:

- ``ioi`` (indirect-object identification, Wang et al. 2022): "When Mary and John went to the
  store, John gave a drink to" → " Mary" (answer) vs " John" (wrong). The corrupt prompt repeats
  the indirect object instead of the subject ("..., Mary gave a drink to"), which flips the answer.
- ``sva`` (subject–verb agreement, Marks et al.): "The dog near the cars" → " is" vs " are"; the
  corrupt prompt has the plural subject ("The dogs near the cars").
- ``greater_than`` (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" → years
  greater than 32 vs smaller ones. With a tokenizer that splits digits (SmolLM2, Llama) the answer
  is the next digit: tens digits above 3 vs below 3; with two-digit year tokens (GPT-2) it is the
  two-digit token. The corrupt prompt starts from year ``01`` (``1701``).

Every task keeps only prompts whose clean and corrupt versions are equally long and whose
answers are single tokens, and then the most common length, so a task is one ``[n, L]`` tensor and
mean-ablation can use per-position means.

Reference head circuits for GPT-2 small (for ``compare_heads``) are the ones ACDC (Conmy et al.
2023) uses as ground truth: IOI from Wang et al. (2022), greater-than from Hanna et al. (2023).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

# --------------------------------------------------------------------------- steering data


@dataclass(frozen=True)
class Concept:
    """A steering concept: texts that express it, neutral texts that do not, and target words."""

    name: str
    positive: tuple[str, ...]
    target_words: tuple[str, ...]
    negative: tuple[str, ...] = ()

    def target_token_ids(self, tokenizer) -> list[int]:
        """Ids of the target words that are single tokens (with a leading space, and without)."""
        ids = set()
        for w in self.target_words:
            for form in (" " + w, w):
                t = tokenizer(form, add_special_tokens=False)["input_ids"]
                if len(t) == 1:
                    ids.add(int(t[0]))
        return sorted(ids)


NEUTRAL_TEXTS = (
    "The meeting was moved to Thursday afternoon because two people were travelling.",
    "She folded the letter, put it in an envelope and walked to the post office.",
    "Please check that the form is signed before you hand it in at the front desk.",
    "The train left a few minutes late, but it still arrived on time.",
    "He wrote the numbers down in a small notebook and closed it carefully.",
    "The report lists the main findings first and the details after that.",
    "They painted the fence white and left the gate open to dry.",
    "It was a quiet morning, and the street was almost empty.",
)

CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept(
            "food",
            (
                "She baked fresh bread and served it with butter and honey.",
                "The soup was made with carrots, onions, garlic and a little pepper.",
                "For dinner we cooked pasta with tomato sauce and cheese.",
                "He ordered a pizza, a salad and a bowl of rice.",
                "The recipe needs two eggs, a cup of flour and some sugar.",
                "Grilled chicken with potatoes is my favourite meal.",
                "The chef tasted the sauce and added more salt.",
                "We had pancakes with fruit and cream for breakfast.",
            ),
            ("food", "bread", "cheese", "soup", "pizza", "chicken", "rice", "eat", "cook", "delicious", "dinner", "meal"),
            NEUTRAL_TEXTS,
        ),
        Concept(
            "ocean",
            (
                "The waves crashed against the rocks as the tide came in.",
                "We sailed across the sea and watched the dolphins swim beside the boat.",
                "The beach was covered in shells after the storm.",
                "Deep in the ocean, whales sing to each other.",
                "The fishermen pulled their nets from the salty water.",
                "A lighthouse guided the ships safely into the harbour.",
                "Coral reefs are full of colourful fish.",
                "The sailor looked out over the endless blue sea.",
            ),
            ("ocean", "sea", "waves", "beach", "boat", "ship", "water", "fish", "sail", "tide", "shore"),
            NEUTRAL_TEXTS,
        ),
        Concept(
            "programming",
            (
                "The function returns a list of integers sorted in ascending order.",
                "Run pip install to add the package, then import it in your script.",
                "The compiler raised a syntax error on line twelve.",
                "Define a class with an __init__ method and two attributes.",
                "The loop iterates over the array and sums each element.",
                "Use a dictionary to map each key to its value.",
                "The unit tests failed after the last commit to the repository.",
                "Call the API and parse the JSON response.",
            ),
            ("code", "function", "Python", "variable", "class", "import", "def", "return", "compile", "program", "bug"),
            NEUTRAL_TEXTS,
        ),
        Concept(
            "music",
            (
                "The band played a slow song and the crowd sang along.",
                "She practised the piano for an hour every evening.",
                "The orchestra tuned their violins before the concert.",
                "He wrote the melody first and added the lyrics later.",
                "The guitar solo was the best part of the album.",
                "They danced to the rhythm of the drums.",
                "The choir sang in perfect harmony.",
                "I listened to my favourite songs on the radio.",
            ),
            ("music", "song", "piano", "guitar", "sing", "band", "concert", "melody", "dance", "album"),
            NEUTRAL_TEXTS,
        ),
    )
}

STEERING_PROMPTS = (
    "Tell me about your day.",
    "Write a short story about a walk in the city.",
    "Here is what I think about the weekend:",
    "The best way to spend a free afternoon is",
    "Describe the view from your window.",
    "Yesterday I went to",
    "Let me explain how this works:",
    "Give me some advice on starting a new job.",
    "My neighbour told me that",
    "Write a few sentences about a friend.",
    "The most interesting thing I learned this week is",
    "Once upon a time,",
)


# --------------------------------------------------------------------------- circuit tasks


@dataclass
class CircuitTask:
    """Clean/corrupt prompt pairs with answer sets; all rows have the same length."""

    name: str
    clean: Tensor  # [n, L]
    corrupt: Tensor  # [n, L]
    answers: list[tuple[int, ...]]  # per example: token ids whose logits count positively
    wrongs: list[tuple[int, ...]]  # per example: token ids whose logits count negatively
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return self.clean.shape[0]

    def subset(self, idx: list[int] | range) -> "CircuitTask":
        idx = list(idx)
        return CircuitTask(self.name, self.clean[idx], self.corrupt[idx], [self.answers[i] for i in idx], [self.wrongs[i] for i in idx],
                           [self.meta[i] for i in idx] if self.meta else [])

    def split(self, train_fraction: float = 0.5) -> tuple["CircuitTask", "CircuitTask"]:
        """(discovery, test) halves; test gets at least one example."""
        n_train = min(len(self) - 1, max(1, round(train_fraction * len(self))))
        return self.subset(range(n_train)), self.subset(range(n_train, len(self)))

    def metric_weights(self, vocab: int, device=None) -> Tensor:
        """[n, vocab] weights w with ``m = Σ_v w[v] · logits[-1, v]`` = mean logit(answers) − mean logit(wrongs)."""
        w = torch.zeros(len(self), vocab, device=device)
        for i, (a, b) in enumerate(zip(self.answers, self.wrongs)):
            w[i, list(a)] += 1.0 / len(a)
            w[i, list(b)] -= 1.0 / len(b)
        return w


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single(tokenizer, word: str) -> int | None:
    t = _ids(tokenizer, word)
    return int(t[0]) if len(t) == 1 else None


def _bos(tokenizer) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start prompts with")
    return int(bos)


def _assemble(name: str, tokenizer, rows: list[tuple[str, str, tuple, tuple, dict]], n: int, seed: int) -> CircuitTask:
    """Tokenise (clean, corrupt, answers, wrongs, meta) rows, keep equal-length pairs of the modal length."""
    bos = _bos(tokenizer)
    kept = []
    for clean, corrupt, ans, wrong, meta in rows:
        c, k = [bos] + _ids(tokenizer, clean), [bos] + _ids(tokenizer, corrupt)
        if len(c) == len(k) and ans and wrong:
            kept.append((c, k, ans, wrong, meta | {"clean": clean, "corrupt": corrupt}))
    if not kept:
        raise ValueError(f"task {name!r}: no prompt pair has equal clean/corrupt lengths under this tokenizer")
    length = Counter(len(c) for c, *_ in kept).most_common(1)[0][0]
    kept = [r for r in kept if len(r[0]) == length]
    random.Random(seed).shuffle(kept)
    kept = kept[:n]
    return CircuitTask(
        name,
        torch.tensor([r[0] for r in kept]),
        torch.tensor([r[1] for r in kept]),
        [tuple(r[2]) for r in kept],
        [tuple(r[3]) for r in kept],
        [r[4] for r in kept],
    )


NAMES = ("Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Lisa", "Kate", "Anna", "Paul", "Mark", "Mike", "Sarah",
         "Laura", "Emma", "Jack", "Alex", "Ben", "Sam", "Max", "Joe", "Bob", "Tim", "Eric", "Steve", "Rachel", "Jane", "Peter",
         "David", "Chris", "Ryan", "Adam", "Luke", "Matt", "Rose", "Grace", "Alice", "Nick")
PLACES = ("store", "park", "school", "garden", "restaurant", "beach", "office", "station", "hospital", "market", "library", "river")
OBJECTS = ("ring", "book", "drink", "ball", "gift", "letter", "key", "bag", "snack", "flower", "phone", "hat")
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave a {obj} to",
    "Then, {A} and {B} had a long argument. Afterwards, {S} said to",
    "Friends {A} and {B} found a {obj} at the {place}. {S} gave it to",
    "When {A} and {B} got a {obj} at the {place}, {S} decided to give it to",
)


def ioi_task(tokenizer, n: int = 64, seed: int = 0) -> CircuitTask:
    """Indirect-object identification (ABBA and BABA orders); corrupt = the IO repeated as S2."""
    rng = random.Random(seed)
    names = [w for w in NAMES if _single(tokenizer, " " + w) is not None]
    if len(names) < 2:
        raise ValueError("ioi: fewer than two names are single tokens under this tokenizer")
    rows = []
    for _ in range(n * 4):
        io, s = rng.sample(names, 2)
        tpl = rng.choice(IOI_TEMPLATES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        clean = tpl.format(A=a, B=b, S=s, place=place, obj=obj)
        corrupt = tpl.format(A=a, B=b, S=io, place=place, obj=obj)
        rows.append((clean, corrupt, (_single(tokenizer, " " + io),), (_single(tokenizer, " " + s),),
                     {"io": io, "s": s, "order": "ABBA" if a == io else "BABA", "template": IOI_TEMPLATES.index(tpl)}))
    return _assemble("ioi", tokenizer, rows, n, seed)


NOUN_PAIRS = (("dog", "dogs"), ("cat", "cats"), ("author", "authors"), ("teacher", "teachers"), ("girl", "girls"), ("boy", "boys"),
              ("doctor", "doctors"), ("farmer", "farmers"), ("king", "kings"), ("friend", "friends"), ("student", "students"),
              ("manager", "managers"), ("pilot", "pilots"), ("baker", "bakers"), ("singer", "singers"), ("player", "players"),
              ("writer", "writers"), ("car", "cars"), ("house", "houses"), ("tree", "trees"), ("bird", "birds"), ("book", "books"))
SVA_TEMPLATES = ("The {n} near the {o}", "The {n} behind the {o}", "The {n} with the {o}", "The {n} beside the {o}",
                 "The {n} next to the {o}", "The {n} from the {o}")


def sva_task(tokenizer, n: int = 64, seed: int = 0) -> CircuitTask:
    """Subject–verb agreement across a prepositional phrase; clean singular, corrupt plural subject."""
    rng = random.Random(seed)
    is_, are = _single(tokenizer, " is"), _single(tokenizer, " are")
    if is_ is None or are is None:
        raise ValueError("sva: ' is' / ' are' are not single tokens under this tokenizer")
    pairs = [p for p in NOUN_PAIRS if _single(tokenizer, " " + p[0]) is not None and _single(tokenizer, " " + p[1]) is not None]
    rows = []
    for _ in range(n * 4):
        (sg, pl), other = rng.sample(pairs, 2)
        attractor = other[rng.random() < 0.5]
        tpl = rng.choice(SVA_TEMPLATES)
        rows.append((tpl.format(n=sg, o=attractor), tpl.format(n=pl, o=attractor), (is_,), (are,),
                     {"subject": sg, "attractor": attractor, "template": SVA_TEMPLATES.index(tpl)}))
    return _assemble("sva", tokenizer, rows, n, seed)


GT_NOUNS = ("war", "expedition", "project", "reign", "drought", "strike", "siege", "festival", "conflict", "journey", "trial", "campaign")
GT_TEMPLATE = "The {noun} lasted from the year {c}{yy} to the year {c}"


def greater_than_task(tokenizer, n: int = 64, seed: int = 0) -> CircuitTask:
    """Greater-than on years; corrupt = start year ``{c}01``. Adapts to digit-splitting tokenizers."""
    rng = random.Random(seed)
    two_digit = len(_ids(tokenizer, " 1732")) == 2 and _single(tokenizer, "32") is not None
    nouns = [w for w in GT_NOUNS if _single(tokenizer, " " + w) is not None] or list(GT_NOUNS)
    rows = []
    for _ in range(n * 4):
        c = rng.choice(["11", "12", "13", "14", "15", "16", "17", "18"])
        noun = rng.choice(nouns)
        if two_digit:
            yy = rng.randint(2, 98)
            digits = [f"{v:02d}" for v in range(100)]
            toks = {d: _single(tokenizer, d) for d in digits}
            ans = tuple(t for d, t in toks.items() if t is not None and int(d) > yy)
            wrong = tuple(t for d, t in toks.items() if t is not None and int(d) < yy)
        else:
            tens = rng.randint(1, 8)
            yy = tens * 10 + rng.randint(0, 9)
            toks = {d: _single(tokenizer, str(d)) for d in range(10)}
            ans = tuple(t for d, t in toks.items() if t is not None and d > tens)
            wrong = tuple(t for d, t in toks.items() if t is not None and d < tens)
        clean = GT_TEMPLATE.format(noun=noun, c=c, yy=f"{yy:02d}")
        corrupt = GT_TEMPLATE.format(noun=noun, c=c, yy="01")
        rows.append((clean, corrupt, ans, wrong, {"yy": yy, "century": c, "two_digit_tokens": two_digit}))
    return _assemble("greater_than", tokenizer, rows, n, seed)


TASKS: dict[str, Callable[..., CircuitTask]] = {"ioi": ioi_task, "sva": sva_task, "greater_than": greater_than_task}


def make_task(name: str, tokenizer, n: int = 64, seed: int = 0) -> CircuitTask:
    """Build a circuit task by name (``ioi``, ``sva``, ``greater_than``)."""
    if name not in TASKS:
        raise ValueError(f"unknown circuit task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](tokenizer, n=n, seed=seed)


# --------------------------------------------------------------------------- reference circuits

# (layer, head) sets for GPT-2 small, as used for ground truth by ACDC (Conmy et al. 2023).
IOI_HEADS_GPT2_SMALL: dict[str, list[tuple[int, int]]] = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative name mover": [(10, 7), (11, 10)],
    "s-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}
GREATER_THAN_HEADS_GPT2_SMALL: dict[str, list[tuple[int, int]]] = {
    "read year": [(0, 1), (0, 3), (0, 5)],
    "mid heads": [(5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)],
}
REFERENCE_HEADS = {"ioi": IOI_HEADS_GPT2_SMALL, "greater_than": GREATER_THAN_HEADS_GPT2_SMALL}


def reference_heads(task: str) -> set[tuple[int, int]]:
    """The GPT-2 small reference head set of a task (empty if none is known)."""
    return {h for group in REFERENCE_HEADS.get(task, {}).values() for h in group}
