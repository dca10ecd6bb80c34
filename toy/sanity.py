"""The sanity stream: seven small tasks in MLLM-CTBench's formats, drawn in code, and the tiny base's
pretraining data. The toy of this project (as minGPT's adder is minGPT's): it runs offline on a laptop
CPU in minutes, and it must teach something true, so it is calibrated (RESULTS.md).

    sanity_stream(seed, order)    the seven tasks in an order, train and test items disjoint
    pretrain_mixture(seed)        generic image-text items for the tiny base (toy/tiny_llava.py)
    vocabulary()                  every word the two use (the tiny tokenizer's vocabulary)

    python -m toy.sanity [--task KEY]     print examples
"""

from __future__ import annotations

import argparse
import random
import re
from functools import lru_cache

import torch

from data import TASKS, Example, Task, task_order

# ---- the sanity stream: images drawn in code ----
#
# Seven small tasks in the benchmark's formats. Their content has two parts. A core
# vocabulary (COLORS, SHAPES, GLYPHS, two policy phrases per stance, sums) is what the tiny
# base sees in pretraining, also through these same instructions, on other items. New
# content (NEW_COLORS, NEW_SHAPES, NEW_GLYPHS, two more phrases per stance, subtraction)
# only the tasks' own training data shows in their formats (pretraining's "read" shows the
# new glyphs, never what the OCR task asks of them; see PRETRAIN_KINDS). That is how an instruction-tuned base meets a
# benchmark: it follows the instructions and knows part of the answers, and each task
# teaches the rest. (A base that knows nothing of the tasks loses every old task within a
# few steps of the next one; one that knows everything forgets nothing. README,
# "Calibrating the sanity stream".)

COLORS = {
    "red": (1, 0, 0),
    "green": (0, 0.8, 0),
    "blue": (0.1, 0.3, 1),
    "yellow": (1, 0.9, 0),
    "purple": (0.6, 0, 0.8),
    "white": (1, 1, 1),
}
NEW_COLORS = {"cyan": (0, 0.9, 0.9), "grey": (0.55, 0.55, 0.55)}
SHAPES = ["circle", "square", "triangle", "cross"]
NEW_SHAPES = ["diamond", "ring"]
PLACES = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8), "bottom right": (24, 24)}
GLYPHS = {  # 3 x 5 bitmaps, rows top to bottom; no "A", which answer normalization drops as an article
    "P": "111101111100100",
    "C": "111100100100111",
    "E": "111100110100111",
    "H": "101101111101101",
    "K": "101110100110101",
    "L": "100100100100111",
    "T": "111010010010010",
    "X": "101101010101101",
}
NEW_GLYPHS = {"B": "110101110101110", "J": "001001001101111", "Y": "101101010010010", "Q": "111101101111001"}
SIZE = 32
_ys, _xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")


def _shape_mask(shape: str, cy: int, cx: int, r: int) -> torch.Tensor:
    dy, dx = _ys - cy, _xs - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "ring":
        return ((r - 2) ** 2 < dy**2 + dx**2) & (dy**2 + dx**2 <= r**2)
    if shape == "square":
        return (dy.abs() <= r - 1) & (dx.abs() <= r - 1)
    if shape == "diamond":
        return dy.abs() + dx.abs() <= r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    return ((dy.abs() <= r) & (dx.abs() <= r // 3)) | ((dx.abs() <= r) & (dy.abs() <= r // 3))  # cross


def draw(items, glyphs: str = "", glyph_color: str = "white", seed: int = 0) -> torch.Tensor:
    """A (3, 32, 32) image: shapes (shape, color, (cy, cx), radius), then glyphs, then noise."""
    colors, bitmaps = COLORS | NEW_COLORS, GLYPHS | NEW_GLYPHS
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, 1, 1, generator=g) * 0.15 + torch.zeros(3, SIZE, SIZE)  # dim random background
    for shape, color, (cy, cx), r in items:
        img[:, _shape_mask(shape, cy, cx, r)] = torch.tensor(colors[color], dtype=torch.float).unsqueeze(1)
    for i, ch in enumerate(glyphs):  # 3x scaled 3x5 glyphs, side by side
        bitmap = torch.tensor([int(b) for b in bitmaps[ch]], dtype=torch.bool).view(5, 3)
        big = bitmap.repeat_interleave(3, 0).repeat_interleave(3, 1)
        y0, x0 = 1, 3 + 16 * i  # inside the top-left and top-right quadrants
        img[:, y0 : y0 + 15, x0 : x0 + 9][:, big] = torch.tensor(colors[glyph_color], dtype=torch.float).unsqueeze(1)
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)


