"""partition(): the units of each supported architecture, at each granularity."""
import pytest
import torch
from torch import nn

from dynatune.errors import DynatuneError
from dynatune.units import partition

from scripted import plan, tuner
from tiny import causal_lm, classifier

BLOCKS = ["block.0", "block.1", "block.2", "block.3"]


def assert_exact_cover(model, units):
    """Every parameter (tied ones once) belongs to exactly one unit."""
    listed = [p for u in units for p in u.param_names]
    assert len(listed) == len(set(listed)), "a parameter is in two units"
    assert set(listed) == {n for n, _ in model.named_parameters()}


def names(units):
    return [u.name for u in units]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_every_parameter_in_exactly_one_unit_causal_lm(arch, granularity):
    model = causal_lm(arch)
    assert_exact_cover(model, partition(model, granularity))


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_every_parameter_in_exactly_one_unit_bert(granularity):
    model = classifier("bert")
    assert_exact_cover(model, partition(model, granularity))


def test_llama_tied_embedding_is_one_unit_and_no_separate_head():
    model = causal_lm("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    units = partition(model)
    assert names(units) == ["embedding", *BLOCKS, "norm"]
    assert units.tied_embedding and units.blocks_path == "model.layers" and units.n_blocks == 4
    assert units["embedding"].param_names == ("model.embed_tokens.weight",)
    assert units["embedding"].kind == "embedding" and units["embedding"].depth == -1
    assert units["norm"].param_names == ("model.norm.weight",) and units["norm"].depth == 4
    for i in range(4):
        u = units[f"block.{i}"]
        assert u.kind == "block" and u.depth == i
        assert set(u.param_names) == {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}
    assert units.fresh_heads == []


def test_qwen2_untied_lm_head_is_a_head_unit_not_fresh():
    model = causal_lm("qwen2")
    units = partition(model)
    assert names(units) == ["embedding", *BLOCKS, "norm", "head"]
    assert not units.tied_embedding
    assert units["head"].param_names == ("lm_head.weight",)
    assert units["head"].kind == "head" and not units["head"].fresh  # a pretrained LM head is not fresh
    # qwen2 attention has biases: they belong to their block
    assert "model.layers.2.self_attn.q_proj.bias" in units["block.2"].param_names


def test_gpt2():
    model = causal_lm("gpt2")
    units = partition(model)
    assert units.blocks_path == "transformer.h" and units.tied_embedding
    assert names(units) == ["embedding", *BLOCKS, "norm"]
    assert set(units["embedding"].param_names) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(units["norm"].param_names) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_bert_classifier_pooler_and_fresh_head():
    model = classifier("bert")
    units = partition(model)
    assert units.blocks_path == "bert.encoder.layer"
    assert names(units) == ["embedding", *BLOCKS, "pooler", "head"]
    assert set(units["pooler"].param_names) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    head = units["head"]
    assert set(head.param_names) == {"classifier.weight", "classifier.bias"}
    assert head.fresh and units.fresh_heads == [head]
    assert "bert.embeddings.LayerNorm.weight" in units["embedding"].param_names


def test_module_granularity_lists_each_linear():
    for model in (causal_lm("llama"), classifier("bert")):
        units = partition(model, "module")
        blocks_path = units.blocks_path
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.startswith(blocks_path + ".")}
        assert len(linears) == 4 * (7 if blocks_path == "model.layers" else 6)
        for full, mod in linears.items():
            u = units["block." + full[len(blocks_path) + 1:]]
            assert u.kind == "module"
            assert u.depth == int(full[len(blocks_path) + 1:].split(".")[0])
            assert set(u.param_names) == {f"{full}.{n}" for n, _ in mod.named_parameters()}
        # the blocks' norms are modules too; nothing else is inside the blocks
        inside = [u for u in units if 0 <= u.depth < 4]
        assert all(u.kind == "module" for u in inside)
        assert {u.name for u in units.in_block(1)} >= {"block." + n[len(blocks_path) + 1:] for n in linears
                                                       if n.startswith(blocks_path + ".1.")}


def _adapter_units_match(model, units, blocks_path):
    adapted = list(dict.fromkeys(n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n))
    assert names(units.of_kind("adapter")) == ["block." + a[len(blocks_path) + 1:] for a in adapted]
    for u in units.of_kind("adapter"):
        assert len(u.param_names) == 2
        assert all(".lora_A." in p or ".lora_B." in p for p in u.param_names)
        assert u.depth == int(u.name.split(".")[1])
    # base weights are not units at adapter granularity
    assert not any(".base_layer." in p for u in units for p in u.param_names)


