"""Tasks for the continual stream: MLLM-CTBench files as the benchmark lays them out, and batching.

    load_ctbench(root, order)     the paper's benchmark from disk (raw or LLaVA format)
    check(root, order)            validate a benchmark directory before spending GPU hours:
                                  every record, every image decoded in full
    check_stream(...)             what a run checks before its first step: images, lengths
    Collator                      LLaVA-1.5 token ids as the checkpoint's processor makes them,
                                  label masks, right/left padding, batches by length

    python data.py check ROOT [--order A|B|C|D|key,key,...] [--image-root DIR] [--model DIR]

Every example is `USER: <image>\\n{problem} ASSISTANT: {solution}</s>` (no <image> for
text-only tasks); the loss sees only the solution and the end token. The sanity stream, this
project's offline toy, is toy/sanity.py. This file imports torch, pillow and tqdm
(transformers for `check --model`), nothing else of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
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
ORDERS = {
    "A": TASKS,
    "B": TASKS[::-1],
    "C": ["OCR", "fomc", "science", "numglue", "medical", "math", "art"],
    "D": ["fomc", "math", "OCR", "science", "art", "numglue", "medical"],
}


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
        if (
            not isinstance(conv, list)
            or len(conv) != 2
            or not all(isinstance(c, dict) for c in conv)
            or [c.get("from") for c in conv] != ["human", "gpt"]
        ):
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
        raise DataError(
            f"{path}: file not found (expected reasoning_train/ and reasoning_test/ under the root)"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
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
    return [
        Task(
            k,
            read_task_file(root / "reasoning_train" / f"{k}.json", k, image_root),
            read_task_file(root / "reasoning_test" / f"{k}.json", k, image_root),
        )
        for k in task_order(order)
    ]


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
        found = list(
            tqdm(pool.map(_decodes, paths), total=len(paths), desc="decoding every image", leave=False, disable=None)
        )
    missing = [p for p, why in zip(paths, found) if why == "missing"]
    broken = [(p, why) for p, why in zip(paths, found) if why not in (None, "missing")]
    problems = []
    if missing:
        named = "; ".join(f"{users[p][0].task} item {users[p][0].id}: {p}" for p in missing[:3])
        problems.append(
            f"{len(missing)} of {len(paths)} images not found under the image root {image_root} "
            f"(e.g. {named}). {_root_hint(missing, image_root, data_root)}"
        )
    for p, why in broken[:5]:
        problems.append(
            f"{users[p][0].task} item {users[p][0].id}: image {p} does not decode ({why}); "
            f"re-extract or replace the file"
        )
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
    return (
        "Image paths in the records are relative to the image root (default: ROOT/images if it exists, "
        "else ROOT); pass --image-root with the folder the paths start from."
    )


def check(root: str | Path, order: str = "A", image_root: str | Path | None = None) -> tuple[list[str], list[Task]]:
    """Validate every record and image file; print counts per task. Returns the problems found
    and the tasks that could be read (for the length checks of `main`)."""
    root = Path(root)
    image_root = Path(image_root) if image_root else default_image_root(root)
    problems, rows, tasks = [], [], []
    if not (root / "reasoning_train").is_dir() and (root / "llava_train").is_dir():
        problems.append(
            f"{root}: no reasoning_train/ here, only llava_train/: this loader reads the benchmark's "
            "reasoning_train/ and reasoning_test/ (the files llava_train/ is converted from)"
        )
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
        for i in tqdm(
            range(0, len(todo), 1024),
            desc=desc or "tokenizing",
            leave=False,
            disable=None if len(todo) > 4096 else True,
        ):
            chunk = todo[i : i + 1024]
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
        if whole[: len(head)] != head:
            raise DataError(
                f"{ex.task} item {ex.id}: the tokenizer merges the prompt's last token with the "
                f"solution's first, so the answer cannot be labelled on its own "
                f"({self.tok.convert_ids_to_tokens(whole[len(head) - 1 : len(head) + 1])})"
            )
        if head.count(self.image_id) != (ex.image is not None):
            raise DataError(
                f"{ex.task} item {ex.id}: the prompt holds {head.count(self.image_id)} <image> tokens "
                f"for {int(ex.image is not None)} image"
            )
        answer = whole[len(head) :] + [self.tok.eos_token_id]
        if ex.image is not None:
            at = head.index(self.image_id)
            head = head[:at] + [self.image_id] * self.num_image_tokens + head[at + 1 :]
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
            rows.append(((prompt + answer)[: self.max_length], ([IGNORE] * len(prompt) + answer)[: self.max_length]))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        }
        return batch | {"examples": list(examples)}

    def by_length(self, examples: list[Example], batch_size: int) -> list[list[Example]]:
        """Batches of examples of similar prompt length (less padding), for the passes whose result does
        not depend on how items are grouped: evaluation, importance, probes."""
        ordered = sorted(examples, key=lambda ex: self.length(ex)[0])
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]

    def counted(self, batch: dict, which: str) -> torch.Tensor:
        """The tokens that Eq. 9 averages over, (b, n): "all" attended tokens (image, prompt and answer;
        padding never counts), "text" (no image positions) or "answer" (the labelled ones)."""
        mask = batch["attention_mask"].bool()
        if which == "text":
            mask = mask & (batch["input_ids"] != self.image_id)
        elif which == "answer":
            mask = mask & (batch["labels"] != IGNORE)
        return mask

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


def length_problems(
    tasks: list[Task], collate: Collator, max_length: int, context: int, max_new_tokens: int
) -> tuple[list[str], dict]:
    """What the lengths of a stream's items mean before anything trains.

    Refused (returned as problems, with the flag to change): a training prompt that leaves no
    room for an answer within max_length; a test prompt plus max_new_tokens beyond the model's
    context. Counted (returned per task): training sequences whose tail max_length cuts.
    """
    problems, cut = [], {}
    for task in tasks:
        if not task.train or not task.test:
            problems.append(
                f"{task.key}: {len(task.train)} training and {len(task.test)} test items; a task needs both "
                f"(check its files, or --limit)"
            )
            continue
        collate.encode_all(task.train + task.test, desc=f"tokenizing {task.key}")
        train = [collate.length(ex) for ex in task.train]
        long_prompts = [p for p, _ in train if p >= max_length]
        if long_prompts:
            problems.append(
                f"{task.key}: {len(long_prompts)} of {len(train)} training prompts leave no room for an "
                f"answer within --max-length {max_length} (the longest prompt has {max(long_prompts)} "
                f"tokens, image positions included; the longest item needs --max-length {max(n for _, n in train)})"
            )
        over = [n for _, n in train if n > max_length]
        if over:
            cut[task.key] = {
                "sequences": len(over),
                "of": len(train),
                "tokens": sum(n - max_length for n in over),
                "longest": max(over),
            }
        tests = [collate.length(ex)[0] for ex in task.test]
        if tests and max(tests) + max_new_tokens > context:
            n = sum(p + max_new_tokens > context for p in tests)
            problems.append(
                f"{task.key}: {n} of {len(tests)} test prompts plus --max-new-tokens {max_new_tokens} exceed "
                f"the model's context of {context} tokens (the longest prompt has {max(tests)}); lower "
                f"--max-new-tokens to {context - max(tests)}"
            )
    return problems, cut


def check_stream(
    tasks: list[Task],
    collate: Collator,
    max_length: int,
    context: int,
    max_new_tokens: int,
    image_roots: tuple[Path, Path] | None = None,
) -> dict:
    """What a run checks before its first step: every image file decodes (image_roots: the image root
    and the data root, for the benchmark's files) and every prompt fits (length_problems). Raises one
    DataError that lists every problem, each naming what to change; returns what max_length cuts."""
    problems = check_images([ex for t in tasks for ex in t.train + t.test], *image_roots) if image_roots else []
    found, cut = length_problems(tasks, collate, max_length, context, max_new_tokens)
    if problems + found:
        raise DataError("the stream cannot run as configured; nothing was trained:\n  " + "\n  ".join(problems + found))
    for line in describe_cuts(cut, max_length):
        print("note:", line)
    return cut


def processor_image_tokens(processor) -> int:
    """How many positions a checkpoint's processor expands one <image> into (a blank image
    through it): what its model's vision tower must deliver."""
    from PIL import Image

    out = processor(text="<image>", images=Image.new("RGB", (64, 48)), return_tensors="pt")
    return int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