FOMC = {  # stance -> (option letter, core phrases, new phrases)
    "hawkish": ("A", ["raise rates", "tighten policy"], ["fight high inflation", "shrink the balance sheet"]),
    "dovish": ("B", ["cut rates", "ease policy"], ["support weak growth", "add more stimulus"]),
    "neutral": ("C", ["hold rates steady", "keep policy unchanged"], ["wait for more data", "review the outlook"]),
}
HEDGES = ["will", "may", "plans to"]
WORDS = ["one", "two", "three", "four"]
PLURAL = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
    "ring": "rings",
}
# Fillers: the tasks and the pretraining use different ones, so no pretraining item can be a task item.
FILLERS = {
    "task": dict(
        names=["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay"],
        objects=["apples", "pens", "books", "coins", "stamps", "shells"],
        speakers=["the committee", "the chair", "the board", "officials"],
        when=["this year", "next month", "soon", "at the next meeting", "over time", "for now"],
    ),
    "pretrain": dict(
        names=["Gus", "Hana", "Ivo", "Jun"],
        objects=["cups", "keys", "cards", "bags"],
        speakers=["the bank", "the governor"],
        when=["this week", "later", "in spring"],
    ),
}


def _text_item(task: str, rng: random.Random, fill: dict, pretrain: bool):
    """numglue's and fomc's items (no image), as _sanity_item returns them."""
    if task == "numglue":
        name, obj, a, b = rng.choice(fill["names"]), rng.choice(fill["objects"]), rng.randrange(10), rng.randrange(10)
        ask = f"How many {obj} does {name} have now? Think step by step and give the final number after 'answer:'."
        if pretrain or rng.random() < 0.5:
            return (
                (name, obj, a, b, "+"),
                f"{name} has {a} {obj} and gets {b} more. {ask}",
                f"{a} plus {b} is {a + b}. answer: {a + b}",
                None,
            )
        a, b = max(a, b), min(a, b)  # new content: subtraction
        return (
            (name, obj, a, b, "-"),
            f"{name} has {a} {obj} and gives {b} away. {ask}",
            f"{a} minus {b} is {a - b}. answer: {a - b}",
            None,
        )
    # fomc: a stance
    stance = rng.choice(list(FOMC))
    letter, core, new = FOMC[stance]
    who, hedge, when = rng.choice(fill["speakers"]), rng.choice(HEDGES), rng.choice(fill["when"])
    what = rng.choice(core + ([] if pretrain else new))
    problem = (
        f"Statement: {who} {hedge} {what} {when}. Is this statement hawkish, dovish or neutral? "
        "Options: A. hawkish B. dovish C. neutral. Give the option letter after 'answer:'."
    )
    return (who, hedge, what, when), problem, f"The stance is {stance}. answer: {letter}", None


