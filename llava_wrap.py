"""PASs layers inside LLaVA-1.5 (transformers `LlavaForConditionalGeneration`).

    add_adapters(model, cfg)        PASs layers on q,k,v,o,gate,up,down of every decoder layer
                                    of the language model (the paper's protocol), rest frozen
    load_llava(name_or_path)        the real llava-hf/llava-1.5-7b-hf (local dir or the hub)
    embed / forward(bundle, batch)  the language model's input embeddings (image features in the
                                    <image> positions) and its logits, for a data.Collator batch
    generate(bundle, batch)         batched greedy decoding, left padding
    passes, mixture_weights         what methods and analyses compute besides training: features,
                                    per-example forwards, the gates of every PASs layer
    save_adapters / load_adapters   only what the method trains and tracks, in safetensors

The tiny LLaVA of the sanity stream (toy/tiny_llava.py) has the module layout of llava-1.5-7b-hf,
so the same injection pattern, adapter files and training code run on both. Token masks: data.Collator expands <image>
itself, so a batch's attention mask lines up with the language model's hidden states and
is what `pasmoe.track_importance` receives.

The model is fed input embeddings that `embed` builds as LlavaModel.forward does from pixels,
so that the frozen vision tower's features can be computed once per image and kept
(`LlavaBundle.feature_cache`): the tower never trains, so they never change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data
from engine.processes import full, is_main, shard
from engine.runs import atomic_write
from pasmoe import PASsConfig, PASsMoELinear, inject, pas_layers

# The paper puts adapters on every linear layer of the language model and nowhere else.
# Anchored on language_model: CLIP's attention in the vision tower also has q/k/v_proj.
TARGET = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
PER_DECODER_LAYER = 7
PROJECTOR = "model.multi_modal_projector"


class ModelError(ValueError):
    """A checkpoint that cannot be used as given: says which and what to do."""


@dataclass
class LlavaBundle:
    """A model with what it takes to feed it."""

    model: nn.Module
    tokenizer: object  # Hugging Face tokenizer with <image>, pad, bos, eos
    num_image_tokens: int  # positions one image fills in the sequence
    load_image: Callable  # image field (tensor in [0, 1], or a file path) -> pixel tensor (3, H, W)
    name: str  # where the base came from: "tiny-<hash>" or a checkpoint name/path
    info: dict = field(default_factory=dict)  # e.g. the tiny base's pretraining report
    feature_cache: dict | None = None  # data.Example -> its image's vision features; None: computed each time
    input_hook: Callable | None = None  # (batch, embeds, mask) -> (embeds, mask): a method's change to the input (L2P)


# ---- adapters ----


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def add_adapters(
    model: nn.Module, cfg: PASsConfig, layer_class=PASsMoELinear, train_projector: bool = False, verbose: bool = True
) -> list[str]:
    """Put PASs layers (`layer_class`: pasmoe's or a baseline's variant) on the language model's linear
    layers (inject freezes everything else; the adapters keep cfg.adapter_dtype, fp32 by default, under a
    bf16 base), report counts."""
    names = inject(model, cfg, target=TARGET, layer_class=layer_class)
    n_layers = model.config.text_config.num_hidden_layers
    if len(names) != PER_DECODER_LAYER * n_layers:
        raise RuntimeError(
            f"wrapped {len(names)} linear layers, expected {PER_DECODER_LAYER} x {n_layers} "
            f"decoder layers: is this a LLaVA-1.5 (Llama) language model?"
        )
    if train_projector:
        model.get_submodule(PROJECTOR).requires_grad_(True)
    if verbose:
        trainable, total = count_parameters(model)
        print(
            f"PASs layers: {len(names)} ({PER_DECODER_LAYER} per decoder layer x {n_layers}), {cfg.num_experts} "
            f"experts of rank {cfg.rank}, scaling alpha / r = {cfg.alpha:g} / {cfg.rank} = {cfg.alpha / cfg.rank:g}; "
            f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"
        )
    return names


# ---- the real model ----


def image_positions(config) -> int:
    """Positions one image fills in the sequence, from the checkpoint's own configuration: the
    vision tower's patches, plus its CLS token unless the feature-select strategy "default"
    drops it (LLaVA-1.5-7B: (336 / 14)^2 = 576). Not config.image_seq_length: llava-hf's
    config.json does not set it, and transformers' default (576) fits the 7B only."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


