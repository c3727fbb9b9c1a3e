"""Adapters shared across layers with low-rank private parts: AdapterConfig / MultimodalConfig
share="layers", private_rank=r (ampfuse.modules.shared). Small random models built here."""

import copy
import functools
import json
import os
import struct

import pytest
import torch
from torch import nn

import ampfuse
from ampfuse import testing
from ampfuse.context import ForwardContext
from ampfuse.modules import shared
from ampfuse.ops.adapter_block import adapter_block_reference
from ampfuse.ops.gmu import gmu_adapter_reference
from ampfuse.patch import ADAPTER, adapter_state_dict, adapters
from ampfuse.testing import tiny_bert

SIZES = {"audio": 6, "visual": 5}


def randomize(modules, seed=0):
    """Fresh random values in every parameter (U_l too, which starts at zero), scalings near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.endswith("scaling") else 0.3)
                        + (1.0 if name.endswith("scaling") or "norm" in name and name.endswith("weight") else 0.0))


def get(module, name):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def formed64(src, adapter, rank, leaf, aliases=None):
    """An adapter's tensors in float64, formed explicitly: W + U V^T (matmul, not the module's
    addmm) for its matrices, and its own (rank > 0) or the source's (rank 0) vectors."""
    out, aliases = {}, aliases or {}
    for name in adapter.unshared_names:
        if name in adapter.shared_matrices():
            w = leaf[get(src, aliases.get(name, name))]
            out[name] = w if not rank else w + leaf[get(adapter, f"{name}_u")] @ leaf[get(adapter, f"{name}_v")].mT
        else:
            out[name] = leaf[get(adapter, name) if rank else get(src, aliases.get(name, name))]
    return out


def make_shared(make, rank, layers=2, aliases=None):
    """(holder, source, [adapters]): ``layers`` adapters sharing a source held by ``holder``."""
    holder = nn.Module()
    src = shared.source(holder, "output", make, rank, aliases)
    adapters = []
    for _ in range(layers):
        adapter = make()
        adapter.unshared_names = [n for n, _ in adapter.named_parameters()]
        adapters.append(shared.share(adapter, src, rank, aliases))
    randomize([holder, *adapters])
    return holder, src, adapters


def check_grads(out, out64, params, leaf, tol):
    assert testing.rel_err(out, out64) < tol, testing.rel_err(out, out64)
    dy = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, params, dy.to(out.dtype))
    grads64 = torch.autograd.grad(out64, [leaf[p] for p in params], dy)
    for p, g, g64 in zip(params, grads, grads64):
        assert g.shape == p.shape and testing.rel_err(g, g64) < tol, (tuple(p.shape), testing.rel_err(g, g64))


# ----------------------------------------------------------------------------- gradients against float64

@pytest.mark.parametrize("backend,rank,options", [
    ("torch", 0, dict(scaling="learned", ln_before=True)),
    ("torch", 2, dict(scaling="channel", ln_before=True, original_ln_before=False, activation="gelu")),
    ("torch", 3, dict(scaling=0.5)),
    ("triton", 2, dict(scaling="channel", ln_before=True)),  # the fused op (Triton's interpreter on the CPU)
])
def test_bottleneck_gradients_reach_shared_and_private_parts(backend, rank, options):
    """Two layers sharing one source, chained; output and the gradient of every parameter (W,
    U_l, V_l, vectors) against float64 with the weights formed explicitly."""
    d, k = 24, 6
    make = functools.partial(ampfuse.BottleneckAdapter, d, k, init="bert", **options)
    holder, src, adapters = make_shared(make, rank)
    g = torch.Generator().manual_seed(1)
    h, r1, r2 = (torch.randn(3, 5, d, generator=g) for _ in range(3))
    norm = nn.LayerNorm(d)
    randomize([norm], seed=2)
    with ampfuse.use_backend(backend):
        y = adapters[1](adapters[0](h, r1, norm), r2, norm)

    params = list(holder.parameters()) + [p for a in adapters for p in a.parameters()]
    assert len(params) == len({id(p) for p in params})
    assert len(list(adapters[0].parameters())) == (0 if rank == 0 else 4 + len(list(make().parameters())) - 2)
    leaf = {p: p.detach().double().requires_grad_() for p in params}
    y64 = h.double()
    for adapter, r in zip(adapters, (r1, r2)):
        t = formed64(src, adapter, rank, leaf)
        y64 = adapter_block_reference(
            y64, r.double(), norm.weight.double(), norm.bias.double(), t["down.weight"], t["down.bias"],
            t["up.weight"], t["up.bias"], scaling=t.get("scaling", options.get("scaling")),
            adapter_ln_weight=t.get("adapter_norm.weight"), adapter_ln_bias=t.get("adapter_norm.bias"),
            ln_eps=norm.eps, activation=adapter.activation, original_ln_before=adapter.original_ln_before)
    check_grads(y, y64, params, leaf, testing.TOLERANCE[torch.float32])


