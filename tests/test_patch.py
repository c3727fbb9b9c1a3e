"""ampfuse.patch on real and synthetic Hugging Face BERT-family models."""

import copy
import json

import pytest
import torch
import transformers

import ampfuse
from ampfuse import testing
from ampfuse.testing import tiny_bert
from ampfuse.patch import ADAPTER, _hub_to_ampfuse, adapters


def hidden(model, batch):
    return model(**batch).last_hidden_state


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("scaling") else 0.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("preset", ["pfeiffer", "houlsby"])
def test_zero_init_patched_minilm_equals_unpatched(minilm, text_batch, backend, preset):
    expected = hidden(minilm, text_batch)
    config = getattr(ampfuse.AdapterConfig, preset)(zero_init_up=True, ln_before=True, scaling="channel")
    ampfuse.patch(minilm, config)
    with ampfuse.use_backend(backend):
        got = hidden(minilm, text_batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(adapters(minilm)) == (12 if preset == "houlsby" else 6)


def test_one_step_changes_only_adapter_parameters(minilm, text_batch):
    ampfuse.patch(minilm, ampfuse.AdapterConfig.pfeiffer(zero_init_up=True))
    before = {n: t.clone() for n, t in minilm.state_dict().items()}
    trainable = [p for p in minilm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    minilm.train()
    hidden(minilm, text_batch).square().mean().backward()
    opt.step()
    after = minilm.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(f".{ADAPTER}." in n for n in changed)
    assert any(".up.weight" in n for n in changed)  # zero-initialised, moved by the step
    assert all(p.grad is None for n, p in minilm.named_parameters() if ADAPTER not in n)


HUB_CONFIGS = {
    "seqbn": lambda adapters: adapters.SeqBnConfig(),
    "seqbn_learned_ln_before_gelu": lambda adapters: adapters.SeqBnConfig(
        scaling="learned", ln_before=True, non_linearity="gelu", reduction_factor=8, residual_before_ln=False),
    "double_seqbn": lambda adapters: adapters.DoubleSeqBnConfig(),
    "double_seqbn_channel": lambda adapters: adapters.DoubleSeqBnConfig(scaling="channel", leave_out=[0, 1]),
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_parity_with_the_adapters_library(minilm, text_batch, tmp_path, name):
    adapters = pytest.importorskip("adapters")
    hub_model = copy.deepcopy(minilm)
    adapters.init(hub_model)
    hub_model.add_adapter("task", config=HUB_CONFIGS[name](adapters))
    hub_model.train_adapter("task")
    randomize_adapters(hub_model)
    hub_model.eval()
    hub_model.save_adapter(str(tmp_path), "task")

    ampfuse.load_adapterhub(minilm, str(tmp_path))
    y_hub = hidden(hub_model, text_batch)
    y_ours = hidden(minilm, text_batch)
    assert testing.rel_err(y_ours, y_hub) < 1e-5
    torch.testing.assert_close(y_ours, y_hub, rtol=1e-5, atol=1e-5)

    dy = torch.randn(y_hub.shape, generator=torch.Generator().manual_seed(3))
    y_hub.backward(dy)
    y_ours.backward(dy)
    hub_grads = {n: p.grad for n, p in hub_model.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in minilm.named_parameters() if p.requires_grad}
    assert len(hub_grads) >= len(ours) > 0
    renamed = _hub_to_ampfuse(minilm, hub_grads, minilm._ampfuse_config.ln_before)
    assert set(renamed) == set(ours)
    for n, g in ours.items():
        assert testing.rel_err(g, renamed[n]) < 1e-4, n


def test_load_adapterhub_refuses_unsupported_options(minilm, tmp_path):
    adapters = pytest.importorskip("adapters")
    hub_model = copy.deepcopy(minilm)
    adapters.init(hub_model)
    hub_model.add_adapter("gated", config=adapters.SeqBnConfig(use_gating=True))
    hub_model.save_adapter(str(tmp_path), "gated")
    with pytest.raises(ValueError, match="use_gating"):
        ampfuse.load_adapterhub(minilm, str(tmp_path))


def test_save_load_round_trip_and_shape_check(minilm, text_batch, tmp_path):
    config = ampfuse.AdapterConfig.houlsby(scaling="learned", layers=[-2, -1])
    ampfuse.patch(minilm, config)
    randomize_adapters(minilm)
    expected = hidden(minilm, text_batch)
    ampfuse.save_adapters(minilm, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["layers"] == [-2, -1] and meta["hidden_size"] == 384
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(ADAPTER in k for k in saved)  # adapter weights only

    fresh = copy.deepcopy(minilm)
    ampfuse.unpatch(fresh)
    ampfuse.load_adapters(fresh, tmp_path)
    torch.testing.assert_close(hidden(fresh, text_batch), expected, rtol=0, atol=0)

    other = tiny_bert()
    with pytest.raises(ValueError, match="saved for a model with"):
        ampfuse.load_adapters(other, tmp_path)


def test_unpatch_restores_bitwise(minilm, text_batch):
    expected = hidden(minilm, text_batch)
    ampfuse.patch(minilm, ampfuse.AdapterConfig.houlsby())
    randomize_adapters(minilm)
    assert not torch.equal(hidden(minilm, text_batch), expected)
    ampfuse.unpatch(minilm)
    assert torch.equal(hidden(minilm, text_batch), expected)
    assert all(p.requires_grad for p in minilm.parameters())
    assert not any(ADAPTER in n for n in minilm.state_dict())


def test_lowest_adapted_layer_stops_backward(minilm, text_batch):
    """Adapters in the top half: layers below build no graph, keep no activations, get no grads."""
    inputs_require_grad = {}
    for i, layer in enumerate(minilm.encoder.layer):
        layer.register_forward_pre_hook(
            lambda m, args, i=i: inputs_require_grad.__setitem__(i, args[0].requires_grad))

    def saved_bytes(config):
        model = ampfuse.patch(copy.deepcopy(minilm), config).train()
        y, nbytes = ampfuse.saved_tensor_bytes(hidden, model, text_batch, exclude=list(model.parameters()))
        y.sum().backward()
        return model, nbytes

    _, all_layers = saved_bytes(ampfuse.AdapterConfig.pfeiffer())
    top, top_half = saved_bytes(ampfuse.AdapterConfig.pfeiffer(layers=[3, 4, 5]))
    assert [inputs_require_grad[i] for i in range(6)] == [False, False, False, False, True, True]
    assert all(p.grad is None for n, p in top.named_parameters() if ADAPTER not in n)
    assert 0 < top_half < 0.7 * all_layers
    print(f"saved for backward, MiniLM 2x11 tokens: all layers {all_layers} B, top half {top_half} B")


def test_print_trainable_parameters(minilm, capsys):
    ampfuse.patch(minilm, ampfuse.AdapterConfig.pfeiffer(bottleneck_size=8))
    line = ampfuse.print_trainable_parameters(minilm)
    trainable, total = ampfuse.trainable_parameters(minilm)
    assert trainable == 6 * (384 * 8 + 8 + 8 * 384 + 384)
    assert line == capsys.readouterr().out.strip()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in line


def test_task_heads_roberta_and_structure_detection(text_batch):
    clf = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    ampfuse.patch(clf, ampfuse.AdapterConfig.pfeiffer(trainable_modules=["classifier"]))
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.") for n in trainable)
    assert all(n.startswith("classifier.") or ADAPTER in n for n in trainable)
    ids = text_batch["input_ids"] % 120
    clf(input_ids=ids, attention_mask=text_batch["attention_mask"]).logits.sum().backward()

    roberta = tiny_bert(transformers.RobertaModel, transformers.RobertaConfig, pad_token_id=1)
    ampfuse.patch(roberta, ampfuse.AdapterConfig.houlsby(layers=[0]))
    assert set(adapters(roberta)) == {(0, "attention"), (0, "output")}
    roberta(input_ids=ids % 100 + 2)

    with pytest.raises(ValueError, match="no BERT-style layers"):
        ampfuse.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="already patched"):
        ampfuse.patch(roberta)
    with pytest.raises(ValueError, match="has 4 layers"):
        ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig(layers=[4]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_of_patched_model_equals_eager(text_batch, backend, device):
    model = ampfuse.patch(tiny_bert().to(device), ampfuse.AdapterConfig.houlsby(scaling="channel"))
    randomize_adapters(model)
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    batch = {k: v.to(device) for k, v in batch.items()}
    with ampfuse.use_backend(backend):
        eager = hidden(model, batch)
        compiled = torch.compile(lambda **b: hidden(model, b))(**batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_ddp_two_processes_keep_adapters_in_sync(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(testing.ddp_adapter_step, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["final"].keys() == r1["final"].keys() and r0["final"]
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
    assert any(not torch.equal(r0["final"][n], r0["initial"][n]) for n in r0["final"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_mixed_dtypes_are_promoted_like_eager(text_batch, backend, device):
    """Under autocast the dense output is 16-bit and the residual fp32: the adapters promote them as
    h + r would, so a patched model trains under autocast and matches the eager composition. bf16 on a
    GPU; float16 in Triton's CPU interpreter, which computes bf16 wrongly (and the backend refuses it)."""
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    model = ampfuse.patch(tiny_bert().to(device), ampfuse.AdapterConfig.houlsby(scaling="channel"))
    randomize_adapters(model)
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    batch = {k: v.to(device) for k, v in batch.items()}
    reference = copy.deepcopy(model)
    with torch.autocast(device.type, dtype=autocast_dtype):
        with ampfuse.use_backend(backend):
            y = hidden(model, batch)
        with ampfuse.use_backend("torch"):
            y_ref = hidden(reference, batch)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

