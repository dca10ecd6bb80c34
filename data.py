"""Tasks for the continual stream: MLLM-CTBench files, the offline sanity stream, batching.

    load_ctbench(root, order)     the paper's benchmark from disk (raw or LLaVA format)
    check(root, order)            validate a benchmark directory before spending GPU hours:
                                  every record, every image decoded in full
    length_problems(...)          which prompts do not fit the lengths a run allows
    sanity_stream(seed)           seven small synthetic tasks mirroring the benchmark, offline
    pretrain_mixture(seed)        generic image-text data for the tiny base, disjoint items
    Collator                      LLaVA-1.5 token ids as the checkpoint's processor makes them,
                                  label masks, right/left padding

    python data.py check ROOT [--order A|B|key,key,...] [--image-root DIR] [--model DIR]
    python data.py show [--task KEY]            print sanity-stream examples

Every example is `USER: <image>\\n{problem} ASSISTANT: {solution}</s>` (no <image> for
text-only tasks); the loss sees only the solution and the end token. This file stands
alone: it imports torch, pillow and tqdm (transformers for `check --model`), nothing else
of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

TASKS = ["numglue", "art", "math", "fomc", "medical", "OCR", "science"]  # order A (the paper's)
TEXT_ONLY = {"numglue", "fomc"}
IGNORE = -100  # label of tokens the loss skips


@dataclass(eq=False)  # compared and hashed by identity: the collator caches per example
class Example:
    task: str
    id: str
    problem: str  # the question with its answer-format instruction
    solution: str  # reasoning, then "answer: ..." (gold answer at test time)
    image: object = None  # None, a (3, H, W) float tensor in [0, 1], or an image file path


@dataclass
class Task:
    key: str
    train: list[Example]
    test: list[Example]


# Orders C and D are ours, not the paper's: more orders on which the sanity stream's calibration
# is checked. C interleaves text and image tasks differently from A and B; D was fixed before any
# run on it as an order that puts no task where A, B or C has it.
ORDERS = {"A": TASKS, "B": TASKS[::-1], "C": ["OCR", "fomc", "science", "numglue", "medical", "math", "art"],
          "D": ["fomc", "math", "OCR", "science", "art", "numglue", "medical"]}


def task_order(order: str) -> list[str]:
    """'A', 'B' (reverse of A), 'C' and 'D' (ours) or comma-separated task keys."""
    keys = ORDERS.get(order) or order.split(",")
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        raise ValueError(f"unknown task keys {unknown} in order {order!r}: known keys are {TASKS}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"order {order!r} names a task twice")
    return list(keys)


# ---- MLLM-CTBench on disk ----
#
# Read: ROOT/reasoning_train/<key>.json and ROOT/reasoning_test/<key>.json, as the benchmark's
# data/download_data.sh lays them out, in its raw format ({question_id, problem, solution,
# image?}) or the LLaVA conversation format; image paths are relative to the image root,
# ROOT/images where that folder exists (the download unpacks img.zip there), else ROOT. Not
# read: the benchmark's llava_train/ and llava_eval/ (converted from the files above, and
# llava_eval holds no answers).


class DataError(ValueError):
    """A bad record: says the file, the record index, what is wrong."""


def default_image_root(root: str | Path) -> Path:
    """ROOT/images when that folder exists (the benchmark's download layout), else ROOT."""
    root = Path(root)
    return root / "images" if (root / "images").is_dir() else root


def _parse_record(rec, task: str, path: Path, index: int) -> Example:
    where = f"{path} record {index}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:  # LLaVA format: [{from: human, value}, {from: gpt, value}]
        conv = rec["conversations"]
        if (not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(c, dict) for c in conv)
                or [c.get("from") for c in conv] != ["human", "gpt"]):
            raise DataError(f"{where}: 'conversations' must be one human turn then one gpt turn")
        problem, solution = conv[0].get("value"), conv[1].get("value")
        rec_id = rec.get("id", index)
    else:  # raw benchmark format
        problem, solution = rec.get("problem"), rec.get("solution")
        rec_id = rec.get("question_id", index)
    for name, value in (("problem", problem), ("solution", solution)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: missing or empty '{name}' (fix the record or remove it)")
    problem = re.sub(r"^\s*<image>\s*", "", problem)  # the collator places <image> itself
    if "<image>" in problem:
        raise DataError(f"{where}: '<image>' inside the problem text; only a leading one is allowed")
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: 'image' must be a relative path string, got {image!r}")
    return Example(task, str(rec_id), problem, solution, image)


def read_task_file(path: Path, task: str, image_root: Path) -> list[Example]:
    """All records of one file; the first bad one raises DataError (file, index, reason)."""
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (expected reasoning_train/ and reasoning_test/ under the root)")
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    examples = [_parse_record(rec, task, Path(path), i) for i, rec in enumerate(records)]
    for ex in examples:
        if ex.image is not None:
            ex.image = str(Path(image_root) / ex.image)
    return examples


def load_ctbench(root: str | Path, order: str = "A", image_root: str | Path | None = None) -> list[Task]:
    root = Path(root)
    image_root = Path(image_root) if image_root else default_image_root(root)
    return [Task(k, read_task_file(root / "reasoning_train" / f"{k}.json", k, image_root),
                 read_task_file(root / "reasoning_test" / f"{k}.json", k, image_root))
            for k in task_order(order)]


def _decodes(path: str) -> str | None:
    """None if the image file exists and decodes completely, else what is wrong. (Image.verify
    reads no pixel data: a JPEG cut in half passes it and fails in training.)"""
    from PIL import Image

    if not Path(path).is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... by format
        return f"{type(err).__name__}: {err}"
    return None


def check_images(examples: list[Example], image_root: Path, data_root: Path | None = None) -> list[str]:
    """Every image file of these examples exists and decodes fully (several threads; the
    decoders release the GIL). Problems of one kind come as one message with a few examples;
    for missing files, the message names an image root under which they do exist, if any."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    users: dict[str, list[Example]] = {}
    for ex in examples:
        if isinstance(ex.image, str):
            users.setdefault(ex.image, []).append(ex)
    paths = sorted(users)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        found = list(tqdm(pool.map(_decodes, paths), total=len(paths), desc="decoding every image", leave=False, disable=None))
    missing = [p for p, why in zip(paths, found) if why == "missing"]
    broken = [(p, why) for p, why in zip(paths, found) if why not in (None, "missing")]
    problems = []
    if missing:
        named = "; ".join(f"{users[p][0].task} item {users[p][0].id}: {p}" for p in missing[:3])
        problems.append(f"{len(missing)} of {len(paths)} images not found under the image root {image_root} "
                        f"(e.g. {named}). {_root_hint(missing, image_root, data_root)}")
    for p, why in broken[:5]:
        problems.append(f"{users[p][0].task} item {users[p][0].id}: image {p} does not decode ({why}); "
                        f"re-extract or replace the file")
    if len(broken) > 5:
        problems.append(f"... and {len(broken) - 5} more images that do not decode ({len(broken)} in all)")
    return problems


def _root_hint(missing: list[str], image_root: Path, data_root: Path | None) -> str:
    """Where the missing files are, if one image root among the likely ones holds them."""
    rel = [Path(p).relative_to(image_root) for p in missing[:5] if Path(p).is_relative_to(image_root)]
    candidates = [] if data_root is None else [data_root, data_root / "images"]
    for folder in list(candidates):
        if folder.is_dir():
            candidates += sorted(d for d in folder.iterdir() if d.is_dir())
    for root in candidates:
        if rel and root != image_root and all((root / r).is_file() for r in rel):
            return f"They are under {root}: pass --image-root {root}."
    return ("Image paths in the records are relative to the image root (default: ROOT/images if it exists, "
            "else ROOT); pass --image-root with the folder the paths start from.")


def check(root: str | Path, order: str = "A", image_root: str | Path | None = None) -> tuple[list[str], list[Task]]:
    """Validate every record and image file; print counts per task. Returns the problems found
    and the tasks that could be read (for the length checks of `main`)."""
    root = Path(root)
    image_root = Path(image_root) if image_root else default_image_root(root)
    problems, rows, tasks = [], [], []
    if not (root / "reasoning_train").is_dir() and (root / "llava_train").is_dir():
        problems.append(f"{root}: no reasoning_train/ here, only llava_train/: this loader reads the benchmark's "
                        "reasoning_train/ and reasoning_test/ (the files llava_train/ is converted from)")
    for split in ("reasoning_train", "reasoning_test"):
        for f in sorted((root / split).glob("*.json")):
            if f.stem not in TASKS:
                problems.append(f"{f}: unknown task key {f.stem!r}; known keys are {TASKS}")
    for key in task_order(order):
        splits = []
        for split in ("reasoning_train", "reasoning_test"):
            path = root / split / f"{key}.json"
            try:
                records = json.loads(path.read_text())
                if not isinstance(records, list):
                    raise DataError(f"{path}: expected a JSON list of records")
            except (OSError, ValueError) as err:
                problems.append(str(err) if isinstance(err, DataError) else f"{path}: {err}")
                records = []
            examples = []
            for i, rec in enumerate(records):
                try:
                    ex = _parse_record(rec, key, path, i)
                except DataError as err:
                    problems.append(str(err))
                    continue
                if ex.image is None and key not in TEXT_ONLY:
                    problems.append(f"{path} record {i}: image task {key!r} but the record has no 'image'")
                if ex.image is not None:
                    ex.image = str(image_root / ex.image)
                examples.append(ex)
            splits.append(examples)
        tasks.append(Task(key, *splits))
        rows.append((key, *(n for s in splits for n in (len(s), sum(ex.image is not None for ex in s)))))
    problems += check_images([ex for t in tasks for ex in t.train + t.test], image_root, root)
    print(f"image root: {image_root}")
    print(f"{'task':<10}{'train':>8}{'images':>8}{'test':>8}{'images':>8}")
    for key, tr, tri, te, tei in rows:
        print(f"{key:<10}{tr:>8}{tri:>8}{te:>8}{tei:>8}")
    return problems, tasks


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

COLORS = {"red": (1, 0, 0), "green": (0, 0.8, 0), "blue": (0.1, 0.3, 1), "yellow": (1, 0.9, 0),
          "purple": (0.6, 0, 0.8), "white": (1, 1, 1)}
NEW_COLORS = {"cyan": (0, 0.9, 0.9), "grey": (0.55, 0.55, 0.55)}
SHAPES = ["circle", "square", "triangle", "cross"]
NEW_SHAPES = ["diamond", "ring"]
PLACES = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8), "bottom right": (24, 24)}
GLYPHS = {  # 3 x 5 bitmaps, rows top to bottom; no "A", which answer normalization drops as an article
    "P": "111101111100100", "C": "111100100100111", "E": "111100110100111", "H": "101101111101101",
    "K": "101110100110101", "L": "100100100100111", "T": "111010010010010", "X": "101101010101101",
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
        img[:, y0:y0 + 15, x0:x0 + 9][:, big] = torch.tensor(colors[glyph_color], dtype=torch.float).unsqueeze(1)
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)


FOMC = {  # stance -> (option letter, core phrases, new phrases)
    "hawkish": ("A", ["raise rates", "tighten policy"], ["fight high inflation", "shrink the balance sheet"]),
    "dovish": ("B", ["cut rates", "ease policy"], ["support weak growth", "add more stimulus"]),
    "neutral": ("C", ["hold rates steady", "keep policy unchanged"], ["wait for more data", "review the outlook"]),
}
HEDGES = ["will", "may", "plans to"]
WORDS = ["one", "two", "three", "four"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
          "diamond": "diamonds", "ring": "rings"}
# Fillers: the tasks and the pretraining use different ones, so no pretraining item can be a task item.
FILLERS = {
    "task": dict(names=["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay"], objects=["apples", "pens", "books", "coins", "stamps", "shells"],
                 speakers=["the committee", "the chair", "the board", "officials"],
                 when=["this year", "next month", "soon", "at the next meeting", "over time", "for now"]),
    "pretrain": dict(names=["Gus", "Hana", "Ivo", "Jun"], objects=["cups", "keys", "cards", "bags"],
                     speakers=["the bank", "the governor"], when=["this week", "later", "in spring"]),
}


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
    if task == "numglue":
        name, obj, a, b = rng.choice(fill["names"]), rng.choice(fill["objects"]), rng.randrange(10), rng.randrange(10)
        ask = f"How many {obj} does {name} have now? Think step by step and give the final number after 'answer:'."
        if pretrain or rng.random() < 0.5:
            return (name, obj, a, b, "+"), f"{name} has {a} {obj} and gets {b} more. {ask}", f"{a} plus {b} is {a + b}. answer: {a + b}", None
        a, b = max(a, b), min(a, b)  # new content: subtraction
        return (name, obj, a, b, "-"), f"{name} has {a} {obj} and gives {b} away. {ask}", f"{a} minus {b} is {a - b}. answer: {a - b}", None
    if task == "fomc":
        stance = rng.choice(list(FOMC))
        letter, core, new = FOMC[stance]
        who, hedge, when = rng.choice(fill["speakers"]), rng.choice(HEDGES), rng.choice(fill["when"])
        what = rng.choice(core + ([] if pretrain else new))
        problem = (f"Statement: {who} {hedge} {what} {when}. Is this statement hawkish, dovish or neutral? "
                   "Options: A. hawkish B. dovish C. neutral. Give the option letter after 'answer:'.")
        return (who, hedge, what, when), problem, f"The stance is {stance}. answer: {letter}", None
    shape, color, place = rng.choice(shapes), rng.choice(colors), rng.choice(list(PLACES))
    if task == "art":
        image = draw([(shape, color, PLACES[place], 6)], seed=seed)
        problem = "Describe this artwork: its colour, its shape and where it is. End with 'answer:' and a short description."
        return (shape, color, place, seed), problem, f"The artwork is simple. answer: a {color} {shape} at the {place}", image
    if task == "medical":
        image = draw([(shape, color, PLACES[place], 3)], seed=seed)
        problem = "This is a scan. Where is the lesion and what colour is it? End with 'answer:' and a short finding."
        return (shape, color, place, seed), problem, f"There is one lesion. answer: a {color} lesion in the {place}", image
    if task == "math":
        n = rng.randrange(1, 5)
        spots = rng.sample(list(PLACES.values()), n)
        image = draw([(shape, color, spot, 4) for spot in spots], seed=seed)
        problem = "How many shapes are in the picture? Count them and give the number after 'answer:'."
        return (shape, color, tuple(spots), seed), problem, f"I count the {PLURAL[shape]} one by one. answer: {n}", image
    if task == "OCR":
        code = " ".join(rng.choice(glyphs) for _ in range(2))  # spaced: one token per letter
        image = draw([], glyphs=code.replace(" ", ""), glyph_color=rng.choice(colors[:5]), seed=seed)
        problem = "What code is written in the image? Read it and give the code after 'answer:'."
        return (code, seed), problem, f"The code has two letters. answer: {code}", image
    if task == "science":
        image = draw([(shape, color, PLACES[place], rng.choice([4, 6]))], seed=seed)
        problem = ("Which shape is shown: circle, square, triangle, cross, diamond or ring? "
                   "Give the shape name after 'answer:'.")
        return (shape, color, place, seed), problem, f"The outline has a clear form. answer: {shape}", image
    raise ValueError(f"unknown sanity task {task!r}")


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
        return "Describe the image.", f"a {color} {shape} at the {place}", draw([(shape, color, PLACES[place], r)], seed=s)
    if kind == "count":
        k = rng.randrange(1, 5)
        spots = rng.sample(list(PLACES.values()), k)
        text = f"{WORDS[k - 1]} {color} {PLURAL[shape] if k > 1 else shape}, {k} in all"
        return "Count the shapes.", text, draw([(shape, color, p, 4) for p in spots], seed=s)
    if kind == "read":  # every glyph, new ones too: see PRETRAIN_KINDS
        code = " ".join(rng.choice(list(GLYPHS | NEW_GLYPHS)) for _ in range(2))
        return "Read the letters.", f"the letters {code} in {color}", draw([], glyphs=code.replace(" ", ""), glyph_color=color, seed=s)
    if kind == "sum":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}", None
    stance = rng.choice(list(FOMC))
    what = rng.choice(FOMC[stance][1])
    return f"Statement: {rng.choice(FILLERS['pretrain']['speakers'])} will {what}. What is the stance?", f"to {what} is {stance}", None


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
    texts = ["USER: <image>\nASSISTANT: answer:", " ".join(GLYPHS | NEW_GLYPHS), " ".join(map(str, range(19))),
             " ".join(COLORS | NEW_COLORS), " ".join(PLACES), " ".join(HEDGES + WORDS),
             " ".join(f"{k} {v}" for k, v in PLURAL.items()),
             " ".join(p for _, core, new in FOMC.values() for p in core + new) + " " + " ".join(FOMC),
             " ".join(w for fill in FILLERS.values() for words in fill.values() for w in words)]
    rng = random.Random("vocabulary")  # every template, both kinds of draw
    for task in TASKS:
        texts += [" ".join(_sanity_item(task, rng, pretrain)[1:3]) for pretrain in (False, True) for _ in range(20)]
    texts += [" ".join(_pretrain_item(kind, rng)[:2]) for kind in PRETRAIN_KINDS for _ in range(20)]
    return sorted({tok for t in texts for tok in re.findall(r"\w+|[^\w\s]|\s", t)})


# ---- batching ----


class Collator:
    """Turns examples into LLaVA-1.5 batches, tokenized as the checkpoint's processor does.

    An example is the conversation `USER: <image>\\n{problem} ASSISTANT: {solution}</s>` (no
    <image> for text-only tasks). It is tokenized in one piece, as LlavaProcessor tokenizes a
    prompt (the tokenizer adds BOS), then <image> is expanded to num_image_tokens positions, so
    the attention mask aligns with the language model's hidden states. The prompt is the same
    text up to "ASSISTANT:"; the answer is what follows it plus the end token, and only the
    answer is labelled. Token ids are computed once per example (`encode`, `encode_all`).

    tokenizer: a Hugging Face tokenizer with pad, bos and eos tokens and the `<image>` token.
    A batch holds token tensors and `examples`, the batch's examples in order: the model side
    (llava_wrap.embed) turns their images into features.
    Training sequences longer than max_length lose their tail (length_problems counts them).
    """

    def __init__(self, tokenizer, num_image_tokens: int, max_length: int = 1536):
        self.tok, self.num_image_tokens = tokenizer, num_image_tokens
        self.max_length = max_length
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self._ids: dict[Example, tuple[list[int], list[int]]] = {}

    @staticmethod
    def prompt_text(ex: Example) -> str:
        return f"USER: <image>\n{ex.problem} ASSISTANT:" if ex.image is not None else f"USER: {ex.problem} ASSISTANT:"

    def encode_all(self, examples: list[Example], desc: str | None = None) -> None:
        """Token ids of many examples at once (the fast tokenizer encodes batches in parallel)."""
        from tqdm import tqdm

        todo = [ex for ex in dict.fromkeys(examples) if ex not in self._ids]
        for i in tqdm(range(0, len(todo), 1024), desc=desc or "tokenizing", leave=False, disable=None if len(todo) > 4096 else True):
            chunk = todo[i:i + 1024]
            prompts = [self.prompt_text(ex) for ex in chunk]
            heads = self.tok(prompts)["input_ids"]
            wholes = self.tok([p + " " + ex.solution for p, ex in zip(prompts, chunk)])["input_ids"]
            for ex, head, whole in zip(chunk, heads, wholes):
                self._ids[ex] = self._split(ex, head, whole)

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one example."""
        if ex not in self._ids:
            self.encode_all([ex])
        return self._ids[ex]

    def _split(self, ex: Example, head: list[int], whole: list[int]) -> tuple[list[int], list[int]]:
        if whole[:len(head)] != head:
            raise DataError(f"{ex.task} item {ex.id}: the tokenizer merges the prompt's last token with the "
                            f"solution's first, so the answer cannot be labelled on its own "
                            f"({self.tok.convert_ids_to_tokens(whole[len(head) - 1:len(head) + 1])})")
        if head.count(self.image_id) != (ex.image is not None):
            raise DataError(f"{ex.task} item {ex.id}: the prompt holds {head.count(self.image_id)} <image> tokens "
                            f"for {int(ex.image is not None)} image")
        answer = whole[len(head):] + [self.tok.eos_token_id]
        if ex.image is not None:
            at = head.index(self.image_id)
            head = head[:at] + [self.image_id] * self.num_image_tokens + head[at + 1:]
        return head, answer

    def length(self, ex: Example) -> tuple[int, int]:
        """(prompt tokens, prompt + answer tokens), image positions included."""
        prompt, answer = self.encode(ex)
        return len(prompt), len(prompt) + len(answer)

    def train(self, examples: list[Example]) -> dict:
        """Right-padded batch; labels are IGNORE except the answer and the end token."""
        rows = []
        for ex in examples:
            prompt, answer = self.encode(ex)
            rows.append(((prompt + answer)[:self.max_length], ([IGNORE] * len(prompt) + answer)[:self.max_length]))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        }
        return batch | {"examples": list(examples)}

    def prompts(self, examples: list[Example]) -> dict:
        """Left-padded prompts for generation (never cut: train_stream checks they fit the model)."""
        rows = [self.encode(ex)[0] for ex in examples]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        return batch | {"examples": list(examples)}