@pytest.mark.parametrize("rank,modalities", [(0, False), (2, False), (0, True), (2, True)])
def test_gmu_gradients_reach_shared_and_private_parts(rank, modalities):
    """The GMU form (stacks of k x k matrices) and the softmax gate ((S, k, S*k) stack), shared
    across layers, and with ``modalities`` also across the two modalities of width 6."""
    d, k, sizes = 24, 6, {"audio": 6, "visual": 5, "depth": 6}
    make = functools.partial(ampfuse.GMUAdapter, d, sizes, k, gate="softmax", form="gmu", scaling="channel",
                             zero_init_up=False)
    aliases = make().modality_aliases() if modalities else None
    if modalities:
        assert aliases == {f"{p}.3.{a}": f"{p}.1.{a}" for p in ("stream_down", "stream_norm")
                           for a in ("weight", "bias")}
    holder, src, adapters = make_shared(make, rank, aliases=aliases)
    assert (src.stream_down[3].weight is None) == modalities
    g = torch.Generator().manual_seed(1)
    h, r1, r2 = (torch.randn(2, 5, d, generator=g) for _ in range(3))
    mods = [torch.randn(2, 5, size, generator=g) for size in sizes.values()]
    norm = nn.LayerNorm(d)
    randomize([norm], seed=2)
    with ForwardContext(dict(zip(sizes, mods))):
        y = adapters[1](adapters[0](h, r1, norm), r2, norm)

    params = list(holder.parameters()) + [p for a in adapters for p in a.parameters()]
    leaf = {p: p.detach().double().requires_grad_() for p in params}
    y64, streams = h.double(), range(1 + len(sizes))
    for adapter, r in zip(adapters, (r1, r2)):
        t = formed64(src, adapter, rank, leaf, aliases)
        y64 = gmu_adapter_reference(
            y64, [m.double() for m in mods], [t[f"stream_down.{j}.weight"] for j in streams],
            [t[f"stream_down.{j}.bias"] for j in streams], t["gate_weight"], t["gate_bias"], t["up.weight"],
            t["up.bias"], gmu_w=t["gmu_weight"], stream_ln_w=[t[f"stream_norm.{j}.weight"] for j in streams],
            stream_ln_b=[t[f"stream_norm.{j}.bias"] for j in streams], scaling=t["scaling"], gate="softmax",
            r=r.double(), ln_weight=norm.weight.double(), ln_bias=norm.bias.double(), ln_eps=norm.eps)
    check_grads(y, y64, params, leaf, testing.TOLERANCE[torch.float32])


def test_forming_under_autocast_keeps_the_parameters_dtype():
    make = functools.partial(ampfuse.BottleneckAdapter, 16, 4)
    _, _, (adapter, _) = make_shared(make, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        formed = shared.tensors(adapter)
    assert formed["down.weight"].dtype == torch.float32


# ----------------------------------------------------------------------------- configs and patch

def test_bad_share_options_raise_naming_them():
    with pytest.raises(ValueError, match="AdapterConfig.share must be None or one of"):
        ampfuse.AdapterConfig(share="modalities")
    with pytest.raises(ValueError, match="AdapterConfig.private_rank must be an int >= 0"):
        ampfuse.AdapterConfig(share="layers", private_rank=-1)
    with pytest.raises(ValueError, match="AdapterConfig.private_rank=2 needs share='layers'"):
        ampfuse.AdapterConfig(private_rank=2)
    with pytest.raises(ValueError, match=r"AdapterConfig.share must be None or one of \('layers',\)"):
        ampfuse.AdapterConfig(share="layers+modalities")  # text adapters have one stream
    with pytest.raises(ValueError, match="MultimodalConfig.private_rank must be an int"):
        ampfuse.MultimodalConfig(SIZES, share="layers", private_rank=1.5)
    with pytest.raises(ValueError, match=r"private_rank=8 must be below the smaller side of down.weight, \(8, 48\)"):
        ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig(bottleneck_size=8, share="layers", private_rank=8))
    with pytest.raises(ValueError, match=r"one bottleneck size for all adapted layers.*gives \[3, 6\]"):
        ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig(reduction_factor={"default": 16, "2": 8}, share="layers"))


def houlsby(rank, **kw):
    return ampfuse.AdapterConfig.houlsby(bottleneck_size=8, scaling="learned", ln_before=True, share="layers",
                                         private_rank=rank, **kw)


