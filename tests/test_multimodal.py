"""patch_multimodal: a frozen BERT that takes audio/visual inputs, on the real MiniLM and a tiny BERT."""

import copy

import pytest
import torch

import ampfuse
from ampfuse.testing import tiny_bert

SIZES = {"audio": 74, "visual": 35}


def features(batch, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = batch["input_ids"].shape
    return {name: torch.randn(B, T, size, generator=g) for name, size in sizes.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_init_gmu_model_equals_the_text_only_model(minilm, text_batch, backend):
    expected = minilm(**text_batch).last_hidden_state
    mm = ampfuse.patch_multimodal(minilm, ampfuse.MultimodalConfig(SIZES, form="gmu"))
    with ampfuse.use_backend(backend):
        out = mm(**text_batch, **features(text_batch))
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert len(mm.gmu_adapters()) == 6


def test_patched_minilm_trains_on_synthetic_aligned_features(minilm, text_batch):
    """The label depends on the audio features only: the GMU path must learn it."""
    torch.manual_seed(0)
    mm = ampfuse.patch_multimodal(minilm, ampfuse.MultimodalConfig(SIZES, bottleneck_size=16, fusion_layers=[2]))
    feats = features(text_batch)
    labels = feats["audio"][:, :, 0].mean(dim=1) * 3
    opt = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=3e-3)
    mm.train()
    losses = []
    for _ in range(12):
        loss = mm(**text_batch, **feats, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_of_the_multimodal_model_equals_eager(text_batch, backend, device):
    sizes = {"audio": 6, "visual": 5}
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig(sizes, zero_init_up=False, gate="softmax",
                                                                         fusion_layers=[2])).eval().to(device)
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    feats = {k: v.to(device) for k, v in features(batch, sizes).items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    with ampfuse.use_backend(backend):
        eager = mm(**batch, **feats).logits
        compiled = torch.compile(lambda **kw: mm(**kw).logits)(**batch, **feats)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_missing_unexpected_and_misshaped_modalities_raise(text_batch):
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"audio": 6, "visual": 5}))
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    feats = features(batch, {"audio": 6, "visual": 5})
    with pytest.raises(ValueError, match="missing modality input 'visual'"):
        mm(**batch, audio=feats["audio"])
    with pytest.raises(ValueError, match=r"'audio' must be token-aligned with shape \(2, 11, 6\)"):
        mm(**batch, audio=feats["audio"][:, :5], visual=feats["visual"])
    with pytest.raises(TypeError, match="unexpected inputs \\['text2'\\]"):
        mm(**batch, **feats, text2=feats["audio"])
    with pytest.raises(TypeError, match="floating-point"):
        mm(**batch, audio=feats["audio"].long(), visual=feats["visual"])


def test_per_sample_sequences_are_pooled_over_their_mask(text_batch):
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"audio": 6}, aligned=False,
                                                                         zero_init_up=False)).eval()
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    audio = torch.randn(2, 30, 6)
    mask = torch.ones(2, 30)
    mask[:, 20:] = 0
    out = mm(**batch, audio=audio, audio_mask=mask).logits
    noisy = audio.clone()
    noisy[:, 20:] = 1e4
    torch.testing.assert_close(mm(**batch, audio=noisy, audio_mask=mask).logits, out)
    pooled = mm(**batch, audio=audio[:, :20].mean(1)).logits  # an already pooled (B, d) vector
    torch.testing.assert_close(pooled, out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="audio_mask must have shape"):
        mm(**batch, audio=audio, audio_mask=mask[:, :10])


