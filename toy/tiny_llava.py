"""The tiny LLaVA-1.5: the module layout of llava-1.5-7b-hf at a size a laptop CPU trains in seconds, with a
word-level tokenizer of the sanity stream's vocabulary, pretrained once on generic image-text data and cached.

    tiny_llava(cfg)                 built in code, randomly initialised
    pretrained_tiny(cache_dir)      after a short generic pretraining (a few minutes, once), cached

The same injection pattern, adapter files and training code run on it and on the 7B (llava_wrap.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
from engine.runs import atomic_write
from engine.steps import cosine_lr, optimizer_step
from llava_wrap import LlavaBundle, embed, generate, image_positions
from toy import sanity

# ---- the tiny LLaVA ----


@dataclass
class TinyConfig:
    vision_hidden: int = 512  # CLIP width: wide, so the frozen random tower keeps most of each 16 x 16 x 3 patch
    vision_layers: int = 2
    text_hidden: int = 128  # Llama width
    text_layers: int = 2
    text_intermediate: int = 256
    heads: int = 4
    image_size: int = sanity.SIZE  # 32 x 32 images
    patch_size: int = 16  # one patch per quadrant, where the sanity images put their objects: 4 image tokens
    pretrain_steps: int = 2500  # projector + language model trained on sanity.pretrain_mixture
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 16
    seed: int = 0


def tiny_tokenizer():
    """Word-level tokenizer over the sanity stream's vocabulary; spaces are tokens too, so
    decoding gives back the exact text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + sanity.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )  # BOS, as Llama's
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


def _tensor_image(image) -> torch.Tensor:
    """Tiny model's preprocessing: a (3, H, W) tensor in [0, 1] or an image file -> 32 x 32, centred."""
    if not torch.is_tensor(image):
        from PIL import Image

        with Image.open(image) as im:
            im = im.convert("RGB").resize((sanity.SIZE, sanity.SIZE))
            image = (
                torch.tensor(list(im.getdata()), dtype=torch.float).view(sanity.SIZE, sanity.SIZE, 3).permute(2, 0, 1)
                / 255
            )
    return (image - 0.5) / 0.5


def tiny_llava(cfg: TinyConfig = TinyConfig()) -> LlavaBundle:
    """A randomly initialised LLaVA-1.5 of the 7B's layout, small enough for CPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=n_image,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return LlavaBundle(model, tok, n_image, _tensor_image, name="tiny")


# the files that build and feed the base: the model, its tokenizer and loop; the data; the collator; the embeddings
_BUILT_FROM = tuple(
    Path(m.__file__) for m in (sys.modules[__name__], sanity, data, sys.modules[LlavaBundle.__module__])
)


def _tiny_key(cfg: TinyConfig) -> str:
    """Cache key: the tiny config, torch's version, the whole text of the files that build and feed
    the base (any edit there means one rebuild, a few minutes) and the pretraining data. A key of
    a few functions' source missed the tokenizer and the collator, and a stale base was loaded."""
    code = [f.read_text() for f in _BUILT_FROM]
    digest = hashlib.sha256(json.dumps([asdict(cfg), torch.__version__, code], sort_keys=True).encode())
    for ex in sanity.pretrain_mixture(cfg.seed):
        digest.update((ex.problem + ex.solution).encode())
        if ex.image is not None:
            digest.update(ex.image.numpy().tobytes())
    return digest.hexdigest()[:12]


def _pretrain(bundle: LlavaBundle, cfg: TinyConfig) -> dict:
    """Train the tiny model's projector and language model on the generic mixture; returns
    held-out exact match per kind."""
    mixture = list(sanity.pretrain_mixture(cfg.seed))
    held_out, train = mixture[:200], mixture[200:]
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, max_length=256)
    model = bundle.model.train()
    # The vision tower keeps its random init, as LLaVA keeps CLIP frozen: trained jointly
    # here, it collapses onto colour and position within a few hundred steps and loses the
    # shape and glyph information that a random tower still carries.
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    batches = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pretraining the tiny base (once; cached)", disable=None)
    for step in bar:
        if not batches:  # 8 batches at a time from items of similar length: less padding, same data
            pool = sorted(rng.sample(train, 8 * cfg.pretrain_batch), key=lambda ex: len(ex.problem) + len(ex.solution))
            batches = [pool[i : i + cfg.pretrain_batch] for i in range(0, len(pool), cfg.pretrain_batch)]
            rng.shuffle(batches)
        batch = collate.train(batches.pop())
        loss = model(
            inputs_embeds=embed(bundle, batch), attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
        optimizer_step(opt, params, cosine_lr(step, cfg.pretrain_steps, 50, cfg.pretrain_lr), clip_norm=1.0)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(held_out), 50):
        chunk = held_out[i : i + 50]
        preds = generate(bundle, collate.prompts(chunk), max_new_tokens=48)
        for p, ex in zip(preds, chunk):
            hits.setdefault(ex.task.removeprefix("pretrain-"), []).append(p.strip() == ex.solution)
    every = [h for kind in hits.values() for h in kind]
    return {
        "pretrain_steps": cfg.pretrain_steps,
        "final_loss": round(loss.item(), 4),
        "held_out_exact_match": round(100 * sum(every) / len(every), 2),
        "held_out": len(every),
        "per_kind": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())},
    }


def pretrained_tiny(cache_dir: str | Path = "cache", cfg: TinyConfig = TinyConfig()) -> LlavaBundle:
    """The tiny LLaVA after generic pretraining: loaded from cache_dir, or built (a few minutes,
    on one thread so that every machine of a kind builds the same weights) and cached under a
    key of its config, code and data."""
    from transformers import LlavaForConditionalGeneration

    path = Path(cache_dir) / f"tiny-llava-{_tiny_key(cfg)}"
    if (path / "model.safetensors").exists():  # no random model built first: it would be overwritten
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        return LlavaBundle(
            model,
            tiny_tokenizer(),
            image_positions(model.config),
            _tensor_image,
            name=path.name,
            info=json.loads((path / "pretrain.json").read_text()),
        )
    bundle = tiny_llava(cfg)
    bundle.name = path.name
    print(f"building the pretrained tiny base in {path} (once; cached)")
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sums in one order: the same base whatever the machine's thread count
    try:
        bundle.info = _pretrain(bundle, cfg) | {"seconds": round(time.time() - start, 1)}
    finally:
        torch.set_num_threads(threads)
    print(
        f"tiny base: held-out exact match {bundle.info['held_out_exact_match']:.1f}% "
        f"(per kind {bundle.info['per_kind']}) after {cfg.pretrain_steps} steps ({bundle.info['seconds']} s)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(folder: Path):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one small file: no bar
        bundle.model.save_pretrained(folder)
        hf_logging.enable_progress_bar()
        (folder / "pretrain.json").write_text(json.dumps(bundle.info, indent=1))

    try:
        atomic_write(path, save)  # a half-written cache never looks complete
    except OSError:  # another process finished the same build first; its copy is equal
        if not (path / "model.safetensors").exists():
            raise
        shutil.rmtree(path.with_name(f".{path.name}.{os.getpid()}.tmp"), ignore_errors=True)
    return bundle