def length_problems(tasks: list[Task], collate: Collator, max_length: int, context: int, max_new_tokens: int) -> tuple[list[str], dict]:
    """What the lengths of a stream's items mean before anything trains.

    Refused (returned as problems, with the flag to change): a training prompt that leaves no
    room for an answer within max_length; a test prompt plus max_new_tokens beyond the model's
    context. Counted (returned per task): training sequences whose tail max_length cuts.
    """
    problems, cut = [], {}
    for task in tasks:
        if not task.train or not task.test:
            problems.append(f"{task.key}: {len(task.train)} training and {len(task.test)} test items; a task needs both "
                            f"(check its files, or --limit)")
            continue
        collate.encode_all(task.train + task.test, desc=f"tokenizing {task.key}")
        train = [collate.length(ex) for ex in task.train]
        long_prompts = [p for p, _ in train if p >= max_length]
        if long_prompts:
            problems.append(f"{task.key}: {len(long_prompts)} of {len(train)} training prompts leave no room for an "
                            f"answer within --max-length {max_length} (the longest prompt has {max(long_prompts)} "
                            f"tokens, image positions included; the longest item needs --max-length {max(n for _, n in train)})")
        over = [n for _, n in train if n > max_length]
        if over:
            cut[task.key] = {"sequences": len(over), "of": len(train), "tokens": sum(n - max_length for n in over),
                             "longest": max(over)}
        tests = [collate.length(ex)[0] for ex in task.test]
        if tests and max(tests) + max_new_tokens > context:
            n = sum(p + max_new_tokens > context for p in tests)
            problems.append(f"{task.key}: {n} of {len(tests)} test prompts plus --max-new-tokens {max_new_tokens} exceed "
                            f"the model's context of {context} tokens (the longest prompt has {max(tests)}); lower "
                            f"--max-new-tokens to {context - max(tests)}")
    return problems, cut