def describe_cuts(cut: dict, max_length: int) -> list[str]:
    return [
        f"{key}: {c['sequences']} of {c['of']} training sequences are longer than --max-length {max_length} and lose "
        f"their last tokens ({c['tokens']} tokens in all; the longest has {c['longest']})"
        for key, c in cut.items()
    ]


def _check_lengths(model: str, tasks: list[Task], max_length: int, max_new_tokens: int) -> list[str]:
    """The length checks of a run (length_problems) with a checkpoint's own tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    context = AutoConfig.from_pretrained(model).text_config.max_position_embeddings
    n_image = processor_image_tokens(processor)
    problems, cut = length_problems(
        tasks, Collator(processor.tokenizer, n_image, max_length), max_length, context, max_new_tokens
    )
    print(f"{model}: {n_image} positions per image, a context of {context} tokens")
    for line in describe_cuts(cut, max_length):
        print("note:", line)
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MLLM-CTBench checks")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate an MLLM-CTBench directory (non-zero exit on any problem)")
    c.add_argument("root", type=Path, help="directory holding reasoning_train/ and reasoning_test/")
    c.add_argument("--order", default="A", help="A, B, C, D, or comma-separated task keys")
    c.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="where image paths start (default: ROOT/images if it exists, else ROOT)",
    )
    c.add_argument(
        "--model",
        default=None,
        help="a LLaVA-1.5 checkpoint directory: also check every prompt's length with its tokenizer",
    )
    c.add_argument(
        "--max-length",
        type=int,
        default=1536,
        help="with --model: the training length limit (default: the paper recipe's)",
    )
    c.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        help="with --model: the generation budget (default: the paper recipe's)",
    )
    args = parser.parse_args(argv)
    problems, tasks = check(args.root, args.order, args.image_root)
    if args.model:
        problems += _check_lengths(args.model, tasks, args.max_length, args.max_new_tokens)
    for p in problems:
        print("ERROR", p, file=sys.stderr)
    print(f"{len(problems)} problem(s) found" if problems else "all records and images are valid")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
