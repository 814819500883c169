"""Four synthetic sequence tasks over a shared digit alphabet, and their splits.

Every example is one line of whitespace-separated tokens::

    <s> TAG x1 .. xL = y1 .. yM </s>

The tasks read the same ten digits and write digits, so a model must use the
task tag to pick the rule; fine-tuning on one task moves weights that the others
use too (the interference that merging has to resolve):

* ``rev``  -- the digits reversed;
* ``sort`` -- the digits in ascending order;
* ``inc``  -- each digit plus one, modulo 10, in the same order;
* ``rot``  -- the digits rotated left by one (the first goes last).

Inputs are 3..7 symbols, uniformly in evaluation. The base is trained on the
mixture with long inputs (6..7) rare, so it is partly competent, worst on long
inputs; each expert is fine-tuned on its own task at all lengths, half of each
batch being a replay of the base's mixture (as SFT mixes in general data), so
what an expert adds is mostly specific to its task. The split of an input (train / validation / test) is a
fixed function of the task and the digits (a hash), so held-out inputs never
appear in any training stream, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

TASKS: Tuple[str, ...] = ("rev", "sort", "inc", "rot")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
#: Each task reads and writes its own ten symbols (like code vs. prose vs. math
#: tokens); the layers in between are shared, which is where experts collide.
ALPHABETS: Dict[str, List[str]] = {
    "rev": [str(d) for d in range(10)],
    "sort": list("abcdefghij"),
    "inc": list("klmnopqrst"),
    "rot": ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"],
}
VOCAB: List[str] = (
    SPECIALS + list(TASKS) + [s for t in TASKS for s in ALPHABETS[t]] + ["="]
)
MIN_LEN, MAX_LEN = 3, 7
#: Longest example in tokens: <s> tag 7 digits = 7 digits </s>.
MAX_TOKENS = 2 + MAX_LEN + 1 + MAX_LEN + 1

SPLIT_MODULUS = 10
VAL_BUCKET, TEST_BUCKET = 0, 1  # the remaining 8/10 of inputs are for training


def answer(task: str, digits: Sequence[int]) -> List[int]:
    if task == "rev":
        return list(reversed(digits))
    if task == "sort":
        return sorted(digits)
    if task == "inc":
        return [(d + 1) % 10 for d in digits]
    if task == "rot":
        return list(digits[1:]) + [digits[0]]
    raise ValueError(f"unknown task {task!r}")


def split_of(task: str, digits: Sequence[int]) -> str:
    key = f"{task}:{''.join(map(str, digits))}".encode()
    bucket = int.from_bytes(hashlib.blake2s(key, digest_size=4).digest(), "big")
    bucket %= SPLIT_MODULUS
    if bucket == VAL_BUCKET:
        return "val"
    if bucket == TEST_BUCKET:
        return "test"
    return "train"


@dataclass(frozen=True)
class Example:
    task: str
    prompt: List[str]  # "<s> tag digits ="
    target: List[str]  # "answer digits </s>"


def make_example(task: str, digits: Sequence[int]) -> Example:
    symbols = ALPHABETS[task]
    prompt = ["<s>", task, *(symbols[d] for d in digits), "="]
    target = [*(symbols[d] for d in answer(task, digits)), "</s>"]
    return Example(task, prompt, target)


SHORT_MAX = 5  # "short" inputs: 3..5 symbols; "long": 6..7


def sample(
    task: str, split: str, rng: random.Random, long_prob: Optional[float] = None
) -> Example:
    """One random example of ``task`` whose input belongs to ``split``.

    Lengths are uniform over 3..7, or, with ``long_prob``, long (6..7) with that
    probability and short (3..5) otherwise.
    """
    while True:
        if long_prob is None:
            length = rng.randint(MIN_LEN, MAX_LEN)
        elif rng.random() < long_prob:
            length = rng.randint(SHORT_MAX + 1, MAX_LEN)
        else:
            length = rng.randint(MIN_LEN, SHORT_MAX)
        digits = [rng.randrange(10) for _ in range(length)]
        if split_of(task, digits) == split:
            return make_example(task, digits)


def held_out(task: str, split: str, count: int, seed: int) -> List[Example]:
    """``count`` distinct held-out examples of ``task`` (fixed by ``seed``)."""
    rng = random.Random(f"{seed}:{task}:{split}")
    seen = set()
    examples: List[Example] = []
    while len(examples) < count:
        example = sample(task, split, rng)
        key = tuple(example.prompt)
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return examples


def eval_sets(split: str, count: int, seed: int = 1234) -> Dict[str, List[Example]]:
    return {task: held_out(task, split, count, seed) for task in TASKS}


def build_tokenizer():
    """A word-level fast tokenizer over :data:`VOCAB` (saved with every model)."""
    from circuit_merge_plugin.demo.toymodels import word_level_tokenizer

    return word_level_tokenizer(VOCAB)


TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}
PAD_ID = TOKEN_ID["<pad>"]


def encode_batch(examples: Sequence[Example]):
    """(input_ids, labels, answer_mask) tensors, right-padded to the longest.

    ``labels[i, t]`` is the token at ``t + 1`` where it belongs to the answer,
    else -100; ``answer_mask`` marks those positions.
    """
    import torch

    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens = [TOKEN_ID[t] for t in example.prompt + example.target]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        start = len(example.prompt) - 1  # predicts the first answer token
        for offset, token in enumerate(example.target):
            labels[row, start + offset] = TOKEN_ID[token]
    return ids, labels, labels != -100