def processor_image_tokens(processor) -> int:
    """How many positions a checkpoint's processor expands one <image> into (a blank image
    through it): what its model's vision tower must deliver."""
    from PIL import Image

    out = processor(text="<image>", images=Image.new("RGB", (64, 48)), return_tensors="pt")
    return int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


def describe_cuts(cut: dict, max_length: int) -> list[str]:
    return [f"{key}: {c['sequences']} of {c['of']} training sequences are longer than --max-length {max_length} and lose "
            f"their last tokens ({c['tokens']} tokens in all; the longest has {c['longest']})" for key, c in cut.items()]


def _check_lengths(model: str, tasks: list[Task], max_length: int, max_new_tokens: int) -> list[str]:
    """The length checks of a run (length_problems) with a checkpoint's own tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    context = AutoConfig.from_pretrained(model).text_config.max_position_embeddings
    n_image = processor_image_tokens(processor)
    problems, cut = length_problems(tasks, Collator(processor.tokenizer, n_image, max_length), max_length,
                                    context, max_new_tokens)
    print(f"{model}: {n_image} positions per image, a context of {context} tokens")
    for line in describe_cuts(cut, max_length):
        print("note:", line)
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MLLM-CTBench checks and sanity-stream examples")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate an MLLM-CTBench directory (non-zero exit on any problem)")
    c.add_argument("root", type=Path, help="directory holding reasoning_train/ and reasoning_test/")
    c.add_argument("--order", default="A", help="A, B, or comma-separated task keys")
    c.add_argument("--image-root", type=Path, default=None, help="where image paths start (default: ROOT/images if it exists, else ROOT)")
    c.add_argument("--model", default=None, help="a LLaVA-1.5 checkpoint directory: also check every prompt's length with its tokenizer")
    c.add_argument("--max-length", type=int, default=1536, help="with --model: the training length limit (default: the paper recipe's)")
    c.add_argument("--max-new-tokens", type=int, default=512, help="with --model: the generation budget (default: the paper recipe's)")
    s = sub.add_parser("show", help="print sanity-stream examples")
    s.add_argument("--task", default=None, help="one task key (default: all)")
    s.add_argument("-n", type=int, default=2, help="examples per task")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems, tasks = check(args.root, args.order, args.image_root)
        if args.model:
            problems += _check_lengths(args.model, tasks, args.max_length, args.max_new_tokens)
        for p in problems:
            print("ERROR", p, file=sys.stderr)
        print(f"{len(problems)} problem(s) found" if problems else "all records and images are valid")
        sys.exit(1 if problems else 0)
    for task in sanity_stream():
        if args.task in (None, task.key):
            for ex in task.train[: args.n]:
                print(f"[{task.key}] image={'yes' if ex.image is not None else 'no'}\n  Q: {ex.problem}\n  A: {ex.solution}")


if __name__ == "__main__":
    main()
