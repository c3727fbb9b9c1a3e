"""ampfuse.patch on every BERT-family model people fine-tune, with its task head, on small random
configs built here (no download): BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa-v2 (residual-tail
modules), DistilBERT and ALBERT (LayerNorm(h + r) inline in the layer's forward; ALBERT shares its
layer modules, and so its adapters, across layer applications)."""

import copy

import pytest
import torch
import transformers

import ampfuse
from ampfuse import testing
from ampfuse.patch import ADAPTER, _hub_to_ampfuse, adapters

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32)

# family: (task-head model, config, the head's modules, trained with the adapters)
FAMILIES = {
    "bert": lambda: (transformers.BertForSequenceClassification, transformers.BertConfig(**SMALL), ["classifier"]),
    "roberta": lambda: (transformers.RobertaForSequenceClassification,
                        transformers.RobertaConfig(pad_token_id=1, **SMALL), ["classifier"]),
    "xlm-roberta": lambda: (transformers.XLMRobertaForSequenceClassification,
                            transformers.XLMRobertaConfig(pad_token_id=1, **SMALL), ["classifier"]),
    "electra": lambda: (transformers.ElectraForSequenceClassification,
                        transformers.ElectraConfig(embedding_size=16, **SMALL), ["classifier"]),
    "deberta-v2": lambda: (transformers.DebertaV2ForSequenceClassification, transformers.DebertaV2Config(**SMALL),
                           ["pooler", "classifier"]),
    "distilbert": lambda: (transformers.DistilBertForSequenceClassification, transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32),
        ["pre_classifier", "classifier"]),
    # 4 layer applications of 2 distinct layers (2 groups of 1): each adapter runs twice per forward
    "albert": lambda: (transformers.AlbertForSequenceClassification, transformers.AlbertConfig(
        embedding_size=16, num_hidden_groups=2, **{**SMALL, "num_hidden_layers": 4}), ["classifier"]),
}
INLINE = ["distilbert", "albert"]


def build(family, **overrides):
    cls, config, head = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return cls(config).eval(), head


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(2, 100, (2, 9), generator=g), "attention_mask": mask}


