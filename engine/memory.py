"""What a run holds on each GPU, counted before any weight is read, so that a run that cannot fit is refused
before it loads 14 GB of weights and trains a task for hours (`python train_stream.py ... --dry-run`).

The model is built on the meta device (shapes, no memory) with the run's adapters and trainable parts; its
parameters and buffers are counted exactly. Activations are estimated per token of a Llama decoder layer in
bf16 with fused attention, from the tensors autograd keeps (measured on CPU for this code: about 24.5 h + 8 i
bytes per token for hidden size h and MLP width i; tests/test_scale.py checks it against a measurement),
plus each PASs layer's z (2 E r bytes) and pi (4 E bytes) per token and the bf16 copies of its adapters
that autocast makes. With gradient checkpointing a layer keeps only its input (2 h bytes per token) and one
layer's activations exist at a time. The peak is the largest of training, evaluation (the optimizer's
state is freed after each task; generation adds its KV cache; DDP's gradient buckets stay) and setup
(every rank holds the whole model before FSDP2 shards it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

GIB = 2**30
ALLOCATOR_MARGIN = 0.92  # of a GPU's memory the plan may fill: CUDA context, fragmentation, workspaces


@dataclass
class Setting:
    """What the plan depends on besides the model."""

    world: int  # GPUs (processes)
    shard: bool  # FSDP2: decoder layers and LM head sharded over the GPUs; else DDP, whole on each
    micro_batch: int  # sequences per forward on one GPU
    max_length: int  # tokens per training sequence
    checkpointing: bool  # gradient checkpointing
    eval_batch: int  # sequences per generation batch
    eval_length: int  # the longest prompt plus --max-new-tokens
    state_copies: float  # adapter-sized fp32 tensors the method keeps (EWC: Fisher and anchors, 2)


def _is_sharded(name: str) -> bool:
    """What llava_wrap.shard_llava shards: the language model's decoder layers and the LM head."""
    return name.startswith(("model.language_model.layers.", "lm_head."))


