"""The real-format builders (tests/realformat.py) produce what they claim: a llava-hf-style checkpoint that
transformers loads offline, two Llama tokenizer pipelines that round-trip and differ, an MLLM-CTBench tree."""

import json

import pytest
import realformat as rf
import torch
from PIL import Image

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {kind: rf.make_llava_checkpoint(root / kind, tokenizer=kind) for kind in ("legacy", "metaspace")}


def _load(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (
        AutoProcessor.from_pretrained(path, local_files_only=True),
        LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True),
    )


def test_checkpoint_is_laid_out_as_llava_hf_and_runs(checkpoints):
    path = checkpoints["legacy"]
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.json",
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    } <= names
    assert "image_seq_length" not in json.loads((path / "config.json").read_text())
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert (tok_cfg["tokenizer_class"], tok_cfg["padding_side"]) == ("LlamaTokenizer", "left")

    processor, model = _load(path)
    assert model.dtype == torch.bfloat16 and model.config.vision_feature_layer == -2
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            add_generation_prompt=True,
        )
        == PROMPT
    )
    enc = processor(text=PROMPT, images=Image.new("RGB", (40, 56), (200, 30, 30)), return_tensors="pt")
    assert (enc["input_ids"] == model.config.image_token_index).sum().item() == rf.NUM_IMAGE_TOKENS == 36
    with torch.no_grad():  # raises unless the image features fill the image tokens exactly
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(processor.tokenizer))


def test_tokenizer_pipelines_round_trip_and_differ(checkpoints):
    text = "USER: What is 19 + 9?\nASSISTANT: <think>19 + 9 = 28.</think>\n\n<answer>28</answer>\nDone, (ok) $5!"
    toks = {}
    for kind, path in checkpoints.items():
        tok, _ = _load(path)
        tok = tok.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, kind
        assert tok(text)["input_ids"][0] == tok.bos_token_id == 1
        assert "<0x0A>" in tok.convert_ids_to_tokens(ids)  # newlines are byte pieces, as in Llama's vocab
        toks[kind] = tok
    # the legacy normalizer prepends "▁" to every piece of text, also after a special token and before a space
    lone = lambda kind, s: toks[kind].convert_ids_to_tokens(toks[kind](s, add_special_tokens=False)["input_ids"])
    assert lone("legacy", " X") == ["▁", "▁X"] and lone("metaspace", " X") == ["▁X"]
    assert toks["legacy"].decode(toks["legacy"](" X", add_special_tokens=False)["input_ids"]) == " X"
    assert toks["metaspace"].decode(toks["metaspace"](" X", add_special_tokens=False)["input_ids"]) == "X"
    after = {k: lone(k, "<image>\nWhat")[:3] for k in toks}
    assert after == {"legacy": ["<image>", "▁", "<0x0A>"], "metaspace": ["<image>", "<0x0A>", "W"]}


def test_llama_tokenizer_class_rebuilds_the_legacy_pipeline_as_metaspace(checkpoints):
    # transformers 5: AutoTokenizer keeps tokenizer.json (llava's hub tokenizer_class is distrusted), but the
    # LlamaTokenizer class named in tokenizer_config.json rebuilds the backend and drops the legacy normalizer
    from transformers import AutoTokenizer, LlamaTokenizer

    path = checkpoints["legacy"]
    assert AutoTokenizer.from_pretrained(path).backend_tokenizer.normalizer is not None
    rebuilt = LlamaTokenizer.from_pretrained(path).backend_tokenizer
    assert rebuilt.normalizer is None and "Metaspace" in repr(rebuilt.pre_tokenizer)


def test_ctbench_layout_keys_images_and_determinism(tmp_path):
    root = rf.make_ctbench(tmp_path / "a", tasks=("numglue", "art", "fomc", "OCR"), n_train=6, n_test=3)
    modes = set()
    for split, n in (("reasoning_train", 6), ("reasoning_test", 3)):
        for task in ("numglue", "art", "fomc", "OCR"):
            records = json.loads((root / split / f"{task}.json").read_text())
            assert len(records) == n
            for rec in records:
                assert set(rec) == (
                    {"question_id", "problem", "solution"} | ({"image"} if task in ("art", "OCR") else set())
                )
                assert "\nprompt:\n" in rec["problem"]
                assert rec["solution"].startswith("<think>") and rec["solution"].endswith("</answer>")
                if "image" in rec:
                    with Image.open(root / "images" / rec["image"]) as im:
                        im.load()
                        modes.add((im.format, im.mode))
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "RGB")} <= modes
    art = json.loads((root / "reasoning_train" / "art.json").read_text())[0]
    assert art["image"].startswith("art_vqa_datasets/AQUA/train/train_author_images/")
    conv = json.loads((root / "llava_train" / "art.json").read_text())[0]
    assert conv["conversations"][0]["value"] == "<image>\n" + art["problem"]
    assert (root / "llava_eval" / "fomc.jsonl").read_text().count("\n") == 3

    again = rf.make_ctbench(tmp_path / "b", tasks=("numglue", "art", "fomc", "OCR"))
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*")) == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
    )
    assert all(p.read_bytes() == (again / p.relative_to(root)).read_bytes() for p in root.rglob("*") if p.is_file())
    think = rf.make_ctbench(tmp_path / "c", tasks=("numglue",), solution_format="think")
    sol = json.loads((think / "reasoning_test" / "numglue.json").read_text())[0]["solution"]
    assert sol.startswith("<think> ") and " </think> " in sol and "<answer>" not in sol


def test_truncated_jpeg_verifies_but_does_not_decode_and_removed_image_is_gone(tmp_path):
    root = rf.make_ctbench(tmp_path, tasks=("art",))
    path = rf.truncate_image(root, "art", 0)
    with Image.open(path) as im:
        im.verify()
    with pytest.raises(OSError), Image.open(path) as im:
        im.load()
    with pytest.raises(ValueError):
        rf.truncate_image(root, "art", 1)  # record 1 is a PNG
    assert not rf.remove_image(root, "art", 2).exists()
