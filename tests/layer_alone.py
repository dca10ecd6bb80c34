"""Checks of pasmoe.py on its own. test_copy_pasmoe.py copies this file and pasmoe.py, and
nothing else, into an empty directory and runs it there with pytest: what someone who copies
the layer into their project gets. Each test names the planted bug it catches."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pasmoe import PASsConfig, PASsMoELinear, end_task, inject, pas_layers, stabilization_loss, track_importance


def test_nothing_else_of_the_project_is_importable():
    for name in ("llava_wrap", "train_stream", "baselines", "data", "evaluate"):
        assert importlib.util.find_spec(name) is None, name


def test_readme_snippet_runs(capsys):
    readme = Path(__file__).with_name("README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme.split("## Use the layer", 1)[1], re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([6, 8])"


def toy_model():
    return nn.ModuleDict(
        {"embed": nn.Embedding(10, 8), "norm": nn.LayerNorm(8), "q_proj": nn.Linear(8, 8), "head": nn.Linear(8, 10)}
    )


def test_inject_freezes_all_but_the_adapters():
    # planted bug: only the wrapped bases frozen (embeddings, norms and head then train)
    model = toy_model()
    inject(model, PASsConfig(num_experts=2, rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B"}
    model = toy_model()
    inject(model, PASsConfig(num_experts=2, rank=2), freeze_others=False)
    assert {"embed.weight", "norm.weight", "head.weight"} <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert not model["q_proj"].base.weight.requires_grad


def test_to_bf16_keeps_statistics_and_adapters_fp32():
    # planted bugs: importance sums, I_agg or the adapters cast to bf16 by model.to(bf16)
    model = toy_model()
    inject(model, PASsConfig(num_experts=2, rank=3))
    layer = model["q_proj"]
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(7, 8))
    end_task(layer)
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, 8))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    model.to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16 and model["head"].weight.dtype == torch.bfloat16
    for name in ("task_importance_sum", "importance_agg", "anchor_A", "anchor_B", "lora_A", "lora_B"):
        t = getattr(layer, name)
        assert t.dtype == torch.float32, name
        assert torch.equal(t, before[name]), name  # moved, not rounded through bf16
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # adapter_dtype=None: the adapters and anchors follow the base, the statistics stay fp32
    follow = PASsMoELinear(nn.Linear(8, 8), PASsConfig(num_experts=2, rank=3, adapter_dtype=None)).to(torch.bfloat16)
    assert follow.lora_A.dtype == follow.anchor_A.dtype == torch.bfloat16
    assert follow.importance_agg.dtype == torch.float32


def test_reset_parameters_initialises_a_layer_built_on_meta():
    # planted bug: no reset_parameters, so to_empty() leaves lora_A and the anchors as garbage
    cfg = PASsConfig(num_experts=3, rank=4)
    with torch.device("meta"):
        layer = PASsMoELinear(nn.Linear(16, 8), cfg)
    layer.to_empty(device="cpu")
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on fan_in 16
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])  # one LoRA A per expert, not copies
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.anchor_A, layer.lora_A) and torch.equal(layer.anchor_B, layer.lora_B)
    assert layer.task_tokens.item() == 0 and not layer.importance_agg.any() and not layer.task_importance_sum.any()
    x = torch.randn(2, 16)
    assert torch.allclose(layer(x), layer.base(x))  # B = 0: the layer starts equal to its base


def test_reads_like_the_linear_it_wraps():
    # planted bug: no weight/bias/in_features/out_features (AttributeError in code that inspects)
    base = nn.Linear(6, 4)
    layer = PASsMoELinear(base, PASsConfig(num_experts=2, rank=2))
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (6, 4)
    with pytest.raises((AttributeError, KeyError)):  # read-only
        layer.weight = nn.Parameter(torch.zeros(4, 6))


def test_inject_refuses_multihead_attention_out_proj():
    # planted bug: out_proj wrapped although MultiheadAttention reads its weight directly
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject(model, PASsConfig(), target=r"out_proj$")


def test_inject_keeps_the_modules_asked_for_trainable():
    # planted bug: keep_trainable ignored, so a new task head freezes with the rest (PEFT's modules_to_save)
    model = toy_model()
    inject(model, PASsConfig(num_experts=2, rank=2), keep_trainable=r"^head$")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "head.weight", "head.bias"}


def test_inject_names_a_matching_module_that_is_not_a_linear():
    # planted bug: a module of another class (GPT-2's Conv1D) silently skipped, or "no nn.Linear matches"
    class Conv1D(nn.Module):  # transformers' Conv1D: a Linear with its weight transposed
        def __init__(self, nf, nx):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

    model = nn.ModuleDict({"c_attn": Conv1D(12, 4), "mlp": nn.ModuleDict({"c_fc": Conv1D(8, 4)})})
    with pytest.raises(ValueError, match=r"c_attn matches but is a Conv1D"):
        inject(model, PASsConfig(num_experts=2, rank=2), target=r"(c_attn|c_fc)$")


def test_track_importance_nests():
    # planted bug: leaving an inner context clears the outer one's mask
    layer = PASsMoELinear(nn.Linear(6, 4), PASsConfig(num_experts=2, rank=2))
    x = torch.randn(2, 3, 6)
    outer = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad(), track_importance(layer, token_mask=outer):
        with track_importance(layer):  # every token
            layer(x)
        assert layer.task_tokens.item() == 6
        layer(x)  # the outer mask again: 3 tokens
    assert layer.task_tokens.item() == 9
    layer(x)  # outside: nothing counted
    assert layer.task_tokens.item() == 9


def test_shared_linear_gets_one_layer_under_every_name():
    # planted bug: a module shared under two names wrapped under one of them only
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"q_proj": shared, "k_proj": shared})
    with pytest.warns(UserWarning, match="shared"):
        names = inject(model, PASsConfig(num_experts=2, rank=2))
    assert sorted(names) == ["k_proj", "q_proj"]
    assert isinstance(model["q_proj"], PASsMoELinear) and model["q_proj"] is model["k_proj"]
    assert len(pas_layers(model)) == 1


def test_stabilization_loss_is_skipped_before_the_first_task():
    # planted bug: the adapter-sized drift computed in task 1, where every weight is 0
    model = toy_model()
    inject(model, PASsConfig(num_experts=2, rank=2))
    loss = stabilization_loss(model)
    assert loss.item() == 0 and not loss.requires_grad
