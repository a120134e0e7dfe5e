"""Expert parallelism on CPU: 2 gloo processes against the single-process MoELayer, outputs and grads."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labkit.moe import ExpertParallelMoE, MoELayer

WORLD = 2
SPLIT = [slice(0, 6), slice(6, 17)]  # unequal token counts per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, layer_kwargs, backend, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same layer, tokens and upstream gradient on every rank
        layer = MoELayer(16, 8, **layer_kwargs, init_std=0.3, backend=backend)
        with torch.no_grad():
            layer.router.weight[3] -= 10.0  # expert 3 (on rank 1) receives no token
        x = torch.randn(17, 16, requires_grad=True)
        g = torch.randn(17, 16)
        # each rank's tokens form one routing group (capacity is per group, as in GShard)
        ref = torch.cat([layer(x[s]) for s in SPLIT])
        (ref * g).sum().backward()

        ep = ExpertParallelMoE(layer)
        xr = x.detach()[SPLIT[rank]].clone().requires_grad_()
        y = ep(xr)
        (y * g[SPLIT[rank]]).sum().backward()
        replicated = [ep.router.weight] + ([] if ep.shared_experts is None else list(ep.shared_experts.parameters()))
        for p in replicated:  # data-parallel gradient of the replicated parts
            dist.all_reduce(p.grad)
        lo = rank * ep.local
        errors = {
            "output": (y - ref[SPLIT[rank]]).abs().max().item(),
            "grad x": (xr.grad - x.grad[SPLIT[rank]]).abs().max().item(),
            "grad gate_up_proj": (ep.gate_up_proj.grad - layer.experts.gate_up_proj.grad[lo:lo + ep.local]).abs().max().item(),
            "grad down_proj": (ep.down_proj.grad - layer.experts.down_proj.grad[lo:lo + ep.local]).abs().max().item(),
            "grad router": (ep.router.weight.grad - layer.router.weight.grad).abs().max().item(),
        }
        if ep.shared_experts is not None:
            errors["grad shared"] = (ep.shared_experts.down_proj.weight.grad
                                     - layer.shared_experts.down_proj.weight.grad).abs().max().item()
        try:
            ExpertParallelMoE(MoELayer(16, 8, 3, 1))
            errors["3 experts on 2 ranks raises"] = 1.0
        except ValueError:
            errors["3 experts on 2 ranks raises"] = 0.0
        results[rank] = errors
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layer_kwargs,backend", [
    (dict(num_experts=4, top_k=2, num_shared_experts=1), "auto"),
    (dict(num_experts=4, top_k=1, capacity_factor=1.0), "grouped"),
])
def test_expert_parallel_matches_single_process(layer_kwargs, backend):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), layer_kwargs, backend, results), nprocs=WORLD, join=True)
    assert set(results.keys()) == {0, 1}
    for rank, errors in results.items():
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank}: {name} differs by {err}"


def test_expert_parallel_on_one_rank_equals_layer():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        layer = MoELayer(16, 8, 3, 2, init_std=0.3)
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(ExpertParallelMoE(layer)(x), layer(x))
    finally:
        dist.destroy_process_group()
