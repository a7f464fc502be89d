"""CPU-sized training settings: only the top layers train, and the new heads get their own rate."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.reward import RewardModel
from rlhf.train import PolicyWithValue, optimizer_for, train_only_top_layers, trainable


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


def test_only_the_top_layers_and_the_head_train() -> None:
    policy = PolicyWithValue(tiny_lm())
    train_only_top_layers(policy.lm.model, 1)
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("lm.model.layers.2.", "lm.model.norm.", "value_head.")) for n in names)
    assert not policy.lm.model.embed_tokens.weight.requires_grad  # tied to the LM head: frozen with it
    optimizer = optimizer_for(policy, policy.value_head, lr=1e-5, head_lr=1e-3)
    body, head = optimizer.param_groups
    assert body["lr"] == 1e-5 and head["lr"] == 1e-3
    assert len(body["params"]) + len(head["params"]) == len(trainable(policy))
    # One step moves the top layer and the head, never a frozen weight.
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.randint(0, 64, (2, 5))
    logits, values = policy(ids, torch.ones_like(ids))
    (logits.mean() + values.mean()).backward()
    optimizer.step()
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= names


def test_zero_layers_trains_everything_and_head_lr_zero_means_same_rate() -> None:
    rm = RewardModel.from_causal_lm(tiny_lm())
    train_only_top_layers(rm.body, 0)
    assert all(p.requires_grad for p in rm.parameters())
    optimizer = optimizer_for(rm, rm.head, lr=2e-5, head_lr=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-5, 2e-5]
