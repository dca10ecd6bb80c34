"""The real path on the real formats: a checkpoint in llava-hf's layout, MLLM-CTBench as its download
lays it out (both built by tests/realformat.py in seconds), through load_llava and the README's command.

RUN is the README's real command (--recipe paper --stream ctbench --data-root --model, no --image-root)
with small overrides; it trains in bf16 under autocast, as the recipe does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import realformat as rf
import torch
from helpers import only_read
from safetensors.torch import load_file

import config
import data
import llava_wrap
import train_stream as ts

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--order",
    "numglue,art,fomc,OCR",
    "--num-experts",
    "2",
    "--rank",
    "2",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-batch-size",
    "4",
    "--probe-size",
    "2",
    "--limit",
    "4",
    "--lr",
    "1e-3",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctbench")
    ckpt = rf.make_llava_checkpoint(root / "llava-1.5-tiny-hf", tokenizer="legacy")
    bench = rf.make_ctbench(root / "MLLM-CTBench", tasks=("numglue", "art", "fomc", "OCR"), n_train=6, n_test=4)
    return ckpt, bench


def readme_args(bench, *extra):
    ckpt, root = bench
    return only_read(
        ["--recipe", "paper", "--stream", "ctbench", "--data-root", str(root), "--model", str(ckpt), *SMALL, *extra]
    )


@pytest.fixture(scope="module")
def real_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "real"
    ts.run(ts.parse_args(readme_args(bench, "--out", str(out)))[0])
    return out


def test_the_readme_command_runs_on_the_benchmarks_layout(real_run, bench):
    # planted bugs: images looked up under ROOT instead of ROOT/images (training then stopped at the
    # first image task); prediction rows without the ids and texts the benchmark's re-scoring reads
    config = json.loads((real_run / "config.json").read_text())
    assert config["image_root"] == str(bench[1] / "images") and config["dtype"] == "bfloat16"
    assert config["pas_config"]["alpha"] / config["pas_config"]["rank"] == 2.0  # --rank 2 kept the recipe's scaling
    R = json.loads((real_run / "matrix.json").read_text())["R"]
    assert all(v is not None for v in R[-1]) and all(R[t][t] is not None for t in range(4))
    rows = [json.loads(line) for line in (real_run / "predictions" / "after4_art.jsonl").read_text().splitlines()]
    references = json.loads((bench[1] / "reasoning_test" / "art.json").read_text())[:4]
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in references]
    assert [r["prompt"] for r in rows] == [r["problem"] for r in references] and all("text" in r for r in rows)


def test_a_perfect_model_scores_100_through_the_whole_pipeline(bench, tmp_path, monkeypatch):
    # planted bug: the benchmark's <think>/<answer> format scored 0 (answers extracted after "answer:" only)
    asked = []
    prompts = data.Collator.prompts

    def recording(self, examples):
        asked[:] = examples
        return prompts(self, examples)

    monkeypatch.setattr(data.Collator, "prompts", recording)
    monkeypatch.setattr(
        llava_wrap, "generate", lambda bundle, batch, max_new_tokens=64, synced=False: [ex.solution for ex in asked]
    )
    out = tmp_path / "perfect"
    ts.run(ts.parse_args(readme_args(bench, "--out", str(out), "--dtype", "float32", "--eval", "full"))[0])
    R = json.loads((out / "matrix.json").read_text())["R"]
    assert all(v == 100.0 for row in R for v in row if v is not None), R


@pytest.mark.parametrize("pipeline", ["legacy", "metaspace"])
def test_token_ids_and_labels_are_the_processors(pipeline, tmp_path, bench):
    # planted bugs: "USER: " encoded apart from the problem (a stray "▁" between them), the solution
    # encoded apart from the prompt (under the legacy normalizer its first label is a lone "▁")
    from PIL import Image
    from transformers import AutoProcessor

    ckpt = rf.make_llava_checkpoint(tmp_path / pipeline, tokenizer=pipeline)
    processor = AutoProcessor.from_pretrained(ckpt)
    bundle = llava_wrap.load_llava(str(ckpt), dtype=torch.float32)
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, 1536)
    tasks = data.load_ctbench(bench[1], order="art,fomc")
    worded = data.Example("fomc", "w", tasks[1].train[0].problem, "The stance is hawkish. answer: A")
    for ex in (tasks[0].train[0], tasks[1].train[0], worded):  # an image task, a text-only one, a worded answer
        image = Image.open(ex.image).convert("RGB") if ex.image else None
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": ex.problem}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert prompt == data.Collator.prompt_text(ex).replace("ASSISTANT:", "").rstrip() + " ASSISTANT:"
        expected = processor(text=prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
        whole = processor(text=prompt + " " + ex.solution, images=image, return_tensors="pt")["input_ids"][0].tolist()
        batch = collate.train([ex])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert collate.prompts([ex])["input_ids"][0].tolist() == expected
        assert ids == whole + [bundle.tokenizer.eos_token_id]
        answer = [i for i, lab in zip(ids, labels) if lab != data.IGNORE]
        assert answer == ids[len(expected) :]  # exactly the answer tokens and the end token
        assert bundle.tokenizer.decode(answer[:-1]).strip() == ex.solution.strip()
    assert bundle.tokenizer.convert_ids_to_tokens(collate.encode(worded)[1][0]) == "▁The"  # not a lone "▁"


def test_image_positions_come_from_the_checkpoint(bench, tmp_path):
    # planted bug: config.image_seq_length read (llava-hf's config.json lacks it; the default 576
    # fits the 7B only): "the prompt alone has 617 tokens", "features and image tokens do not match"
    ckpt, _ = bench
    assert "image_seq_length" not in json.loads((ckpt / "config.json").read_text())
    assert llava_wrap.load_llava(str(ckpt), dtype=torch.float32).num_image_tokens == rf.NUM_IMAGE_TOKENS == 36
    other = tmp_path / "mismatched"
    shutil.copytree(ckpt, other)
    processor_config = json.loads((other / "processor_config.json").read_text())
    (other / "processor_config.json").write_text(json.dumps(processor_config | {"patch_size": 12}))
    with pytest.raises(ValueError, match="do not belong together"):
        llava_wrap.load_llava(str(other), dtype=torch.float32)


def test_the_seed_seeds_the_adapters_on_the_real_path(bench):
    # planted bug: adapters initialised from whatever state the global generator is in (the same
    # --seed then gave different lora_A in three processes)
    def first_lora_A(seed):
        torch.rand(int(torch.randint(1, 100, ()).item()))  # a process-dependent generator state
        cfg = ts.parse_args(readme_args(bench, "--seed", str(seed)))[0]
        model = config.load_model(cfg, torch.device("cpu")).model
        return next(iter(llava_wrap.pas_layers(model).values())).lora_A.detach().clone()

    a, b, c = first_lora_A(3), first_lora_A(3), first_lora_A(4)
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(real_run, bench, tmp_path, monkeypatch):
    # planted bugs: resume that does not load the adapters; --resume refusing the one path that may
    # move (--image-root)
    ckpt, root = bench
    moved = tmp_path / "moved-images"
    shutil.copytree(root / "images", moved)
    out = tmp_path / "crashed"
    real_loss, calls = ts.task_loss, []

    def crash_in_task_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # tasks 1 and 2 took 2 steps each
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ts, "task_loss", crash_in_task_three)
    with pytest.raises(KeyboardInterrupt):
        ts.run(ts.parse_args(readme_args(bench, "--out", str(out)))[0])
    monkeypatch.setattr(ts, "task_loss", real_loss)
    assert json.loads((out / "state.json").read_text())["completed"] == 2
    with pytest.raises(SystemExit):
        ts.parse_args(["--resume", str(out), "--lr", "1"])
    cfg, resume = ts.parse_args(["--resume", str(out), "--image-root", str(moved)])
    ts.run(cfg, resume)
    assert json.loads((out / "config.json").read_text())["image_root"] == str(moved)
    assert json.loads((out / "matrix.json").read_text()) == json.loads((real_run / "matrix.json").read_text())
    a, b = load_file(out / "ckpt" / "task4.safetensors"), load_file(real_run / "ckpt" / "task4.safetensors")
    for key in a:  # one code path, one machine: float noise only (bf16 GEMMs under autocast)
        assert (a[key] - b[key]).abs().max() <= 1e-3 * b[key].abs().max() + 1e-9, key


def broken_copy(bench, tmp_path):
    root = tmp_path / "bench"
    shutil.copytree(bench[1], root)
    return root


def test_a_truncated_image_is_found_before_training(bench, tmp_path, capsys):
    # planted bug: Image.verify() as the check (it reads no pixels: a JPEG cut in half passes it and
    # then crashed training at its first batch)
    root = broken_copy(bench, tmp_path)
    bad = rf.truncate_image(root, "OCR", 0, split="test")
    with pytest.raises(SystemExit):
        data.main(["check", str(root), "--order", "numglue,art,fomc,OCR"])
    assert str(bad) in capsys.readouterr().err
    out = tmp_path / "run"
    with pytest.raises(data.DataError, match="does not decode") as err:
        ts.run(ts.parse_args(readme_args((bench[0], root), "--out", str(out)))[0])
    assert str(bad) in str(err.value) and not (out / "ckpt").exists()  # nothing was trained


def test_a_wrong_image_root_is_one_message_that_names_the_right_one(bench, tmp_path, capsys):
    # planted bug: one error line per image (69 here before), no hint where the images are
    root = broken_copy(bench, tmp_path)
    with pytest.raises(SystemExit):
        data.main(["check", str(root), "--order", "numglue,art,fomc,OCR", "--image-root", str(root)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"pass --image-root {root / 'images'}" in errors[0], errors
    problems, _ = data.check(root, order="numglue,art,fomc,OCR")  # the default root: ROOT/images
    assert problems == []


def test_what_does_not_fit_is_refused_before_training_with_the_flag_to_change(bench, tmp_path):
    # planted bugs: a test prompt too long for the model's context crashing evaluation after the
    # task's checkpoint was written; the sanity stream's defaults on a checkpoint whose images
    # alone fill the training length
    out = tmp_path / "run"
    with pytest.raises(data.DataError, match="lower --max-new-tokens"):
        ts.run(ts.parse_args(readme_args(bench, "--out", str(out), "--max-new-tokens", "2030"))[0])
    assert not out.exists()
    ckpt, root = bench
    toy = [
        "--stream",
        "ctbench",
        "--data-root",
        str(root),
        "--model",
        str(ckpt),
        "--order",
        "art",
        "--max-length",
        "40",
        "--out",
        str(out),
    ]
    with pytest.raises(data.DataError, match=r"training prompts leave no room.*--max-length(.|\n)*--recipe paper"):
        ts.run(ts.parse_args(toy)[0])
    assert not out.exists()


def test_data_check_measures_prompts_with_the_checkpoints_tokenizer(bench, capsys):
    ckpt, root = bench
    with pytest.raises(SystemExit) as done:
        data.main(["check", str(root), "--order", "numglue,art,fomc,OCR", "--model", str(ckpt)])
    assert done.value.code == 0, capsys.readouterr().err
    assert "36 positions per image" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        data.main(["check", str(root), "--order", "art", "--model", str(ckpt), "--max-length", "40"])
    assert done.value.code == 1 and "--max-length 40" in capsys.readouterr().err


def test_recipe_overrides_keep_its_scaling():
    # planted bug: --rank 4 under --recipe paper kept alpha 256 (alpha / r jumped from 2 to 64)
    for extra, scaling in (
        (["--rank", "4"], 2.0),
        (["--total-rank", "24"], 2.0),
        (["--rank", "4", "--alpha", "16"], 4.0),
    ):
        pas = config.adapters(ts.parse_args(["--recipe", "paper", "--model", "some/llava", *extra])[0])[0]
        assert pas.alpha / pas.rank == scaling, extra
    with pytest.raises(SystemExit):  # which would win is not obvious: refused
        ts.parse_args(["--recipe", "paper", "--model", "some/llava", "--rank", "8", "--total-rank", "24"])


def test_the_command_line_works_under_cprofile():
    # planted bug: --help built from inspect.getsource(RunConfig), which fails when the script is __main__
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "train_stream.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--limit" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("method", ["seqft", "l2p", "hide", "ddas"])
def test_the_table_1_methods_run_on_the_real_path(method, bench, tmp_path):
    # planted bugs: a method that assumes the tiny model (its module names, its single image
    # position count), or one whose features need images that text-only tasks lack
    out = tmp_path / method
    ts.run(ts.parse_args(readme_args(bench, "--out", str(out), "--method", method, "--order", "numglue,art"))[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ap"] is not None and ("task_id_accuracy" in metrics) == (method in ("hide", "ddas"))