def load_llava(name_or_path: str = "llava-hf/llava-1.5-7b-hf", dtype=torch.bfloat16, device=None) -> LlavaBundle:
    """LLaVA-1.5 from a local directory (llava-hf's layout) or the hub: about 14 GB of weights in bf16.
    On the meta device only its config.json and processor are read (shapes, no memory: the memory plan)."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # transformers' bars (loading 14 GB takes minutes) on a terminal only
        hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        if torch.device(device or "cpu").type == "meta":
            with torch.device("meta"):
                model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(name_or_path)).to(dtype)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
    except OSError as err:  # no such folder, no network for a hub name, missing files
        raise ModelError(
            f"--model {name_or_path}: cannot load it ({str(err).splitlines()[0]}); give a local folder "
            "in llava-hf's layout, or a hub name with a network"
        ) from err
    num_image_tokens = image_positions(model.config)
    expanded = data.processor_image_tokens(processor)
    if expanded != num_image_tokens:
        raise ModelError(
            f"{name_or_path}: its processor expands <image> into {expanded} positions, but its vision "
            f"tower gives {num_image_tokens} features per image (image_size / patch_size and "
            f"vision_feature_select_strategy in config.json): the two files do not belong together"
        )
    if device is not None:
        model.to(device)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    model.generation_config.pad_token_id = tok.pad_token_id

    def load_image(image):
        if torch.is_tensor(image):  # sanity-stream tensors in [0, 1]
            image = image.clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        else:
            from PIL import Image

            with Image.open(image) as im:
                image = im.convert("RGB")
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    return LlavaBundle(model, tok, num_image_tokens, load_image, name=str(name_or_path))


def llava_15_7b_config():
    """The configuration in llava-hf/llava-1.5-7b-hf's config.json (CLIP-L/14-336 and a Llama-2-7B)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=32001,
    )


# ---- feeding the model ----


FEATURE_CACHE_GIB = 2.0  # the most memory that kept vision features may take


def cache_vision_features(bundle: LlavaBundle, examples: list) -> str:
    """Keep each image's vision features once computed (bundle.feature_cache) when the vision
    tower is frozen and the features of all these examples' images fit in FEATURE_CACHE_GIB;
    returns a line that says which. (LLaVA-1.5-7B on MLLM-CTBench: 576 x 1024 bf16 values, 1.1
    MiB an image, some 60 GiB for the benchmark: not kept.)"""
    tower = bundle.model.model.vision_tower
    images = {ex for ex in examples if ex.image is not None}  # examples hash by identity
    size = len(images) * bundle.num_image_tokens * tower.config.hidden_size * bundle.model.dtype.itemsize
    if any(p.requires_grad for p in tower.parameters()):
        bundle.feature_cache = None
        return "vision features: computed at every step (the vision tower trains)"
    if size > FEATURE_CACHE_GIB * 2**30:
        bundle.feature_cache = None
        return (
            f"vision features: computed at every step (keeping all {len(images):,} would take {size / 2**30:.1f} GiB)"
        )
    bundle.feature_cache = {}
    return f"vision features: computed once per image and kept ({len(images):,} images, {size / 2**20:.1f} MiB)"


def vision_features(bundle: LlavaBundle, examples: list) -> torch.Tensor:
    """(images, positions, d_vision): what LLaVA-1.5 feeds its projector for these examples'
    images, the hidden states of the tower's vision_feature_layer without the CLS token under the
    "default" strategy (LlavaModel.get_image_features before its projector). Taken from
    bundle.feature_cache where it holds them; the others are computed in one batch (and kept)."""
    model, config = bundle.model, bundle.model.config
    cache = bundle.feature_cache if bundle.feature_cache is not None else {}
    missing = [ex for ex in dict.fromkeys(examples) if ex not in cache]
    if missing:
        tower = model.model.vision_tower
        pixels = torch.stack([bundle.load_image(ex.image) for ex in missing])
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):
            hidden = tower(pixels.to(tower.device, model.dtype), output_hidden_states=True).hidden_states
        feats = hidden[config.vision_feature_layer]
        feats = feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats
        if bundle.feature_cache is None:  # nothing kept: these are all of them, in order
            return (
                feats if len(missing) == len(examples) else torch.stack([feats[missing.index(ex)] for ex in examples])
            )
        cache.update(zip(missing, feats))
    return torch.stack([cache[ex] for ex in examples])