@pytest.mark.parametrize("rank", [0, 2])
def test_houlsby_shares_per_site_across_the_selected_layers(rank, capsys):
    """Attention and feed-forward adapters each share one source across layers=[...]; the
    parameter count is the formula's, and print_trainable_parameters reports the reduction."""
    model = ampfuse.patch(tiny_bert(), houlsby(rank, layers=[1, -1]))
    d, k, n = 48, 8, 2
    sources = getattr(model, ADAPTER)
    assert list(sources) == ["attention", "output"]
    attached = adapters(model)
    assert sorted(attached) == [(1, "attention"), (1, "output"), (3, "attention"), (3, "output")]
    for (_, site), adapter in attached.items():
        assert adapter._ampfuse_share.source is sources[site]
    matrices, vectors = 2 * k * d, (k + d) + 1 + 2 * d  # down/up weights; biases, learned scale, adapter LN
    private = 2 * rank * (k + d) + vectors if rank else 0
    shared_count = matrices + (0 if rank else vectors)
    trainable, _ = ampfuse.trainable_parameters(model)
    assert trainable == 2 * shared_count + 2 * n * private
    line = ampfuse.print_trainable_parameters(model)
    unshared = 2 * n * (matrices + vectors)
    assert f"shared adapters: {2 * shared_count:,} shared + {2 * n * private:,} private params" in line
    assert f"unshared: {unshared:,}" in line and line == capsys.readouterr().out.strip()
    assert "shared (private rank" in repr(attached[1, "output"])


def test_zero_init_shared_model_is_the_frozen_model():
    model, batch = tiny_bert(), {"input_ids": torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))}
    expected = model(**batch).last_hidden_state
    ampfuse.patch(model, houlsby(2, zero_init_up=True))
    torch.testing.assert_close(model(**batch).last_hidden_state, expected, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 2])
def test_training_changes_only_shared_and_private_parameters(rank):
    model = ampfuse.patch(tiny_bert(), houlsby(rank, layers=[2, 3]))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):  # U_l starts at zero: V_l's gradient (dW^T U_l) is nonzero from the second step
        opt.zero_grad()
        model(input_ids=ids).last_hidden_state.square().mean().backward()
        opt.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed == trainable
    assert all(n.startswith(f"{ADAPTER}.") or (".layer.2." in n or ".layer.3." in n) for n in trainable)
    assert any(n.endswith("_v") for n in trainable) == bool(rank)


def test_deepcopy_and_unpatch():
    model = tiny_bert()
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).last_hidden_state
    ampfuse.patch(model, houlsby(2))
    copied = copy.deepcopy(model)
    for adapter in adapters(copied).values():  # the copy's adapters read the copy's sources
        assert any(adapter._ampfuse_share.source is s for s in getattr(copied, ADAPTER).values())
    ampfuse.unpatch(model)
    assert not any(ADAPTER in m._modules for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- save and load

def data_bytes(path):
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and header)."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


@pytest.mark.parametrize("rank", [0, 2])
def test_save_writes_shared_and_private_parts_once_and_load_restores_them(rank, tmp_path):
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    unshared = ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig.houlsby(bottleneck_size=8, scaling="learned",
                                                                        ln_before=True))
    ampfuse.save_adapters(unshared, tmp_path / "unshared")
    model = ampfuse.patch(tiny_bert(), houlsby(rank))
    randomize([model.get_submodule(n) for n, m in model.named_modules() if n.endswith(ADAPTER)], seed=4)
    expected = model(input_ids=ids).last_hidden_state
    ampfuse.save_adapters(model, tmp_path / "shared")

    trainable, _ = ampfuse.trainable_parameters(model)
    trainable_unshared, _ = ampfuse.trainable_parameters(unshared)
    path = tmp_path / "shared" / "adapter_model.safetensors"
    assert data_bytes(path) == 4 * trainable  # every tensor once
    assert data_bytes(tmp_path / "unshared" / "adapter_model.safetensors") == 4 * trainable_unshared
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "unshared" / "adapter_model.safetensors")
    with open(tmp_path / "shared" / "adapter_config.json") as f:
        assert json.load(f)["config"]["private_rank"] == rank

    fresh = tiny_bert()
    ampfuse.load_adapters(fresh, tmp_path / "shared")
    assert adapter_state_dict(fresh).keys() == adapter_state_dict(model).keys()
    for name, t in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[name], t), name
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)


def test_unshared_adapters_save_as_before(tmp_path):
    """No new keys in an unshared config (its adapter_config.json is what earlier versions wrote),
    and a config without them loads."""
    model = ampfuse.patch(tiny_bert(), ampfuse.AdapterConfig.pfeiffer())
    ampfuse.save_adapters(model, tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        meta = json.load(f)
    assert not {"share", "private_rank"} & set(meta["config"])
    assert all(ADAPTER in n and not n.startswith(ADAPTER) for n in adapter_state_dict(model))
    ampfuse.load_adapters(tiny_bert(), tmp_path)
    config = ampfuse.MultimodalConfig(SIZES)
    assert not {"share", "private_rank"} & set(config.to_dict())


# ----------------------------------------------------------------------------- multimodal

def features(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*ids.shape, size, generator=g) for name, size in SIZES.items()}