def test_peft_get_peft_model_lora_adapter_granularity():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    units = partition(model, "adapter")
    assert units.blocks_path == "base_model.model.model.layers" and units.n_blocks == 4
    assert len(units.of_kind("adapter")) == 4 * 3
    _adapter_units_match(model, units, units.blocks_path)
    assert names(units)[:3] == ["block.0.self_attn.q_proj", "block.0.self_attn.v_proj", "block.0.mlp.down_proj"]
    assert [u for u in units if u.kind != "adapter"] == []  # tied LM head: nothing else trains
    # the same wrapped model at block granularity covers every parameter once, adapters inside blocks
    blocks = partition(model, "block")
    assert_exact_cover(model, blocks)
    assert any(".lora_A." in p for p in blocks["block.3"].param_names)


def test_peft_inject_adapter_in_model_bert_keeps_fresh_head():
    from peft import LoraConfig, inject_adapter_in_model
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"]), classifier("bert"))
    units = partition(model, "adapter")
    assert units.blocks_path == "bert.encoder.layer"
    _adapter_units_match(model, units, units.blocks_path)
    assert names(units)[:2] == ["block.0.attention.self.query", "block.0.attention.self.value"]
    assert units["head"].fresh and set(units["head"].param_names) == {"classifier.weight", "classifier.bias"}
    assert [u.kind for u in units].count("adapter") == 8 and len(units) == 9


def test_peft_seq_cls_head_is_the_trainable_copy_only():
    """get_peft_model(task_type=SEQ_CLS) wraps the classifier in modules_to_save: only the copy that runs
    (and trains) is the head unit at adapter granularity; the frozen original is no unit's."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(classifier("bert"), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    units = partition(model, "adapter")
    head = units["head"]
    assert head.fresh
    assert set(head.param_names) == {"base_model.model.classifier.modules_to_save.default.weight",
                                     "base_model.model.classifier.modules_to_save.default.bias"}
    _adapter_units_match(model, units, units.blocks_path)
    assert_exact_cover(model, partition(model, "block"))  # at block granularity everything has a unit


def test_adapter_granularity_without_adapters_says_so():
    with pytest.raises(DynatuneError, match="peft"):
        partition(causal_lm("llama"), "adapter")


def test_unknown_granularity():
    with pytest.raises(DynatuneError, match="granularity"):
        partition(causal_lm("llama"), "neurons-please")


class OddNet(nn.Module):
    """Blocks under an attribute no architecture uses."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.trunk = nn.Module()
        self.trunk.stages = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.out = nn.Linear(8, 11)

    def forward(self, ids):
        h = self.tok(ids)
        for s in self.trunk.stages:
            h = s(h)
        return self.out(h)


def test_unknown_architecture_names_layers_option():
    for model in (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), OddNet()):
        with pytest.raises(DynatuneError, match=r"layers="):
            partition(model)
    with pytest.raises(DynatuneError, match=r"layers="):
        tuner(OddNet(), plan("block.0"))


def test_layers_option_works_for_unknown_architecture():
    model = OddNet()
    units = partition(model, layers="trunk.stages")
    assert units.n_blocks == 3 and units.blocks_path == "trunk.stages"
    assert names(units.blocks) == ["block.0", "block.1", "block.2"]
    assert set(units["block.1"].param_names) == {"trunk.stages.1.0.weight", "trunk.stages.1.0.bias"}
    assert units["embedding"].param_names == ("tok.weight",)
    assert_exact_cover(model, units)
    # and it trains through the engine
    t = tuner(model, plan("block.1"), layers="trunk.stages")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t.begin_step()
    model(torch.tensor([[1, 2, 3]])).pow(2).sum().backward()
    t.after_backward()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.end_step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not n.startswith("trunk.stages.1.")), n


def test_bad_layers_path_is_a_clear_error():
    with pytest.raises(DynatuneError, match="layers='trunk'"):
        partition(OddNet(), layers="trunk")
    with pytest.raises(DynatuneError, match="layers='nowhere.at.all'"):
        partition(OddNet(), layers="nowhere.at.all")


def test_unknown_unit_name_lists_units():
    units = partition(causal_lm("llama"))
    with pytest.raises(DynatuneError, match="block.0"):
        units["block.9"]
    with pytest.raises(DynatuneError, match="unknown unit"):
        plan("block.9").validate(units)
