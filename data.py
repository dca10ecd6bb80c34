"""Tasks for the continual stream: MLLM-CTBench files, the offline sanity stream, batching.

    load_ctbench(root, order)     the paper's benchmark from disk (raw or LLaVA format)
    check(root, order)            validate a benchmark directory before spending GPU hours
    sanity_stream(seed)           seven small synthetic tasks mirroring the benchmark, offline
    pretrain_mixture(seed)        generic image-text data for the tiny base, disjoint items
    Collator                      LLaVA-1.5 prompts, label masks, right/left padding

    python data.py check ROOT [--order A|B|key,key,...] [--image-root DIR]
    python data.py show [--task KEY]            print sanity-stream examples

Every example is `USER: <image>\\n{problem} ASSISTANT: {solution}</s>` (no <image> for
text-only tasks); the loss sees only the solution and the end token. This file stands
alone: it imports torch (and pillow for image files), nothing else of the project.
"""

from __future__ import annotations

import argparse
import json
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


@dataclass
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


# Order C is ours, not the paper's: text and image tasks interleaved differently from A and B,
# a third order on which the sanity stream's calibration is checked.
ORDERS = {"A": TASKS, "B": TASKS[::-1], "C": ["OCR", "fomc", "science", "numglue", "medical", "math", "art"]}


def task_order(order: str) -> list[str]:
    """'A', 'B' (reverse of A), 'C' (ours) or comma-separated task keys."""
    keys = ORDERS.get(order) or order.split(",")
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        raise ValueError(f"unknown task keys {unknown} in order {order!r}: known keys are {TASKS}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"order {order!r} names a task twice")
    return list(keys)


# ---- MLLM-CTBench on disk ----


class DataError(ValueError):
    """A bad record: says the file, the record index, what is wrong."""


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
    image_root = Path(image_root) if image_root else root
    return [Task(k, read_task_file(root / "reasoning_train" / f"{k}.json", k, image_root),
                 read_task_file(root / "reasoning_test" / f"{k}.json", k, image_root))
            for k in task_order(order)]


def check(root: str | Path, order: str = "A", image_root: str | Path | None = None) -> list[str]:
    """Validate every record and image; print counts per task; return the problems found."""
    from PIL import Image

    root = Path(root)
    image_root = Path(image_root) if image_root else root
    problems, rows = [], []
    for split in ("reasoning_train", "reasoning_test"):
        for f in sorted((root / split).glob("*.json")):
            if f.stem not in TASKS:
                problems.append(f"{f}: unknown task key {f.stem!r}; known keys are {TASKS}")
    for key in task_order(order):
        counts = []
        for split in ("reasoning_train", "reasoning_test"):
            path = root / split / f"{key}.json"
            try:
                records = json.loads(path.read_text())
                if not isinstance(records, list):
                    raise DataError(f"{path}: expected a JSON list of records")
            except (OSError, ValueError) as err:
                problems.append(str(err) if isinstance(err, DataError) else f"{path}: {err}")
                counts += [0, 0]
                continue
            n_images = 0
            for i, rec in enumerate(records):
                try:
                    ex = _parse_record(rec, key, path, i)
                except DataError as err:
                    problems.append(str(err))
                    continue
                if ex.image is None:
                    if key not in TEXT_ONLY:
                        problems.append(f"{path} record {i}: image task {key!r} but the record has no 'image'")
                    continue
                try:
                    with Image.open(image_root / ex.image) as im:
                        im.verify()
                    n_images += 1
                except (OSError, SyntaxError) as err:
                    problems.append(f"{path} record {i}: image {image_root / ex.image} is missing or unreadable ({err})")
            counts += [len(records), n_images]
        rows.append((key, *counts))
    print(f"{'task':<10}{'train':>8}{'images':>8}{'test':>8}{'images':>8}")
    for key, tr, tri, te, tei in rows:
        print(f"{key:<10}{tr:>8}{tri:>8}{te:>8}{tei:>8}")
    return problems


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


def sanity_stream(seed: int = 0, order: str = "A", n_train: int = 320, n_test: int = 48) -> list[Task]:
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
    """Turns examples into LLaVA-1.5 batches.

    tokenizer: a Hugging Face tokenizer with pad, bos and eos tokens and the `<image>` token.
    num_image_tokens: how many positions one image fills (576 for LLaVA-1.5-7B); <image> is
    expanded here, so the attention mask aligns with the language model's hidden states.
    load_image: image field -> (3, H, W) pixel tensor in the model's preprocessing.
    Sequences longer than max_length lose their tail; `truncated` holds their ids per task
    (a set, so an example seen in several epochs counts once).
    """

    def __init__(self, tokenizer, num_image_tokens: int, load_image, max_length: int = 1536):
        self.tok, self.num_image_tokens, self.load_image = tokenizer, num_image_tokens, load_image
        self.max_length = max_length
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.truncated: dict[str, set] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, ex: Example) -> list[int]:
        prefix = [self.tok.bos_token_id] + self._encode("USER: ")
        if ex.image is not None:
            prefix += [self.image_id] * self.num_image_tokens + self._encode("\n")
        ids = prefix + self._encode(f"{ex.problem} ASSISTANT:")
        if len(ids) >= self.max_length:
            raise DataError(f"{ex.task} example {ex.id}: the prompt alone has {len(ids)} tokens, "
                            f"max_length is {self.max_length}; raise --max-length")
        return ids

    def _pixels(self, examples):
        images = [self.load_image(ex.image) for ex in examples if ex.image is not None]
        return {"pixel_values": torch.stack(images)} if images else {}

    def train(self, examples: list[Example]) -> dict:
        """Right-padded batch; labels are IGNORE except the solution and the end token."""
        rows = []
        for ex in examples:
            prompt = self.prompt_ids(ex)
            answer = self._encode(" " + ex.solution) + [self.tok.eos_token_id]
            ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
            if len(ids) > self.max_length:
                self.truncated.setdefault(ex.task, set()).add(ex.id)
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        }
        return batch | self._pixels(examples)

    def prompts(self, examples: list[Example]) -> dict:
        """Left-padded prompts for generation."""
        rows = [self.prompt_ids(ex) for ex in examples]
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        return batch | self._pixels(examples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MLLM-CTBench checks and sanity-stream examples")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate an MLLM-CTBench directory (non-zero exit on any problem)")
    c.add_argument("root", type=Path, help="directory holding reasoning_train/ and reasoning_test/")
    c.add_argument("--order", default="A", help="A, B, or comma-separated task keys")
    c.add_argument("--image-root", type=Path, default=None, help="where image paths start (default: ROOT)")
    s = sub.add_parser("show", help="print sanity-stream examples")
    s.add_argument("--task", default=None, help="one task key (default: all)")
    s.add_argument("-n", type=int, default=2, help="examples per task")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check(args.root, args.order, args.image_root)
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
