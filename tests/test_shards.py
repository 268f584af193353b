import pytest
import torch
from transformers import AutoModelForCausalLM

from moeq.inventory import inventory_from_checkpoint
from moeq.shards import ShardReader, weight_slot

from support import FIXTURES, TINY_CONFIGS


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_layer_state_equals_what_transformers_loads(kind, tiny_checkpoints):
    path = tiny_checkpoints[kind]
    inventory = inventory_from_checkpoint(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    reader = ShardReader(inventory)
    for i in range(inventory.num_layers):
        state = reader.layer_state(i)
        expected = reference.model.layers[i].state_dict()
        assert set(state) == set(expected)
        for name, value in state.items():
            assert torch.equal(value, expected[name].to(value.dtype)), name


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_weight_slots_address_every_layer_tensor(kind, tiny_checkpoints):
    """Parameters and buffers alike: DeepSeek-V3's e_score_correction_bias is a buffer in transformers 5."""
    inventory = inventory_from_checkpoint(tiny_checkpoints[kind])
    reader = ShardReader(inventory)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[kind], dtype=torch.bfloat16)
    for i in range(inventory.num_layers):
        for tensor in inventory.layer_tensors(i):
            stored = reader.read(tensor)
            value = weight_slot(tensor, inventory).get(model.model.layers[i])
            assert torch.equal(value.to(stored.dtype), stored), tensor.name


def test_weight_slots_address_fused_experts():
    inventory = inventory_from_checkpoint(FIXTURES / "demo-mixtral")
    reader = ShardReader(inventory)
    layer = AutoModelForCausalLM.from_pretrained(FIXTURES / "demo-mixtral", dtype=torch.bfloat16).model.layers[1]
    for tensor in inventory.layer_tensors(1):
        assert torch.equal(weight_slot(tensor, inventory).get(layer), reader.read(tensor)), tensor.name
    w3 = inventory.by_name["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    slot = weight_slot(w3, inventory)
    assert (slot.param, slot.expert, slot.rows) == ("mlp.experts.gate_up_proj", 5, slice(256, 512))
