"""Builders for tests that need files in the real formats: a llava-hf checkpoint, an MLLM-CTBench download.

Everything is built in the test, offline: nothing is downloaded and nothing is large. The first checkpoint in a
process takes about 3 s (importing torch and transformers, training the tokenizer); the next ones, and a dataset,
take a few hundredths of a second.

make_llava_checkpoint(path, tokenizer="legacy" | "metaspace", seed=0, dtype=torch.bfloat16) -> Path
    A tiny LLaVA-1.5 directory laid out as `llava-hf/llava-1.5-7b-hf` ships it: config.json (without
    `image_seq_length`, which llava-hf's config.json lacks), generation_config.json, model-0000k-of-0000n
    .safetensors shards + model.safetensors.index.json (bf16 by default, like the 7B's half-precision shards),
    tokenizer.json + tokenizer_config.json (tokenizer_class "LlamaTokenizer", padding_side "left", legacy false,
    add_bos_token true, as llava-hf's) + special_tokens_map.json + added_tokens.json (no tokenizer.model),
    preprocessor_config.json (CLIPImageProcessor, 84 px, CLIP mean/std),
    processor_config.json (patch_size 14, vision_feature_select_strategy "default", num_additional_image_tokens 1)
    and chat_template.json (llava-hf's template, written as llava-hf ships it).
    Vision: CLIP, image 84, patch 14 -> 36 patches (+1 CLS, dropped by "default"), so one <image> becomes 36 tokens.
    Text: Llama, hidden 64, 2 layers, 4 heads, intermediate 128, max_position_embeddings 2048, vocab = len(tokenizer).
    The tokenizer is a Llama-2-style BPE (byte_fallback, <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF> = 3..258, then the
    learned pieces, then the added specials <image> and <pad>), trained here with `tokenizers` (cached per process).
    "legacy":    llava-1.5-7b-hf's tokenizer.json pipeline: normalizer Sequence([Prepend("▁"), Replace(" ", "▁")]),
                 no pre-tokenizer, decoder Sequence([Replace("▁", " "), ByteFallback(), Fuse(), Strip(" ", 1, 0)]).
    "metaspace": pre_tokenizer Metaspace("▁", prepend_scheme="first", split=False), no normalizer, and the decoder
                 transformers 5's LlamaTokenizer builds (the same Sequence as above). A bare decoders.Metaspace would
                 print byte-fallback pieces literally ("a<0x0A>b"), so it would not round-trip newlines.
    Both: post-processor TemplateProcessing("<s> $A"), added tokens <unk> <s> </s> <image> <pad> (special, not
    normalized). Newlines are never learned: "\\n" is always the byte piece <0x0A>, as in Llama's vocabulary.
    Found with transformers 5.23 (see tests/test_realformat.py): AutoTokenizer/AutoProcessor on the checkpoint load
    tokenizer.json as written (TokenizersBackend: llava is among the model types whose hub tokenizer_class
    transformers distrusts), but `LlamaTokenizer.from_pretrained(path)`, or AutoTokenizer on a directory holding the
    tokenizer files without the llava config.json, rebuilds the pipeline as Metaspace and silently drops the legacy
    normalizer.

make_ctbench(root, *, tasks=("numglue", "art", "fomc", "OCR"), n_train=6, n_test=3,
             solution_format="answer_tag" | "think", seed=0, llava=True) -> Path
    An MLLM-CTBench download as the benchmark's data/download_data.sh lays it out
    (github.com/yueluoshuangtian/MLLM-CTBench, commit 17d034b; files data/README.md, data/download_data.sh,
    configs/paths.env, llava_cl/scripts/convert_qwen_to_llava.py):

        ROOT/reasoning_train/<task>.json   JSON list of {question_id, problem, solution, image?}
        ROOT/reasoning_test/<task>.json    same keys (the gold file the scorers read)
        ROOT/images/<image>                img.zip unpacked; `image` is relative to IMAGE_ROOT = ROOT/images
                                           (ROOT/img.zip itself, which the script leaves behind, is not written)
        ROOT/llava_train/<task>.json       (llava=True) convert_qwen_to_llava.py's conversations
        ROOT/llava_eval/<task>.jsonl       (llava=True) its question lines {question_id, text, image?}

    Text-only tasks (numglue, fomc) have no `image` key (data/README.md). `image` values follow the benchmark's
    examples: "art_vqa_datasets/AQUA/train/train_author_images/00066-ark1.jpg" (qwen_cl/src/Qwen2.5-vl-inference.py
    opens IMAGE_ROOT/that path), "OCR_vqa_datasets/Test/CROHME/..." (llava_cl/eval_tool/evaluate_latex.py); the
    sub-folders for science/math/medical and the train/test folder names other than those two are my guesses,
    carrying the sub-type names eval/cot_quality/rubrics.py reads from the path. question_id: the image path for
    image tasks (as evaluate_latex.py matches it), "<task>_<split>_<i>" for text-only tasks (a guess, in the
    "<task>_<i>" form of convert_qwen_to_llava.py's fallback).
    `problem` = question + "\\nprompt:\\n" + answer-format instruction: the training/eval code of the benchmark splits
    it there (qwen_cl/src/src/open_r1/grpo_cl.py: problem.split('prompt:\\n')).
    `solution`: "answer_tag": "<think>reasoning</think>\\n\\n<answer>X</answer>" (qwen_cl/src/local_scripts/
    prepare_hf_data.py builds it so; eval/accuracy/qwen_new_eval_tool/_common_v2.py reads <answer>);
    "think": "<think> reasoning </think> X" (data/README.md). fomc/science answers are option letters, numglue
    numbers, art/OCR/medical short text (_common_v2.py's scorers).
    Example record (art, answer_tag, seed 0, reasoning_train/art.json[0]):
        {"question_id": "art_vqa_datasets/AQUA/train/train_author_images/00000-aqua0.jpg",
         "problem": "Who painted this artwork?\nprompt:\nOutput the answer in a short phrase.",
         "solution": "<think>The dark background and the warm light on the faces point to Edgar Degas.</think>"
                     "\n\n<answer>Edgar Degas</answer>",   (one string in the file)
         "image": "art_vqa_datasets/AQUA/train/train_author_images/00000-aqua0.jpg"}
    Images are real files written with pillow, 36 to 64 px a side; record i of an image task is, by i % 4:
    JPEG RGB, PNG RGBA, JPEG grayscale ("L"), PNG RGB (the extension follows the format).

image_path(root, task, index, split="train") -> Path: the image file behind one record.
truncate_image(root, task, index, split="train") -> Path: keep that record's JPEG headers and half of its scan
    data: Image.open() and verify() pass, load() raises OSError ("image file is truncated").
remove_image(root, task, index, split="train") -> Path: delete that record's image file.

Also: make_tokenizer(kind) (the transformers tokenizer alone), backend_tokenizer(kind) (its tokenizers.Tokenizer),
CHAT_TEMPLATE, NUM_IMAGE_TOKENS (36), TASKS, TEXT_ONLY.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from pathlib import Path

TASKS = ("art", "OCR", "fomc", "science", "numglue", "math", "medical")
TEXT_ONLY = ("numglue", "fomc")
IMAGE_SIZE, PATCH_SIZE = 84, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36: CLS + 36 patches, "default" drops the CLS

# llava-hf/llava-1.5-7b-hf chat_template.json (with the `generation` tag of its PR #29)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIALS = ("<unk>", "<s>", "</s>")
ADDED = ("<image>", "<pad>")


# ---- the benchmark's content: templates shared by the dataset and the tokenizer's training text ----

_NAMES = ("Joan", "Sam", "Mike", "Sara", "Tom", "Alyssa", "Jason", "Mary")
_THINGS = ("seashells", "apples", "marbles", "books", "pencils", "cookies", "stamps", "balloons")
_FOMC = (  # (sentence, label)
    ("The Committee decided to raise the target range for the federal funds rate.", "hawkish"),
    ("Inflation remains elevated, and further tightening may be appropriate.", "hawkish"),
    ("The Committee will keep the policy rate low to support the recovery.", "dovish"),
    ("Members agreed that labor market slack warrants patient accommodation.", "dovish"),
    ("Economic activity expanded at a moderate pace in recent months.", "neutral"),
    ("The staff projection for growth was little changed from the previous meeting.", "neutral"),
)
_FOMC_OPTIONS = ("dovish", "hawkish", "neutral")
_ARTISTS = ("Claude Monet", "Vincent van Gogh", "Rembrandt", "Paul Cezanne", "Edgar Degas", "Pablo Picasso")
_STYLES = ("Impressionism", "Baroque", "Cubism", "Realism", "Romanticism")
_ART_CUES = (
    "the thick brush strokes and the light on the water",
    "the swirling sky and bold yellow tones",
    "the dark background and the warm light on the faces",
    "the flat planes and solid shapes",
)
_OCR = (  # (subtype folder, question, answer)
    ("CROHME", "What is the handwritten formula in the image? Write it in LaTeX.", "x ^ { 2 } + 2 x + 1"),
    ("CROHME", "What is the handwritten formula in the image? Write it in LaTeX.", "\\frac { a } { b } = 3"),
    ("ChartOCR", "What is the value of the tallest bar in the chart?", "48"),
    ("ChartOCR", "What is the title of the chart?", "Sales by Year"),
    ("scene", "What is written on the sign?", "OPEN 24 HOURS"),
    ("scene", "What word is painted on the wall?", "EXIT"),
)
_SCIENCE = (  # (subject, question, options, answer index)
    ("biology", "Which of these animals is a mammal?", ("shark", "whale", "trout", "eel"), 1),
    ("physics", "Which force pulls the ball toward the ground?", ("friction", "magnetism", "gravity"), 2),
    ("chemistry", "Which of these is a solid at room temperature?", ("iron", "water", "oxygen"), 0),
    ("geography", "Which continent is highlighted on the map?", ("Asia", "Africa", "Europe", "South America"), 3),
)
_MATH = (  # (type, question, answer)
    ("GeometryNumericCal", "What is the area of the rectangle shown in the figure?", "24"),
    ("PlotCompare", "Is the red line above the blue line at x = 3? Answer yes or no.", "yes"),
    ("BarPieCompare", "Which bar is the tallest? Choose from A, B, C, D.", "C"),
    ("Probability", "How many of the 8 balls in the figure are red?", "3"),
)
_MEDICAL = (  # (modality, question, answer)
    ("CT", "Which organ shows an abnormality in this CT image?", "liver"),
    ("MRI", "What imaging plane is used in this MRI scan?", "axial"),
    ("XRay", "Is there a fracture visible in this X-ray?", "no"),
)
_PROMPTS = {
    "numglue": "Output the final answer as a number.",
    "fomc": "Output the letter of the correct option.",
    "art": "Output the answer in a short phrase.",
    "OCR": "Output the recognized text exactly.",
    "science": "Output the letter of the correct option.",
    "math": "Output the final answer as a number, a letter or yes/no.",
    "medical": "Output a short phrase.",
}


def _letters(options) -> str:
    return "\n".join(f"{'ABCDEFGH'[i]}. {o}" for i, o in enumerate(options))


def _item(task: str, i: int, rng: random.Random) -> tuple[str, str, str, str | None]:
    """(question, reasoning, answer, sub-folder for the image or None) of one record."""
    if task == "numglue":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        who, other, what = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_THINGS)
        if rng.random() < 0.5:
            return (
                f"{who} found {a} {what} and {other} gave {who} {b} more. How many {what} does {who} have now?",
                f"{who} starts with {a} {what}. {other} adds {b}, so {a} + {b} = {a + b}.",
                str(a + b),
                None,
            )
        a, b = max(a, b), min(a, b)
        return (
            f"{who} had {a} {what} and gave {b} of them to {other}. How many {what} are left?",
            f"{who} had {a} and gave away {b}, so {a} - {b} = {a - b}.",
            str(a - b),
            None,
        )
    if task == "fomc":
        sentence, label = _FOMC[rng.randrange(len(_FOMC))]
        letter = "ABC"[_FOMC_OPTIONS.index(label)]
        return (
            f'Classify the monetary policy stance of this FOMC sentence: "{sentence}"\n'
            f"Options:\n{_letters(_FOMC_OPTIONS)}",
            f"The sentence signals a {label} stance, which is option {letter}.",
            letter,
            None,
        )
    if task == "art":
        if rng.random() < 0.7:
            artist = rng.choice(_ARTISTS)
            return (
                "Who painted this artwork?",
                f"{rng.choice(_ART_CUES).capitalize()} point to {artist}.",
                artist,
                "AQUA",
            )
        style = rng.choice(_STYLES)
        return (
            "What is the style of this painting?",
            f"The composition and the palette are typical of {style}.",
            style,
            "AQUA",
        )
    if task == "OCR":
        sub, q, a = _OCR[rng.randrange(len(_OCR))]
        return q, f"Reading the image from left to right gives {a}.", a, sub
    if task == "science":
        sub, q, options, k = _SCIENCE[rng.randrange(len(_SCIENCE))]
        letter = "ABCDEFGH"[k]
        return (
            f"{q}\nOptions:\n{_letters(options)}",
            f"The answer is {options[k]}, which is option {letter}.",
            letter,
            sub,
        )
    if task == "math":
        sub, q, a = _MATH[rng.randrange(len(_MATH))]
        return q, f"Looking at the figure step by step, the result is {a}.", a, sub
    if task == "medical":
        sub, q, a = _MEDICAL[rng.randrange(len(_MEDICAL))]
        return q, f"The image shows the finding clearly, so the answer is {a}.", a, sub
    raise ValueError(f"unknown task {task!r}: known tasks are {TASKS}")


def _solution(reasoning: str, answer: str, solution_format: str) -> str:
    if solution_format == "answer_tag":  # prepare_hf_data.py
        return f"<think>{reasoning}</think>\n\n<answer>{answer}</answer>"
    if solution_format == "think":  # data/README.md
        return f"<think> {reasoning} </think> {answer}"
    raise ValueError(f"solution_format must be 'answer_tag' or 'think', got {solution_format!r}")


_FORMATS = (("JPEG", "RGB", "jpg"), ("PNG", "RGBA", "png"), ("JPEG", "L", "jpg"), ("PNG", "RGB", "png"))
_SIZES = ((40, 56), (56, 40), (48, 48), (64, 36), (36, 64), (44, 52))


def _image_rel(task: str, split: str, i: int, sub: str, ext: str) -> str:
    stem = f"{i:05d}-{sub.lower()}{i % 7}"
    if task == "art":  # Qwen2.5-vl-inference.py: art_vqa_datasets/AQUA/train/train_author_images/00066-ark1.jpg
        return f"art_vqa_datasets/{sub}/{split}/{split}_author_images/{stem}.{ext}"
    if task == "OCR":  # evaluate_latex.py: OCR_vqa_datasets/Test/CROHME...
        return f"OCR_vqa_datasets/{split.capitalize()}/{sub}/{stem}.{ext}"
    return f"{task}_vqa_datasets/{sub}/{split}/{stem}.{ext}"


def _draw(path: Path, fmt: str, mode: str, size: tuple[int, int], rng: random.Random) -> None:
    from PIL import Image, ImageDraw

    color = lambda: tuple(rng.randrange(256) for _ in range(3)) + ((rng.randrange(128, 256),) if mode == "RGBA" else ())
    im = Image.new("RGBA" if mode == "RGBA" else "RGB", size, color())
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.randrange(size[0] - 4), rng.randrange(size[1] - 4)
        d.rectangle((x0, y0, rng.randrange(x0 + 2, size[0]), rng.randrange(y0 + 2, size[1])), fill=color())
    if mode == "L":
        im = im.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _records(task: str, split: str, n: int, solution_format: str, rng: random.Random):
    """[(record, image spec or None)]; the image spec is (rel path, format, mode, size)."""
    out = []
    for i in range(n):
        q, reasoning, answer, sub = _item(task, i, rng)
        rec = {
            "question_id": f"{task}_{split}_{i}",
            "problem": f"{q}\nprompt:\n{_PROMPTS[task]}",
            "solution": _solution(reasoning, answer, solution_format),
        }
        spec = None
        if task not in TEXT_ONLY:
            fmt, mode, ext = _FORMATS[i % len(_FORMATS)]
            rel = _image_rel(task, split, i, sub, ext)
            rec["question_id"] = rec["image"] = rel
            spec = (rel, fmt, mode, _SIZES[(i + len(split)) % len(_SIZES)])
        out.append((rec, spec))
    return out


def make_ctbench(
    root,
    *,
    tasks=("numglue", "art", "fomc", "OCR"),
    n_train: int = 6,
    n_test: int = 3,
    solution_format: str = "answer_tag",
    seed: int = 0,
    llava: bool = True,
) -> Path:
    """Write an MLLM-CTBench directory (layout in the module docstring); returns root."""
    root = Path(root)
    _solution("", "", solution_format)  # validate early
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: known tasks are {TASKS}")
        for split, n in (("train", n_train), ("test", n_test)):
            rng = random.Random(zlib.crc32(f"{seed}/{task}/{split}".encode()))
            recs = _records(task, split, n, solution_format, rng)
            for _, spec in recs:
                if spec is not None:
                    rel, fmt, mode, size = spec
                    _draw(root / "images" / rel, fmt, mode, size, rng)
            records = [r for r, _ in recs]
            out = root / f"reasoning_{split}" / f"{task}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, ensure_ascii=False, indent=2))
            if llava:
                _write_llava(root, task, split, records)
    return root


def _write_llava(root: Path, task: str, split: str, records: list[dict]) -> None:
    """What data/download_data.sh step 3 (llava_cl/scripts/convert_qwen_to_llava.py) writes."""
    if split == "train":
        conv = []
        for i, s in enumerate(records):
            item = {"id": s.get("question_id", f"{task}_{i}"), "conversations": []}
            img = s.get("image")
            if img:
                item["image"] = img
            item["conversations"] = [
                {"from": "human", "value": ("<image>\n" + s["problem"]) if img else s["problem"]},
                {"from": "gpt", "value": s["solution"]},
            ]
            conv.append(item)
        out = root / "llava_train" / f"{task}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(conv, ensure_ascii=False))
    else:
        lines = []
        for i, s in enumerate(records):
            rec = {"question_id": s.get("question_id", f"{task}_{i}"), "text": s["problem"]}
            if s.get("image"):
                rec["image"] = s["image"]
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        out = root / "llava_eval" / f"{task}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(lines))


def image_path(root, task: str, index: int, split: str = "train") -> Path:
    """The file behind record `index` of reasoning_<split>/<task>.json."""
    root = Path(root)
    rec = json.loads((root / f"reasoning_{split}" / f"{task}.json").read_text())[index]
    if "image" not in rec:
        raise ValueError(f"{task} record {index} has no image ({task} is text-only)")
    return root / "images" / rec["image"]


def truncate_image(root, task: str, index: int, split: str = "train") -> Path:
    """Cut record `index`'s JPEG to half its bytes: Image.verify() passes, a full decode (load) raises OSError."""
    path = image_path(root, task, index, split)
    data = path.read_bytes()
    sos = data.find(b"\xff\xda")  # start of scan: the headers (tables, frame) end here
    if data[:2] != b"\xff\xd8" or sos < 0:
        raise ValueError(f"{path} is not a JPEG (records i % 4 in (0, 2) of an image task are)")
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")  # first byte of the entropy-coded data
    path.write_bytes(data[: scan + (len(data) - scan) // 2])  # headers intact, half of the pixels gone
    return path


def remove_image(root, task: str, index: int, split: str = "train") -> Path:
    path = image_path(root, task, index, split)
    path.unlink()
    return path


# ---- the tokenizer ----


def _corpus() -> list[str]:
    """About a thousand short lines covering the dataset's words, both solution formats, the chat template,
    digits, punctuation."""
    rng = random.Random(1234)
    lines = []
    for task in TASKS:
        for fmt in ("answer_tag", "think"):
            for i in range(12):
                q, reasoning, answer, _ = _item(task, i, rng)
                reply = _solution(reasoning, answer, fmt)
                lines += f"USER: <image>\n{q}\nprompt:\n{_PROMPTS[task]} ASSISTANT: {reply}".split("\n")
    lines += [" ".join(str(rng.randrange(10**k)) for k in range(1, 6)) for _ in range(20)]
    lines += [
        "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
        "0 1 2 3 4 5 6 7 8 9",
        "What is it? It is a red square, a blue circle and a green line.",
        "Hello world, this is a test.",
    ] * 3
    return [line for line in lines if line.strip()]


@functools.cache
def _bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab items, merges) of the Llama-2-style BPE, learned once per process (about 20 ms)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    # pieces never span words, digits or punctuation marks (SentencePiece's split_by_whitespace, split_digits
    # and split_by_unicode_script, as Llama's model was trained): "19" encodes as "▁", "1", "9", as in Llama
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    t.train_from_iterator(
        _corpus(), trainers.BpeTrainer(vocab_size=900, special_tokens=list(SPECIALS), show_progress=False)
    )
    model = json.loads(t.to_str())["model"]
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab and "\n" not in piece:
            vocab[piece] = len(vocab)
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(vocab.items()), merges


def backend_tokenizer(kind: str = "legacy"):
    """The `tokenizers.Tokenizer` of one pipeline (what tokenizer.json holds)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = _bpe()
    tok = Tokenizer(
        models.BPE(vocab=dict(vocab), merges=list(merges), byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    if kind == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        raise ValueError(f"tokenizer must be 'legacy' or 'metaspace', got {kind!r}")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS + ADDED])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


def make_tokenizer(kind: str = "legacy"):
    """The transformers tokenizer (TokenizersBackend over backend_tokenizer(kind)), llava-hf's settings."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend_tokenizer(kind),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
        add_eos_token=False,
    )


