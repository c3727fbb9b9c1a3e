"""The main job (ampfuse-demo): metrics, data loading, and tiny end-to-end runs on the CPU."""

import json
import os
import pickle

import numpy as np
import pytest

from ampfuse import datasets, demo, metrics


@pytest.fixture(autouse=True)
def no_flags_from_the_environment(monkeypatch):
    monkeypatch.delenv("AMPFUSE_DEMO_ARGS", raising=False)


def test_metrics_against_hand_computed_values():
    preds = [2.4, -0.6, 0.0, -2.6, 1.2]
    labels = [3.0, -1.0, -0.4, -2.0, 0.6]
    assert metrics.mae(preds, labels) == pytest.approx((0.6 + 0.4 + 0.4 + 0.6 + 0.6) / 5)
    # non-negative vs negative: preds [T, F, T, F, T], labels [T, F, F, F, T] -> 4 of 5 right
    acc2, f1 = metrics.binary_accuracy_f1(preds, labels)
    assert acc2 == pytest.approx(0.8)
    # class True: tp=2, fp=1, fn=0 -> F1 0.8 (support 2); class False: tp=2, fp=0, fn=1 -> 0.8 (support 3)
    assert f1 == pytest.approx(0.8)
    # rounded classes: preds [2, -1, 0, -3, 1], labels [3, -1, -0, -2, 1] -> 3 of 5
    assert metrics.accuracy_7(preds, labels) == pytest.approx(0.6)
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="one length"):
        metrics.mae([1, 2], [1])


def write_sample_pickle(path, n=12, L=20, seed=0):
    rng = np.random.default_rng(seed)
    split = lambda: {  # noqa: E731
        "raw_text": ["it was a good movie", "bad acting and a dull plot"] * (n // 2),
        "audio": rng.standard_normal((n, L, 74)).astype(np.float32),
        "vision": rng.standard_normal((n, L, 35)).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, (n, 1)).astype(np.float32),
        "id": [f"clip{i}" for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump({"train": split(), "valid": split(), "test": split()}, f)


def test_pickle_loader_reads_the_common_layout(tmp_path):
    path = tmp_path / "mosi.pkl"
    write_sample_pickle(path)
    data = datasets.load_pickle(str(path))
    assert set(data) == {"train", "valid", "test"}
    train = data["train"]
    assert len(train["text"]) == 12 and train["labels"].shape == (12,) and train["audio"][0].shape == (20, 74)


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: d.pop("valid"), "splits"),
    (lambda d: d["train"].pop("vision"), "'vision' or 'visual'"),
    (lambda d: d["test"].__setitem__("audio", np.zeros((12, 20, 70))), r"audio must have shape \(12, L, 74\)"),
    (lambda d: d["train"].__setitem__("regression_labels", np.zeros(3)), "12 texts but 3 labels"),
])
def test_pickle_loader_rejects_malformed_files(tmp_path, corrupt, message):
    path = tmp_path / "bad.pkl"
    write_sample_pickle(path)
    with open(path, "rb") as f:
        data = pickle.load(f)
    corrupt(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError, match=message):
        datasets.load_pickle(str(path))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        datasets.load_pickle(str(tmp_path / "junk.pkl"))


def test_tiny_demo_writes_every_output(tmp_path, minilm_path):
    out = tmp_path / "out"
    results = demo.run(["--train-size", "40", "--epochs", "1", "--batch-size", "16", "--out", str(out),
                         "--no-progress", "--model", minilm_path])
    assert [r["variant"] for r in results] == list(demo.VARIANTS)
    report = json.loads((out / "metrics.json").read_text())
    for row in report["results"]:
        assert {"mae", "corr", "acc2", "f1", "acc7", "trainable_params", "train_samples_per_s",
                "peak_memory_bytes"} <= set(row)
        assert (out / "adapters" / row["variant"] / "adapter_model.safetensors").stat().st_size > 0
    assert "| GMU adapters" in (out / "metrics.md").read_text()
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_on_a_pickle_file(tmp_path, minilm_path):
    path = tmp_path / "mosi.pkl"
    write_sample_pickle(path)
    results = demo.run(["--data", str(path), "--epochs", "1", "--variants", "gmu", "--out", str(tmp_path / "o"),
                         "--no-progress"])
    assert results[0]["variant"] == "gmu" and np.isfinite(results[0]["mae"])


def test_multimodal_variants_beat_text_only_on_the_planted_signal(tmp_path, minilm_path):
    results = demo.run(["--train-size", "320", "--epochs", "3", "--out", str(tmp_path), "--no-progress",
                         "--seed", "0"])
    mae = {r["variant"]: r["mae"] for r in results}
    assert mae["gmu"] < mae["text"] - 0.1 and mae["gmu_fusion"] < mae["text"] - 0.1, mae


def test_flags_come_from_the_environment_then_the_command_line(monkeypatch):
    monkeypatch.setenv("AMPFUSE_DEMO_ARGS", "--epochs 1 --train-size 64 --out 'a folder'")
    args = demo.parse_args(["--epochs", "3"])
    assert (args.epochs, args.train_size, args.out) == (3, 64, "a folder")  # the command line wins
    monkeypatch.setenv("AMPFUSE_DEMO_ARGS", "--epochs")
    with pytest.raises(SystemExit) as exc:
        demo.parse_args([])
    assert exc.value.code == 2


def test_main_turns_a_failure_into_one_line_and_status_1(monkeypatch, capsys):
    def fail(argv):
        raise RuntimeError("the data\nis bad")

    monkeypatch.setattr(demo, "run", fail)
    monkeypatch.delenv("AMPFUSE_TRACEBACK", raising=False)
    assert demo.main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "ampfuse-demo: error: RuntimeError: the data is bad " \
        "(AMPFUSE_TRACEBACK=1 shows where)\n"
    monkeypatch.setattr(demo, "run", lambda argv: [{"variant": "text"}])
    assert demo.main([]) == 0  # not the results list, which sys.exit would print and turn into status 1


def test_default_threads_leave_a_core_free():
    cores = len(os.sched_getaffinity(0))
    assert demo.default_threads() == max(1, min(demo._TORCH_THREADS, cores - 1))