def _image_item(task: str, rng: random.Random, shape: str, color: str, place: str, seed: int, colors, glyphs):
    """The image tasks' items, as _sanity_item returns them, from the draws it has made."""
    if task == "art":
        image = draw([(shape, color, PLACES[place], 6)], seed=seed)
        problem = (
            "Describe this artwork: its colour, its shape and where it is. End with 'answer:' and a short description."
        )
        return (
            (shape, color, place, seed),
            problem,
            f"The artwork is simple. answer: a {color} {shape} at the {place}",
            image,
        )
    if task == "medical":
        image = draw([(shape, color, PLACES[place], 3)], seed=seed)
        problem = "This is a scan. Where is the lesion and what colour is it? End with 'answer:' and a short finding."
        return (
            (shape, color, place, seed),
            problem,
            f"There is one lesion. answer: a {color} lesion in the {place}",
            image,
        )
    if task == "math":
        n = rng.randrange(1, 5)
        spots = rng.sample(list(PLACES.values()), n)
        image = draw([(shape, color, spot, 4) for spot in spots], seed=seed)
        problem = "How many shapes are in the picture? Count them and give the number after 'answer:'."
        return (
            (shape, color, tuple(spots), seed),
            problem,
            f"I count the {PLURAL[shape]} one by one. answer: {n}",
            image,
        )
    if task == "OCR":
        code = " ".join(rng.choice(glyphs) for _ in range(2))  # spaced: one token per letter
        image = draw([], glyphs=code.replace(" ", ""), glyph_color=rng.choice(colors[:5]), seed=seed)
        problem = "What code is written in the image? Read it and give the code after 'answer:'."
        return (code, seed), problem, f"The code has two letters. answer: {code}", image
    if task == "science":
        image = draw([(shape, color, PLACES[place], rng.choice([4, 6]))], seed=seed)
        problem = (
            "Which shape is shown: circle, square, triangle, cross, diamond or ring? "
            "Give the shape name after 'answer:'."
        )
        return (shape, color, place, seed), problem, f"The outline has a clear form. answer: {shape}", image
    raise ValueError(f"unknown sanity task {task!r}")


def _sanity_item(task: str, rng: random.Random, pretrain: bool = False):
    """One item of a task: (key that identifies the item, problem, solution, image).

    pretrain=False draws a task item: core and new content, the tasks' fillers, image seeds
    below 2**31. pretrain=True draws an item for the tiny base's pretraining in the same
    format: core content only, other fillers, image seeds from 2**31 up.
    """
    fill = FILLERS["pretrain" if pretrain else "task"]
    colors = list(COLORS) + ([] if pretrain else list(NEW_COLORS))
    shapes = SHAPES + ([] if pretrain else NEW_SHAPES)
    glyphs = list(GLYPHS) + ([] if pretrain else list(NEW_GLYPHS))
    seed = rng.randrange(2**31) | (1 << 31 if pretrain else 0)
    if task in ("numglue", "fomc"):
        return _text_item(task, rng, fill, pretrain)
    shape, color, place = rng.choice(shapes), rng.choice(colors), rng.choice(list(PLACES))
    return _image_item(task, rng, shape, color, place, seed, colors, glyphs)


def _split(task: str, n_train: int, n_test: int, rng: random.Random) -> tuple[list, list]:
    """Draw distinct items (by key), first the test set, then train."""
    seen, items = set(), []
    tries = 0
    while len(items) < n_train + n_test:
        key, problem, solution, image = _sanity_item(task, rng)
        tries += 1
        if tries > 50 * (n_train + n_test):
            raise RuntimeError(f"sanity task {task!r} has fewer than {n_train + n_test} distinct items")
        if (task, key) in seen:
            continue
        seen.add((task, key))
        items.append(Example(task, f"{task}-{len(items)}", problem, solution, image))
    return items[n_test:], items[:n_test]


@lru_cache(maxsize=4)
def _sanity(seed: int, n_train: int, n_test: int) -> tuple[Task, ...]:
    tasks = []
    for key in TASKS:
        train, test = _split(key, n_train, n_test, random.Random(f"{seed}-{key}"))
        tasks.append(Task(key, train, test))
    return tuple(tasks)


def sanity_stream(seed: int = 0, order: str = "A", n_train: int = 320, n_test: int = 192) -> list[Task]:
    """The seven offline tasks, deterministic for a seed; train and test never share an item."""
    by_key = {t.key: t for t in _sanity(seed, n_train, n_test)}
    return [by_key[k] for k in task_order(order)]


# Generic kinds (short answers, dense in what the images show: they ground the vision) twice
# as often as each of the seven tasks' formats. "read" shows all twelve glyphs, new ones too:
# the projector is trained here and then frozen, and one trained on eight letters keeps too
# little of the pixels to tell four more apart (OCR then stays below 40 right after its own
# training). A CLIP-based LLaVA likewise sees letters it was never asked about in a task's
# format; what the OCR task teaches is to answer with them in its format.
PRETRAIN_KINDS = ["caption", "count", "read", "sum", "stance"] * 2 + TASKS