def outputs(model, batch):
    """The task head's logits and the last hidden state."""
    out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def randomize(model, seed=1, only=""):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and only in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("scaling") else 0.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_is_the_frozen_model_and_unpatch_restores_it(family, batch):
    model, _ = build(family)
    classes = [type(m) for m in model.modules()]
    expected = outputs(model, batch)
    ampfuse.patch(model, ampfuse.AdapterConfig.houlsby(zero_init_up=True, ln_before=True))
    assert len(adapters(model)) == 4 and all(isinstance(a, ampfuse.BottleneckAdapter)
                                             for a in adapters(model).values())
    with ampfuse.use_backend("torch"):
        for got, want in zip(outputs(model, batch), expected):
            assert torch.equal(got, want)
    with ampfuse.use_backend("triton"):
        for got, want in zip(outputs(model, batch), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    randomize(model)
    assert not torch.equal(outputs(model, batch)[1], expected[1])
    ampfuse.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(ADAPTER in n for n in model.state_dict()) and not any(
        hasattr(m, "_ampfuse_captures") for m in model.modules())
    for got, want in zip(outputs(model, batch), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_changes_only_adapters_and_head(family, batch):
    model, head = build(family)
    ampfuse.patch(model, ampfuse.AdapterConfig.houlsby(zero_init_up=True, trainable_modules=head))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trained = [ADAPTER, *head]
    assert all(any(f".{m}." in f".{n}" for m in trained) for n in changed), sorted(changed)
    ups = {n for n in changed if n.endswith("up.weight")}  # zero-initialised, moved by the step
    assert len(ups) == len(adapters(model)) == 4
    assert any(not n.startswith(tuple(head)) and ADAPTER not in n for n in before)  # a frozen base exists
    assert all(p.grad is None for n, p in model.named_parameters() if not any(f".{m}." in f".{n}" for m in trained))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, batch, tmp_path):
    model, head = build(family)
    ampfuse.patch(model, ampfuse.AdapterConfig.houlsby(scaling="learned", layers=[-1], trainable_modules=head))
    randomize(model)
    expected = outputs(model, batch)
    ampfuse.save_adapters(model, tmp_path)
    fresh, _ = build(family)
    ampfuse.load_adapters(fresh, tmp_path)
    for got, want in zip(outputs(fresh, batch), expected):
        assert torch.equal(got, want)


HUB_CONFIGS = {
    "seqbn": lambda adapters: adapters.SeqBnConfig(),
    "double_seqbn_learned_ln_before": lambda adapters: adapters.DoubleSeqBnConfig(scaling="learned", ln_before=True),
}


@pytest.mark.parametrize("config", HUB_CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_the_adapters_library(family, config, batch, tmp_path):
    """Outputs and every adapter gradient against the adapters library on the same task-head model
    (its saved adapter loaded with ampfuse.load_adapterhub)."""
    adapters_lib = pytest.importorskip("adapters")
    model, _ = build(family)
    hub_model = copy.deepcopy(model)
    adapters_lib.init(hub_model)
    hub_model.add_adapter("task", config=HUB_CONFIGS[config](adapters_lib))
    hub_model.train_adapter("task")
    randomize(hub_model, only=".adapters.")  # train_adapter leaves a Hugging Face head trainable too
    hub_model.eval()
    hub_model.save_adapter(str(tmp_path), "task")
    if family == "albert" and config.startswith("double"):
        # adapters 1.x runs ALBERT's attention adapter on the attention's input (its operands are
        # swapped there); ampfuse adapts the attention output, as in every other family.
        with pytest.raises(ValueError, match="ALBERT adapter with mh_adapter=True"):
            ampfuse.load_adapterhub(model, str(tmp_path))
        return
    ampfuse.load_adapterhub(model, str(tmp_path))
    for got, want in zip(outputs(model, batch), outputs(hub_model, batch)):
        assert testing.rel_err(got, want) < 1e-5
    y, y_hub = outputs(model, batch)[1], outputs(hub_model, batch)[1]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)
    y_hub.backward(dy)
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    hub = {n: p.grad for n, p in hub_model.named_parameters() if p.requires_grad and ".adapters." in n}
    renamed = _hub_to_ampfuse(model, hub, model._ampfuse_config.ln_before)
    assert set(renamed) == set(ours) and ours
    for name, grad in ours.items():
        assert testing.rel_err(grad, renamed[name]) < 1e-4, name


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_load_adapterhub_from_a_base_model_into_a_task_head_model(family, batch, tmp_path):
    """Weights keyed 'encoder.layer...' (a base model) load into '<prefix>.encoder.layer...' (a head model)."""
    adapters_lib = pytest.importorskip("adapters")
    model, _ = build(family)
    hub_model = copy.deepcopy(getattr(model, model.base_model_prefix))
    adapters_lib.init(hub_model)
    hub_model.add_adapter("task", config=adapters_lib.DoubleSeqBnConfig())
    hub_model.train_adapter("task")
    randomize(hub_model, only=".adapters.")
    hub_model.eval().save_adapter(str(tmp_path), "task")
    ampfuse.load_adapterhub(model, str(tmp_path))
    assert testing.rel_err(outputs(model, batch)[1], hub_model(**batch).last_hidden_state) < 1e-5


def test_albert_adapters_are_shared_like_its_layers(batch):
    model, _ = build("albert")
    ampfuse.patch(model, ampfuse.AdapterConfig.pfeiffer())
    assert set(adapters(model)) == {(0, "output"), (1, "output")}  # 2 distinct layers, 4 applications
    calls = []
    for adapter in adapters(model).values():
        adapter.register_forward_pre_hook(lambda *_: calls.append(1))
    model(**batch)
    assert len(calls) == 4


@pytest.mark.parametrize("family", INLINE)
def test_inline_sites_are_thread_safe(family, batch):
    import threading

    model, _ = build(family)
    ampfuse.patch(model, ampfuse.AdapterConfig.houlsby())
    randomize(model)
    g = torch.Generator().manual_seed(5)
    inputs = [batch, {**batch, "input_ids": torch.randint(2, 100, (2, 9), generator=g)}]
    expected = [outputs(model, b)[1] for b in inputs]
    start, results = threading.Barrier(2), [[], []]

    def run(k):
        start.wait()
        results[k].extend(outputs(model, inputs[k])[1] for _ in range(20))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert len(results[k]) == 20 and all(torch.equal(y, expected[k]) for y in results[k])


@pytest.mark.parametrize("family", INLINE)
def test_gmu_adapters_at_inline_sites(family, batch):
    model, _ = build(family)
    base = getattr(model, model.base_model_prefix)
    expected = base(**batch).last_hidden_state
    mm = ampfuse.patch_multimodal(base, ampfuse.MultimodalConfig({"audio": 6}))
    out = mm(**batch, audio=torch.randn(2, 9, 6))
    assert torch.equal(out.last_hidden_state, expected)  # zero-initialised up-projections
    assert len(mm.gmu_adapters()) == 2


REFUSED = {
    # family, how to build it, what the error must say
    "pre-LayerNorm": (lambda: transformers.RobertaPreLayerNormModel(
        transformers.RobertaPreLayerNormConfig(pad_token_id=1, **SMALL)), r"roberta-prelayernorm.*pre-LayerNorm"),
    "DeBERTa v1": (lambda: transformers.DebertaModel(transformers.DebertaConfig(**SMALL)),
                   r"deberta .*DebertaLayerNorm, not torch.nn.LayerNorm"),
    "chunked ALBERT": (lambda: build("albert", chunk_size_feed_forward=3)[0], r"albert .*chunk_size_feed_forward=3"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_families_the_fused_block_cannot_express_are_refused(name):
    make, message = REFUSED[name]
    model = make()
    with pytest.raises(ValueError, match=message):
        ampfuse.patch(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(ADAPTER in n for n in model.state_dict())
    with pytest.raises(ValueError, match="no BERT-style layers"):
        ampfuse.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
