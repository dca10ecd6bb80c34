"""data.py: benchmark files, the checker, the collator."""

import json

import pytest
import torch
from PIL import Image

import data
from toy.tiny_llava import tiny_tokenizer


def write_bench(root, records_by_split, images=()):
    for split, by_task in records_by_split.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for key, records in by_task.items():
            (root / split / f"{key}.json").write_text(json.dumps(records) if not isinstance(records, str) else records)
    for name in images:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(root / name)


def raw(problem="What is 1+1? answer: with a number", solution="1 plus 1. answer: 2", **kw):
    return {"problem": problem, "solution": solution, **kw}


def full_bench(root, order="A"):
    """A valid benchmark: every task of the order, one train and one test record each."""
    records = {}
    for split in ("reasoning_train", "reasoning_test"):
        records[split] = {
            k: [raw() if k in data.TEXT_ONLY else raw(image=f"img/{k}.png")] for k in data.task_order(order)
        }
    write_bench(root, records, images=[f"img/{k}.png" for k in data.TASKS])


def test_both_formats_parse(tmp_path):
    conv = [
        {
            "id": "c1",
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "answer: red"},
            ],
        }
    ]
    write_bench(
        tmp_path,
        {"reasoning_train": {"art": conv}, "reasoning_test": {"art": [raw(image="img/a.png", question_id=7)]}},
        images=["img/a.png"],
    )
    (task,) = data.load_ctbench(tmp_path, order="art")
    ex = task.train[0]
    assert (ex.id, ex.problem, ex.solution) == ("c1", "What colour?", "answer: red")  # <image> is the collator's job
    assert ex.image == str(tmp_path / "img/a.png")
    assert task.test[0].id == "7" and task.test[0].problem.startswith("What is")


def test_orders():
    assert data.task_order("B") == data.TASKS[::-1]
    assert sorted(data.task_order("C")) == sorted(data.TASKS)
    assert data.task_order("fomc,art") == ["fomc", "art"]
    with pytest.raises(ValueError, match="unknown task keys"):
        data.task_order("fomc,chess")


def test_check_accepts_a_valid_directory(tmp_path, capsys):
    full_bench(tmp_path)
    assert data.check(tmp_path)[0] == []
    with pytest.raises(SystemExit) as exit_:
        data.main(["check", str(tmp_path)])
    assert exit_.value.code == 0
    assert "all records and images are valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda r: (r / "reasoning_train/art.json").write_text("[{"), "art.json: "),
        (
            lambda r: (r / "reasoning_test/math.json").write_text(json.dumps([raw(), {"problem": "q"}])),
            "math.json record 1: missing or empty 'solution'",
        ),
        (
            lambda r: (r / "reasoning_train/OCR.json").write_text(json.dumps([raw(image="img/none.png")])),
            "1 of 6 images not found under the image root",
        ),
        (lambda r: (r / "img/science.png").write_bytes(b"not a png"), "science item 0: image"),
        (
            lambda r: (r / "reasoning_train/medical.json").write_text(json.dumps([raw()])),
            "medical.json record 0: image task",
        ),
        (lambda r: (r / "reasoning_train/chess.json").write_text("[]"), "unknown task key 'chess'"),
        (lambda r: (r / "reasoning_test/fomc.json").unlink(), "fomc.json"),
    ],
)
def test_check_reports_bad_input_with_file_and_index(tmp_path, capsys, break_it, expected):
    full_bench(tmp_path)
    break_it(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        data.main(["check", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert expected in err, err


def test_loading_a_bad_record_names_file_and_index(tmp_path):
    write_bench(
        tmp_path, {"reasoning_train": {"fomc": [raw(), raw(solution="  ")]}, "reasoning_test": {"fomc": [raw()]}}
    )
    with pytest.raises(data.DataError, match=r"fomc.json record 1: missing or empty 'solution'"):
        data.load_ctbench(tmp_path, order="fomc")


# ---- the sanity stream ----


# ---- the collator ----


def collator(max_length=256):
    tok = tiny_tokenizer()
    return data.Collator(tok, num_image_tokens=3, max_length=max_length), tok


def test_rendered_prompt_and_label_mask_token_by_token():
    col, tok = collator()
    img = torch.zeros(3, 32, 32)
    ex = data.Example("art", "x", "Describe this artwork.", "The artwork is simple. answer: red", img)
    text_ex = data.Example("fomc", "y", "Is this hawkish?", "answer: A")
    batch = col.train([ex, text_ex])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n = int(mask[0].sum())
    tokens = tok.convert_ids_to_tokens(ids[0, :n].tolist())
    expected_prompt = [
        "<s>",
        "USER",
        ":",
        " ",
        "<image>",
        "<image>",
        "<image>",
        "\n",
        "Describe",
        " ",
        "this",
        " ",
        "artwork",
        ".",
        " ",
        "ASSISTANT",
        ":",
    ]
    expected_answer = [
        " ",
        "The",
        " ",
        "artwork",
        " ",
        "is",
        " ",
        "simple",
        ".",
        " ",
        "answer",
        ":",
        " ",
        "red",
        "</s>",
    ]
    assert tokens == expected_prompt + expected_answer
    assert labels[0, : len(expected_prompt)].eq(data.IGNORE).all()
    assert labels[0, len(expected_prompt) : n].tolist() == ids[0, len(expected_prompt) : n].tolist()
    # the shorter text-only row: right padding, masked out, no image tokens
    m = int(mask[1].sum())
    assert m < n and ids[1, m:].eq(tok.pad_token_id).all() and labels[1, m:].eq(data.IGNORE).all()
    assert tok.convert_tokens_to_ids("<image>") not in ids[1].tolist()
    assert batch["examples"] == [ex, text_ex]
    assert tok.decode(ids[1, :m], skip_special_tokens=False) == "<s>USER: Is this hawkish? ASSISTANT: answer: A</s>"


def test_prompts_are_left_padded_without_answers():
    col, tok = collator()
    exs = [
        data.Example("fomc", "a", "Short?", "answer: A"),
        data.Example("fomc", "b", "A much longer question here?", "answer: B"),
    ]
    batch = col.prompts(exs)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()
    assert batch["input_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids(":")] * 2  # "ASSISTANT:" ends both
    assert batch["examples"] == exs


def test_length_checks_count_cuts_and_refuse_prompts_that_do_not_fit():
    # planted bugs: a cut counted once per epoch or per batch, test items counted as training
    # sequences, a training prompt with no room for its answer let through
    col, _ = collator(max_length=16)
    long = data.Example("numglue", "n1", "Add?", "one two three four five six seven. answer: 7")
    short = data.Example("numglue", "n2", "Add?", "answer: 7")
    task = data.Task("numglue", [long, short], [long])
    for _ in range(3):  # three epochs
        batch = col.train([long])
    assert batch["input_ids"].shape[1] == 16 and col.length(short)[1] <= 16
    problems, cut = data.length_problems([task], col, max_length=16, context=64, max_new_tokens=8)
    assert problems == [] and cut == {
        "numglue": {"sequences": 1, "of": 2, "tokens": col.length(long)[1] - 16, "longest": col.length(long)[1]}
    }
    problems, _ = data.length_problems([task], collator(max_length=4)[0], max_length=4, context=64, max_new_tokens=8)
    assert (
        len(problems) == 1 and "2 of 2 training prompts leave no room" in problems[0] and "--max-length" in problems[0]
    )
    problems, _ = data.length_problems([task], col, max_length=16, context=10, max_new_tokens=8)
    assert "lower --max-new-tokens" in problems[0]