def _pretrain_item(kind: str, rng: random.Random):
    """One pretraining item: (prompt, text, image). Core content only, but "read" shows every
    glyph. The generic kinds describe images and sums in their own words; the task kinds use
    the seven tasks' instructions and answers on other items (_sanity_item with pretrain=True)."""
    if kind in TASKS:
        return _sanity_item(kind, rng, pretrain=True)[1:]
    s = rng.randrange(2**31) | 1 << 31  # image seeds the sanity tasks never draw (they are < 2**31)
    shape, color, place = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(PLACES))
    if kind == "caption":
        r = rng.choice([3, 4, 6])
        return (
            "Describe the image.",
            f"a {color} {shape} at the {place}",
            draw([(shape, color, PLACES[place], r)], seed=s),
        )
    if kind == "count":
        k = rng.randrange(1, 5)
        spots = rng.sample(list(PLACES.values()), k)
        text = f"{WORDS[k - 1]} {color} {PLURAL[shape] if k > 1 else shape}, {k} in all"
        return "Count the shapes.", text, draw([(shape, color, p, 4) for p in spots], seed=s)
    if kind == "read":  # every glyph, new ones too: see PRETRAIN_KINDS
        code = " ".join(rng.choice(list(GLYPHS | NEW_GLYPHS)) for _ in range(2))
        return (
            "Read the letters.",
            f"the letters {code} in {color}",
            draw([], glyphs=code.replace(" ", ""), glyph_color=color, seed=s),
        )
    if kind == "sum":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}", None
    stance = rng.choice(list(FOMC))
    what = rng.choice(FOMC[stance][1])
    return (
        f"Statement: {rng.choice(FILLERS['pretrain']['speakers'])} will {what}. What is the stance?",
        f"to {what} is {stance}",
        None,
    )


@lru_cache(maxsize=2)
def pretrain_mixture(seed: int = 0, n: int = 4000) -> tuple[Example, ...]:
    """Pretraining data for the tiny base: captions of shapes, counts and glyphs, plain sums,
    policy stances, and the seven tasks' formats on items of their own. Core content only, but
    "read" shows every glyph. None is an item of the seven tasks (other image seeds, other
    names and speakers)."""
    rng = random.Random(f"pretrain-{seed}")
    out = []
    for i in range(n):
        kind = rng.choice(PRETRAIN_KINDS)
        prompt, text, image = _pretrain_item(kind, rng)
        out.append(Example(f"pretrain-{kind}", f"pretrain-{i}", prompt, text, image))
    return tuple(out)


def vocabulary() -> list[str]:
    """Every word, digit, punctuation mark and space the sanity stream and pretraining use."""
    texts = [
        "USER: <image>\nASSISTANT: answer:",
        " ".join(GLYPHS | NEW_GLYPHS),
        " ".join(map(str, range(19))),
        " ".join(COLORS | NEW_COLORS),
        " ".join(PLACES),
        " ".join(HEDGES + WORDS),
        " ".join(f"{k} {v}" for k, v in PLURAL.items()),
        " ".join(p for _, core, new in FOMC.values() for p in core + new) + " " + " ".join(FOMC),
        " ".join(w for fill in FILLERS.values() for words in fill.values() for w in words),
    ]
    rng = random.Random("vocabulary")  # every template, both kinds of draw
    for task in TASKS:
        texts += [" ".join(_sanity_item(task, rng, pretrain)[1:3]) for pretrain in (False, True) for _ in range(20)]
    texts += [" ".join(_pretrain_item(kind, rng)[:2]) for kind in PRETRAIN_KINDS for _ in range(20)]
    return sorted({tok for t in texts for tok in re.findall(r"\w+|[^\w\s]|\s", t)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print sanity-stream examples")
    parser.add_argument("--task", default=None, help="one task key (default: all)")
    parser.add_argument("-n", type=int, default=2, help="examples per task")
    args = parser.parse_args()
    for task in sanity_stream():
        if args.task in (None, task.key):
            for ex in task.train[: args.n]:
                image = "yes" if ex.image is not None else "no"
                print(f"[{task.key}] image={image}\n  Q: {ex.problem}\n  A: {ex.solution}")