def test_noisy_or_missing_signal_runs_and_exposes_gate_statistics(text_batch):
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"audio": 6, "visual": 5},
                                                                         zero_init_up=False)).eval()
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    feats = features(batch, {"audio": 6, "visual": 5})
    mm.track_gates()
    clean = mm(**batch, **feats)
    zeroed = mm(**batch, audio=torch.zeros_like(feats["audio"]), visual=feats["visual"])
    noised = mm(**batch, audio=feats["audio"] + 3 * torch.randn_like(feats["audio"]), visual=feats["visual"])
    for out in (clean, zeroed, noised):
        assert torch.isfinite(out.logits).all()
        stats = out.gate_stats
        assert set(stats) == set(range(4))
        for layer in stats.values():
            assert set(layer) == {"text", "audio", "visual"}
            assert sum(s["mean"] for s in layer.values()) == pytest.approx(1.0, abs=1e-5)  # softmax weights
    assert clean.gate_stats[0]["audio"] != zeroed.gate_stats[0]["audio"]
    mm.track_gates(False)
    assert mm(**batch, **feats).gate_stats is None


@pytest.mark.parametrize("task,num_labels,labels", [
    ("classification", 3, lambda: torch.tensor([0, 2])),
    ("multilabel", 4, lambda: torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])),
    ("regression", 1, lambda: torch.tensor([1.5, -2.0])),
])
def test_task_heads(text_batch, task, num_labels, labels):
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"visual": 5}, task=task,
                                                                         num_labels=num_labels))
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    out = mm(**batch, visual=torch.randn(2, 11, 5), labels=labels())
    assert out.logits.shape == ((2,) if task == "regression" else (2, num_labels))
    out.loss.backward()
    assert all(p.grad is not None for n, p in mm.named_parameters() if p.requires_grad and "head" in n)


def test_save_and_load_trainable_weights(text_batch, tmp_path):
    config = ampfuse.MultimodalConfig({"audio": 6}, zero_init_up=False, fusion_layers=[1])
    mm = ampfuse.patch_multimodal(tiny_bert(), config).eval()
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    audio = torch.randn(2, 11, 6)
    expected = mm(**batch, audio=audio).logits
    mm.save_trainable(tmp_path)
    fresh = ampfuse.patch_multimodal(tiny_bert(), copy.deepcopy(config)).eval()
    with torch.no_grad():  # the same seed built the same weights: move them away first
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    assert not torch.equal(fresh(**batch, audio=audio).logits, expected)
    fresh.load_trainable(tmp_path)
    torch.testing.assert_close(fresh(**batch, audio=audio).logits, expected, rtol=0, atol=0)
    other = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"audio": 7}))
    with pytest.raises(ValueError, match=r"do not match this model: missing \[\], unexpected \['fusion.1"):
        other.load_trainable(tmp_path)
    other = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig({"audio": 7}, fusion_layers=[1]))
    with pytest.raises(ValueError, match="saved shape"):
        other.load_trainable(tmp_path)


# Triton's CPU interpreter keeps the launch grid in globals, so only a GPU runs Triton from two threads.
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_two_threads_running_one_model_get_their_own_results(text_batch, backend):
    """Modality tensors and gate statistics travel in a thread-local ForwardContext: two threads
    running one model on different inputs get what a run of each alone gets."""
    import threading

    sizes = {"audio": 6, "visual": 5}
    mm = ampfuse.patch_multimodal(tiny_bert(), ampfuse.MultimodalConfig(sizes, zero_init_up=False,
                                                                         fusion_layers=[1])).eval()
    mm.track_gates()
    batch = {"input_ids": text_batch["input_ids"] % 120, "attention_mask": text_batch["attention_mask"]}
    inputs = [features(batch, sizes, seed=seed) for seed in range(2)]
    with ampfuse.use_backend(backend):
        expected = [mm(**batch, **feats) for feats in inputs]
    assert not torch.equal(expected[0].logits, expected[1].logits)
    start, results, errors = threading.Barrier(2), [[], []], []

    def run(k):
        try:
            start.wait()
            with ampfuse.use_backend(backend):
                for _ in range(25):
                    results[k].append(mm(**batch, **inputs[k]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        for out in results[k]:
            assert torch.equal(out.logits, expected[k].logits)
            assert out.gate_stats == expected[k].gate_stats