def test_multimodal_shared_gmu_adapters(tmp_path, capsys):
    """GMU adapters shared across layers (rank 2) beside shared text adapters at the attention
    sites: the text adapters' feed-forward source is gone (the GMU adapters took every site);
    zero-initialised it is the frozen text model; training moves only trainable parameters;
    save_trainable writes each once and load_trainable restores them."""
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    feats = features(ids)
    base = tiny_bert()
    expected = base(input_ids=ids).last_hidden_state
    config = ampfuse.MultimodalConfig(SIZES, bottleneck_size=8, gate="softmax", share="layers", private_rank=2,
                                      text_adapter=houlsby(2, zero_init_up=True))
    mm = ampfuse.patch_multimodal(base, config)
    assert list(getattr(mm.encoder, ADAPTER)) == ["attention", "gmu"]
    torch.testing.assert_close(mm(input_ids=ids, **feats).last_hidden_state, expected, rtol=0, atol=0)

    before = {n: t.clone() for n, t in mm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    mm.train()
    for _ in range(3):
        opt.zero_grad()
        mm(input_ids=ids, **feats, labels=torch.tensor([3.0, 2.5])).loss.backward()
        opt.step()
    changed = {n for n, t in mm.state_dict().items() if not torch.equal(before[n], t)}
    assert changed == set(mm.trainable_state_dict())
    mm.eval()
    expected = mm(input_ids=ids, **feats).logits

    mm.save_trainable(tmp_path)
    trainable, _ = ampfuse.trainable_parameters(mm)
    assert data_bytes(tmp_path / "adapter_model.safetensors") == 4 * trainable
    fresh = ampfuse.patch_multimodal(tiny_bert(), copy.deepcopy(config)).eval()
    fresh.load_trainable(tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids, **feats).logits, expected, rtol=0, atol=0)

    unshared = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig(SIZES, bottleneck_size=8,
                                                                             gate="softmax"))
    gmu_unshared = ampfuse.trainable_parameters(unshared)[0] - 49  # less the head (48 + 1)
    counts = shared.summary(mm.encoder)
    assert counts["unshared"] == gmu_unshared + 4 * sum(  # + the text adapters at the attention sites
        p.numel() for p in ampfuse.BottleneckAdapter(48, 8, scaling="learned", ln_before=True).parameters())
    assert "shared adapters:" in ampfuse.print_trainable_parameters(mm)
    capsys.readouterr()


def test_modalities_of_equal_width_share_one_stream_projection():
    sizes, k = {"audio": 6, "visual": 6}, 8

    def count(share):
        mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig(sizes, bottleneck_size=k, share=share))
        return ampfuse.trainable_parameters(mm)[0], mm
    layers, _ = count("layers")
    both, mm = count("layers+modalities")
    assert layers - both == k * 6 + k + 2 * 6  # one stream's projection, bias and LayerNorm
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    mm(input_ids=ids, **{n: torch.randn(2, 9, 6) for n in sizes}, labels=torch.ones(2)).loss.backward()
    assert all(p.grad is not None for p in mm.parameters() if p.requires_grad)


def test_gradient_checkpointing_of_a_shared_model():
    """Checkpointing recomputes each layer, forming its weights again: same loss and gradients."""
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    model = ampfuse.patch(tiny_bert(), houlsby(2))
    randomize([m for n, m in model.named_modules() if n.endswith(ADAPTER)], seed=5)
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = m(input_ids=ids).last_hidden_state.square().mean()
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


def test_the_readme_parameter_table_counts(monkeypatch):
    """benchmarks/sharing.py's figures for BERT-base (meta device) against the formula: per layer
    2kd matrix entries and d + k bias entries (Pfeiffer, k = 48); shared: 2kd once, plus per layer
    2r(k + d) private entries and the biases (r > 0) or the biases once (r = 0)."""
    import pathlib

    import transformers

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent))
    from benchmarks import sharing

    with torch.device("meta"):
        base = transformers.BertModel(transformers.BertConfig())
    d, k, layers = 768, 48, 12
    assert sharing.adapter_parameters(base, "Pfeiffer", False, 0) == layers * (2 * k * d + k + d) == 894_528
    assert sharing.adapter_parameters(base, "Pfeiffer", True, 0) == 2 * k * d + k + d
    assert sharing.adapter_parameters(base, "Houlsby", True, 4) == 2 * (2 * k * d + layers * (8 * (k + d) + k + d))
    assert not any(ADAPTER in m._modules for m in base.modules())  # each count patched a copy