def embed(bundle: LlavaBundle, batch: dict) -> torch.Tensor:
    """(b, n, d): the token embeddings of a data.Collator batch, with each image's projected
    features in its <image> positions, as LlavaModel.forward builds them from pixels."""
    model = bundle.model
    ids, images = batch["input_ids"], [ex for ex in batch["examples"] if ex.image is not None]
    embeds = model.get_input_embeddings()(ids)
    if images:
        feats = model.model.multi_modal_projector(vision_features(bundle, images))
        slots = ids == model.config.image_token_index
        if slots.sum() != feats.shape[0] * feats.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} <image> positions for {feats.shape[0]} images of {feats.shape[1]} features"
            )
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))
    elif any(p.requires_grad for p in model.model.multi_modal_projector.parameters()):  # a text-only batch: DDP
        embeds = embeds + 0.0 * sum(
            p.sum() for p in model.model.multi_modal_projector.parameters()
        )  # wants it in the graph
    return embeds


def inputs(bundle: LlavaBundle, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings, attention mask) that the language model is fed: `embed`, then the bundle's
    input_hook if a method set one (L2P prepends prompts: both grow by their length)."""
    embeds = embed(bundle, batch)
    return (
        (embeds, batch["attention_mask"])
        if bundle.input_hook is None
        else bundle.input_hook(batch, embeds, batch["attention_mask"])
    )


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the device (its `examples` stay: vision_features loads their images)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward(bundle: LlavaBundle, batch: dict, model: nn.Module | None = None) -> torch.Tensor:
    """Logits (b, n, vocab) of a data.Collator batch, at its own positions (those of an input_hook's
    prefix dropped). `model`: what to call, if not the bundle's model itself (its DDP wrapper)."""
    embeds, mask = inputs(bundle, batch)
    return (model or bundle.model)(inputs_embeds=embeds, attention_mask=mask).logits[:, -batch["input_ids"].shape[1] :]


@torch.no_grad()
def generate(bundle: LlavaBundle, batch: dict, max_new_tokens: int = 64, synced: bool = False) -> list[str]:
    """Greedy answers for a left-padded prompt batch (data.Collator.prompts). synced: every rank decodes until
    all are done (FSDP2 gathers weights in every forward, so the ranks' forwards must match)."""
    model, tok = bundle.model, bundle.tokenizer
    was_training = model.training
    model.eval()
    embeds, mask = inputs(bundle, batch)
    out = model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        synced_gpus=synced,
        suppress_tokens=[model.config.image_token_index],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model.train(was_training)  # not in a finally: after an exception the run stops anyway
    return tok.batch_decode(out, skip_special_tokens=True)  # given embeddings, generate returns the new tokens only


def passes(bundle: LlavaBundle, collate: data.Collator, device, batch_size: int, amp: Callable) -> tuple:
    """What a method may compute besides the training step: forward(examples) -> (logits, labels), for EWC
    and MAS; features(examples) -> each example's frozen {"image": the mean vision feature of its image,
    or None; "text": the mean embedding of its instruction}, for L2P, HiDe-LLaVA and DDAS, computed
    batch_size at a time (at LLaVA-7B an image's features are 29 MiB). amp(): the run's autocast."""

    def forward_(examples):
        batch = to_device(collate.train(examples), device)
        with amp():
            return forward(bundle, batch), batch["labels"]

    @torch.no_grad()
    def features(examples):
        out, table = [], bundle.model.get_input_embeddings()
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            with_image = [ex for ex in chunk if ex.image is not None]
            images = iter(vision_features(bundle, with_image).float().mean(1) if with_image else ())
            for ex in chunk:
                ids = torch.tensor(collate.tok(ex.problem, add_special_tokens=False)["input_ids"], device=device)
                out.append(
                    {"image": next(images) if ex.image is not None else None, "text": table(ids).float().mean(0)}
                )
        return out

    return forward_, features


@torch.no_grad()
def mixture_weights(bundle: LlavaBundle, batch: dict) -> dict[str, torch.Tensor]:
    """Every PASs layer's mixture weights on a batch's real tokens: {layer name: (tokens, E)} (paper Fig. 3)."""
    embeds, attention = inputs(bundle, batch)
    real = F.pad(
        batch["attention_mask"].bool(), (embeds.shape[1] - batch["attention_mask"].shape[1], 0)
    )  # a prefix is not
    gates = {}

    def keep(name, module, args, output):
        gates[name] = module.gate(args[0])[real].float().cpu()

    hooks = [layer.register_forward_hook(partial(keep, name)) for name, layer in pas_layers(bundle.model).items()]
    try:
        bundle.model(inputs_embeds=embeds, attention_mask=attention)
    finally:
        for hook in hooks:
            hook.remove()
    return gates


