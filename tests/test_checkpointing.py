"""Gradient checkpointing of patched models: the same loss and gradients as without it.

Checkpointing reruns each layer's forward in backward. Two things must survive the rerun: the
dropout masks (the fused ops draw theirs from a seed tensor taken from torch's generator, whose
state checkpoint restores before the rerun), and, in a multimodal model, the modality tensors
(read from the forward's ampfuse.context.ForwardContext, which the rerun re-enters).
"""

import copy

import pytest
import torch

import ampfuse
from ampfuse.patch import adapters
from ampfuse.testing import tiny_bert


def train_step(model, batch, backend, checkpointing, reentrant, seed=123):
    """One training forward and backward of a copy of ``model``: (loss, {name: grad} of every
    trainable parameter, number of adapter forwards). The same seed gives the same dropout masks
    with or without checkpointing."""
    model = copy.deepcopy(model).train()
    encoder = model.encoder if isinstance(model, ampfuse.MultimodalModel) else model
    if checkpointing:
        kwargs = {"use_reentrant": reentrant}
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5
            encoder.activation_checkpointing_enable(kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        # Reentrant checkpointing only backpropagates into a layer whose input requires grad; the
        # frozen layers below the adapters give none, so the input embeddings must (as with PEFT).
        encoder.enable_input_require_grads()
    calls = []  # adapter forwards; fusion layers run from a layer's forward hook, which transformers 5 keeps
    for module in model.modules():  # outside the checkpointed function
        if isinstance(module, (ampfuse.BottleneckAdapter, ampfuse.GMUAdapter)):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(seed)
    with ampfuse.use_backend(backend):
        out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.square().mean()
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


def assert_identical(plain, checkpointed):
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = plain, checkpointed
    assert calls_ckpt == 2 * calls > 0  # every adapted layer really ran twice
    assert torch.equal(loss_ckpt, loss), (loss_ckpt.item(), loss.item())
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grads_ckpt[name], grad), (name, (grads_ckpt[name] - grad).abs().max().item())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_minilm_with_adapter_dropout(minilm, text_batch, backend, reentrant):
    model = ampfuse.patch(minilm, ampfuse.AdapterConfig.pfeiffer(dropout=0.2, layers=[-2, -1], scaling="learned"))
    assert len(adapters(model)) == 2
    plain = train_step(model, text_batch, backend, checkpointing=False, reentrant=reentrant)
    assert_identical(plain, train_step(model, text_batch, backend, checkpointing=True, reentrant=reentrant))
    # the dropout masks matter: another seed gives another loss, so equal losses above are not vacuous
    assert not torch.equal(train_step(model, text_batch, "torch", False, reentrant, seed=7)[0], plain[0])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multimodal_gmu_adapters_and_fusion_layer(text_batch, backend, reentrant):
    sizes = {"audio": 6, "visual": 5}
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig(
        sizes, gmu_layers=[2, 3], bottleneck_size=8, zero_init_up=False, fusion_layers=[2], fusion_dropout=0.2,
        task="classification", num_labels=3))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"],
             "labels": torch.tensor([0, 2]), **{n: torch.randn(2, 11, s, generator=g) for n, s in sizes.items()}}
    plain = train_step(mm, batch, backend, checkpointing=False, reentrant=reentrant)
    assert_identical(plain, train_step(mm, batch, backend, checkpointing=True, reentrant=reentrant))
    assert any(".gmu_weight" in n or "stream_down" in n for n in plain[1]) and any("fusion." in n for n in plain[1])