def plan(model: torch.nn.Module, text_config, s: Setting) -> dict[str, float]:
    """Bytes per GPU, by what holds them (name -> GiB); model: built on the meta device, trainable parts marked."""
    split = lambda name: s.world if s.shard and _is_sharded(name) else 1  # noqa: E731
    frozen = sum(p.numel() * p.element_size() / split(n) for n, p in model.named_parameters() if not p.requires_grad)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    master = sum(4 * p.numel() / split(n) for n, p in trained)  # fp32 weights; gradients as many; AdamW twice
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # anchors, importance: whole on each GPU
    largest = max((p.numel() for _, p in trained), default=0)
    h, L = text_config.hidden_size, text_config.num_hidden_layers
    activations, logits = _activations(model, text_config, s)
    gathered = 2 * 2 * max((sum(p.numel() for p in layer.parameters()) for layer in _units(model)), default=0)
    train = {
        "frozen weights": frozen,
        "trained weights (fp32)": master,
        "their gradients (fp32)": master,
        "AdamW moments (fp32)": 2 * master,
        "buffers (anchors, importance)": buffers,
        "method state (Fisher, anchors, teacher)": s.state_copies * master + (3 * 4 * largest if s.state_copies else 0),
        "activations": activations,
        "logits": logits,
        "FSDP2 gathered layers (bf16, 2 at a time)": gathered if s.shard else 0,
    }
    kv_cache = 2 * L * s.eval_batch * s.eval_length * h * 2
    buckets = master if s.world > 1 and not s.shard else 0  # DDP's gradient buckets stay allocated
    evaluation = {
        k: train[k]
        for k in (
            "frozen weights",
            "trained weights (fp32)",
            "buffers (anchors, importance)",
            "method state (Fisher, anchors, teacher)",
        )
    }
    evaluation |= {
        "DDP's gradient buckets": buckets,
        "KV cache of generation": kv_cache,
        "FSDP2 gathered layers (bf16, 2 at a time)": train["FSDP2 gathered layers (bf16, 2 at a time)"],
    }
    rows = {k: v / GIB for k, v in train.items() if v}
    rows["peak of training"] = sum(train.values()) / GIB
    rows["KV cache of generation"] = kv_cache / GIB
    rows["peak of evaluation"] = sum(evaluation.values()) / GIB
    # before sharding, every rank holds the whole model as the method prepared it (seqft: its LM in fp32)
    rows["peak of setup (before sharding)"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    rows["peak"] = max(rows["peak of training"], rows["peak of evaluation"], rows["peak of setup (before sharding)"])
    return rows


def _activations(model: torch.nn.Module, text_config, s: Setting) -> tuple[float, float]:
    """Bytes of the activations autograd keeps in one micro-batch's forward, and of its logits."""
    h, i, L = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    heads, vocab = text_config.num_attention_heads, text_config.vocab_size
    pas = [m for m in model.modules() if hasattr(m, "lora_A")]
    adapter_token = sum(2 * m.lora_A.shape[0] * m.lora_A.shape[1] + 4 * m.lora_A.shape[0] for m in pas) / max(1, L)
    adapter_copies = sum(2 * (m.lora_A.numel() + m.lora_B.numel()) for m in pas) / max(1, L)  # autocast's bf16 A, B
    tokens = s.micro_batch * s.max_length
    layer_acts = tokens * (24.5 * h + 8 * i + 5 * heads + adapter_token) + adapter_copies
    activations = (L * tokens * 2 * h + layer_acts) if s.checkpointing else L * layer_acts
    return activations, tokens * vocab * (2 + 4 + 4)  # bf16 logits; the answers' fp32 cast and its softmax (bound)


def advice(model: torch.nn.Module, text_config, s: Setting, capacity: float, shardable: bool) -> str:
    """Whether the run fits GPUs of `capacity` bytes, and if not, the first change of flags that makes it fit."""
    usable = ALLOCATOR_MARGIN * capacity / GIB
    need = plan(model, text_config, s)["peak"]
    if need <= usable:
        return ""
    tries = []
    if not s.checkpointing:
        tries.append(("--gradient-checkpointing", dataclasses.replace(s, checkpointing=True)))
    for m in (s.micro_batch // 2, 1) if s.micro_batch > 1 else ():
        tries.append(
            (
                f"--micro-batch-size {m} --gradient-checkpointing",
                dataclasses.replace(s, micro_batch=m, checkpointing=True),
            )
        )
    for b in (s.eval_batch // 4, 1) if s.eval_batch > 1 else ():
        tries.append(
            (
                f"--eval-batch-size {b} (and the above)",
                dataclasses.replace(s, micro_batch=1, checkpointing=True, eval_batch=b),
            )
        )
    if shardable and not s.shard:
        for w in sorted({max(2, s.world), 8}):
            tries.append(
                (
                    f"--shard on {w} GPUs, --micro-batch-size 1 --gradient-checkpointing",
                    dataclasses.replace(s, shard=True, world=w, micro_batch=1, checkpointing=True, eval_batch=1),
                )
            )
    for flags, other in tries:
        if (found := plan(model, text_config, other)["peak"]) <= usable:
            return (
                f"needs {need:.1f} GiB per GPU, {usable:.1f} usable of {capacity / GIB:.1f}; {flags}: {found:.1f} GiB"
            )
    return (
        f"needs {need:.1f} GiB per GPU, {usable:.1f} usable of {capacity / GIB:.1f}; no setting tried fits: larger GPUs"
    )


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (FSDP2's units) of a Llama language model."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1].isdigit() and ".layers" in name]


def checkpoint_bytes(model: torch.nn.Module, state_copies: float) -> float:
    """One task checkpoint: the trained parameters in fp32, the importance statistics, and `state_copies`
    adapter-sized tensors of the method's own (EWC, MAS: 2; anchors are not stored: they equal the adapters
    when a task ends)."""
    trained = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(b.numel() * 4 for n, b in model.named_buffers() if "importance" in n)
    return trained * (1 + state_copies) + stats
