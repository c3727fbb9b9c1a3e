"""A patched model under FSDP2 (torch.distributed.fsdp.fully_shard), two processes on gloo on the
CPU, against one process on the whole batch. (DDP: tests/test_patch.py.)"""

import pytest
import torch

import ampfuse
from ampfuse import _distributed_testing as dist_testing
from ampfuse import testing


@pytest.mark.slow
def test_fsdp2_trains_adapters_like_one_process_and_saves_once(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_available():
        pytest.skip("needs torch.distributed.fsdp.fully_shard (FSDP2)")
    import torch.multiprocessing as mp

    mp.spawn(dist_testing.fsdp_adapter_training, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    with ampfuse.use_backend("torch"):
        model = dist_testing.patched_bert()
        losses, grads, with_grad = dist_testing.train(model, dist_testing.batches())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    for r in ranks:
        # float32: every step's loss and the adapter gradients of the first step match one process
        assert len(r["losses"]) == len(losses) == dist_testing.STEPS
        assert all(testing.rel_err(a, b) < 1e-5 for a, b in zip(r["losses"], losses)), (r["losses"], losses)
        assert r["grads"].keys() == grads.keys() == trainable
        for name, grad in grads.items():
            assert testing.rel_err(r["grads"][name], grad) < 1e-5, name
        # frozen weights get no gradient, and the reduce-scatter carries the adapters' gradients only
        assert r["with_grad"] == with_grad == trainable
        adapter_elements = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
        frozen_elements = sum(p.numel() for n, p in model.named_parameters() if n not in trainable)
        assert adapter_elements <= r["reduced_elements_per_step"] < 2 * adapter_elements < frozen_elements / 10
        print(f"FSDP2 rank: {r['reduced_elements_per_step']} gradient elements reduce-scattered per step; "
              f"adapters {adapter_elements}, frozen weights {frozen_elements} elements")
        assert r["reloaded_loss_equal"]

    # save_adapters under FSDP: rank 0 alone wrote, full (unsharded) weights
    assert not (tmp_path / "saved-by-rank1").exists()
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "saved-by-rank0" / "adapter_model.safetensors")
    expected = {n: t for n, t in model.state_dict().items() if n in trainable}
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape and testing.rel_err(saved[name], tensor) < 1e-5, name

    # bfloat16 base, float32 adapter master weights computed in bfloat16 and reduced in float32
    for r in ranks:
        mp_run = r["mp"]
        for name, (dtype, requires_grad) in mp_run["storage"].items():
            assert dtype == (torch.float32 if requires_grad else torch.bfloat16), name
        assert mp_run["compute"] and set(mp_run["compute"]) == {torch.bfloat16}
        assert set(mp_run["grad_dtypes"].values()) == {torch.float32}
        assert all(t.dtype == torch.float32 for t in mp_run["final"].values())
        assert all(not torch.equal(mp_run["final"][n], mp_run["initial"][n]) for n in mp_run["final"])
        # the same training as in float32, to bfloat16's precision
        assert all(testing.rel_err(a, b) < 2e-2 for a, b in zip(mp_run["losses"], losses)), (mp_run["losses"], losses)