# ---- the checkpoint ----


def make_llava_checkpoint(path, tokenizer: str = "legacy", seed: int = 0, dtype=None) -> Path:
    """Write a tiny llava-hf-style LLaVA-1.5 checkpoint directory (see the module docstring); returns path."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    dtype = torch.bfloat16 if dtype is None else dtype
    tok = make_tokenizer(tokenizer)
    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        vocab_size=len(tok),
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.pad_token_id = pad_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.save_pretrained(path, max_shard_size="250KB")

    cfg_file = path / "config.json"  # llava-hf's config.json has no image_seq_length
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("image_seq_length", None)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    improc = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    proc = LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    proc.save_pretrained(path)
    _llava_hf_files(path)
    return path


def _llava_hf_files(path: Path) -> None:
    """Lay the saved processor files out as llava-hf's: transformers 5 nests the image processor in
    processor_config.json and writes chat_template.jinja; llava-hf ships preprocessor_config.json, a flat
    processor_config.json and chat_template.json."""
    proc_file = path / "processor_config.json"
    proc = json.loads(proc_file.read_text())
    improc = proc.pop("image_processor")
    proc.pop("chat_template", None)
    improc.update(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(improc, indent=2, sort_keys=True) + "\n")
    proc_file.write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")

    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")

    tc = path / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg.pop("chat_template", None)
    cfg.update(
        tokenizer_class="LlamaTokenizer",
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        pad_token="<pad>",
        processor_class="LlavaProcessor",
        sp_model_kwargs={},
        use_default_system_prompt=False,
        clean_up_tokenization_spaces=False,
    )
    tc.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    # files llava-hf also ships and transformers 5 no longer writes (its tokenizer.model, a SentencePiece
    # proto, is left out: transformers reads tokenizer.json first)
    ids = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
    (path / "added_tokens.json").write_text(json.dumps({t: ids[t] for t in ADDED}, indent=2) + "\n")
    tok = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": tok("<s>"), "eos_token": tok("</s>"), "pad_token": "<pad>", "unk_token": tok("<unk>")},
            indent=2,
        )
        + "\n"
    )