# ---- adapter files ----


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the method trains and tracks: the PASs layers' parameters and buffers, and every other
    parameter that trains (the projector with --train-projector; the language model under seqft;
    L2P's prompts). Not the anchors: checkpoints are written when a task has ended, where the anchors
    equal the adapters (end_task), so load_adapters restores them from the adapters (at LLaVA-7B,
    E = 6, r = 128, that is 7 GiB less per checkpoint)."""
    layers = pas_layers(model)
    state = {
        f"{name}.{key}": value
        for name, layer in layers.items()
        for key, value in layer.state_dict().items()
        if not key.startswith(("base.", "anchor_"))
    }
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    return state | {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in inside}


def _base_fingerprint(model: nn.Module) -> str:
    text = model.config.text_config
    return f"{text.model_type}-h{text.hidden_size}-l{text.num_hidden_layers}-v{text.vocab_size}"


def save_adapters(model: nn.Module, path: str | Path, meta: dict | None = None, tensors: dict | None = None) -> None:
    """Write adapters + PASs config as safetensors, atomically (temp file, then rename)."""
    layers = pas_layers(model)
    cfg = asdict(next(iter(layers.values())).cfg) if layers else None  # None: a method without adapters
    header = {
        "pas_config": json.dumps(cfg),
        "targets": json.dumps(sorted(layers)),
        "base": _base_fingerprint(model),
        "meta": json.dumps(meta or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(adapter_state(model) if tensors is None else tensors, path, header)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """A safetensors file, written whole or not at all."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_task(model: nn.Module, method_state: dict, folder: Path, t: int, key: str) -> None:
    """A finished task's checkpoint: folder/task{t}.safetensors (what trains and tracks) and, for methods with
    state of their own (EWC, MAS, HiDe-LLaVA, DDAS), method{t}.safetensors. Every rank calls it (FSDP2's
    shards are gathered); rank 0 writes."""
    trained, method_state = full(adapter_state(model)), full(method_state)
    if not is_main():
        return
    save_adapters(model, folder / f"task{t}.safetensors", {"task": key}, trained)
    if method_state:
        save_tensors(method_state, folder / f"method{t}.safetensors")


def shard_llava(model: nn.Module, bf16: bool) -> None:
    """FSDP2 over a LLaVA-1.5 (engine.processes.shard): the decoder layers and the LM head sharded; the vision
    tower, the token embeddings and the projector, which embed() calls before the language model, whole."""
    lm = model.model
    shard(
        model,
        [*lm.language_model.layers, model.lm_head],
        [lm.vision_tower, lm.language_model.embed_tokens, lm.multi_modal_projector],
        bf16,
    )


def read_adapter_header(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    return {
        "pas_config": json.loads(header["pas_config"]),
        "targets": json.loads(header["targets"]),
        "base": header["base"],
        "meta": json.loads(header["meta"]),
    }


def load_adapters(model: nn.Module, path: str | Path) -> dict:
    """Load an adapter file into a model that holds PASs layers; any mismatch is an error
    that names what differs. Returns the file's meta dict."""
    from safetensors.torch import load_file

    header = read_adapter_header(path)
    layers = pas_layers(model)
    if bool(layers) != (header["pas_config"] is not None):
        raise ValueError(
            f"{path}: the file has {'no ' if header['pas_config'] is None else ''}PASs layers and the "
            f"model has {'some' if layers else 'none'}: add_adapters with the file's config first, or not at all"
        )
    cfg = asdict(next(iter(layers.values())).cfg) if layers else {}
    diffs = [
        f"{k}: file {header['pas_config'].get(k)!r} vs model {v!r}"
        for k, v in cfg.items()
        if header["pas_config"].get(k) != v
    ]
    if sorted(layers) != header["targets"]:
        diffs.append(f"wrapped modules: file has {len(header['targets'])}, model has {len(layers)}")
    if header["base"] != _base_fingerprint(model):
        diffs.append(f"base model: file {header['base']} vs model {_base_fingerprint(model)}")
    if diffs:
        raise ValueError(f"{path} does not fit this model:\n  " + "\n  ".join(diffs))
    tensors = load_file(str(path))
    expected = adapter_state(model)
    extra = sorted(set(tensors) - set(expected))
    if extra:  # the projector was trained for the file but is frozen here
        raise ValueError(f"{path} holds tensors this model does not train: {extra[:3]}... (train_projector?)")
    with torch.no_grad():
        for key, value in expected.items():
            if key not in tensors:
                raise ValueError(f"{path} lacks {key}")
            if tensors[key].shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, model {tuple(value.shape)}")
            value.copy_(tensors[key])
        for layer in layers.values():
            if layer.cfg.stabilize:  # the anchors of the task that ended: the adapters (adapter_state)
                layer.anchor_A.copy_(layer.lora_A), layer.anchor_B.copy_(layer.lora_B)
    return header["meta"]
