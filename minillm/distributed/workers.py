"""What chapter 16 runs on every rank with `launch`, and the one-process references it compares them with.

A spawned rank imports the function it runs, so these live in a module rather than in the notebook. Each one
reads its rank from `torch.distributed` and returns plain values or tensors, which `launch` hands back to the
notebook as a list indexed by rank.
"""

import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minillm.distributed import collectives, data_parallel
from minillm.distributed.data_parallel import broadcast_parameters, data_parallel_step, shard
from minillm.distributed.zero import ShardedAdamW, optimizer_state_bytes
from minillm.models import GPT, GPTConfig
from minillm.train import lm_loss


# --- collectives ---------------------------------------------------------------------------------------

def collectives_demo(numel: int = 4, ring_numel: int = 1001) -> dict:
    """Run each collective on small tensors (rank r holds 10 r + 0, 10 r + 1, ...: `numel` values, a multiple of
    the world size) and return {collective: (this rank's input, its output)}; then the ring all-reduce and
    dist.all_reduce on the same random tensor of `ring_numel` values."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if numel % world_size:
        raise ValueError(f"collectives_demo: numel={numel} must be a multiple of the world size {world_size}")
    chunk = numel // world_size
    mine = torch.arange(numel, dtype=torch.float32) + 10 * rank  # (numel,)
    result = {}

    x = mine.clone()
    dist.broadcast(x, src=0)
    result["broadcast from rank 0"] = (mine, x)

    x = mine.clone()
    dist.all_reduce(x)
    result["all-reduce (sum)"] = (mine, x)

    x = torch.empty(chunk)
    dist.reduce_scatter_single(x, mine.clone())  # rank r gets the sum of chunk r
    result["reduce-scatter (sum)"] = (mine, x)

    piece = mine[rank * chunk:(rank + 1) * chunk].clone()  # (chunk,)
    x = torch.empty(numel)
    dist.all_gather_single(x, piece)  # every rank's piece, in rank order
    result["all-gather"] = (piece, x)

    values = torch.randn(ring_numel, generator=torch.Generator().manual_seed(rank))  # different on every rank
    ring, reference = values.clone(), values.clone()
    collectives.ring_all_reduce(ring)
    dist.all_reduce(reference)
    result["ring vs all_reduce"] = (ring, reference)
    return result


def stall(stuck_rank: int, seconds: float) -> None:
    """Rank `stuck_rank` hangs in its own code (a stuck data loader, say) while the others all-reduce."""
    if dist.get_rank() == stuck_rank:
        time.sleep(seconds)
    dist.all_reduce(torch.ones(4))


def fail(failing_rank: int) -> None:
    """Rank `failing_rank` raises before the all-reduce that the others wait in."""
    if dist.get_rank() == failing_rank:
        raise ValueError(f"rank {failing_rank} found a corrupt batch")
    dist.all_reduce(torch.ones(4))


# --- training: data parallel and ZeRO-1 against one process and torch's own wrappers ------------------

def make_model(config: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def replicas_agree(model: torch.nn.Module) -> bool:
    """True if every rank holds bit-identical parameters: the elementwise max over ranks equals the min."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return torch.equal(high, low)


OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def train_one_process(config: GPTConfig, seed: int, batches, optimizer: str,
                      **optimizer_kwargs) -> tuple[dict[str, torch.Tensor], int]:
    """The reference: one process, the whole global batch per step. Returns (parameters, optimizer-state bytes)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    model = make_model(config, seed)
    opt = OPTIMIZERS[optimizer](model.parameters(), **optimizer_kwargs)
    for inputs, targets in batches:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, inputs, targets).backward()
        opt.step()
    return parameters_of(model), optimizer_state_bytes(opt)


def train_data_parallel(model: GPT, batches, sgd: dict, bucket_numel: int, dist=torch.distributed) -> None:
    """Our data parallelism on this rank: one SGD `data_parallel_step` per global batch (weights already equal)."""
    opt = torch.optim.SGD(model.parameters(), **sgd)
    for inputs, targets in batches:
        data_parallel_step(model, opt, lm_loss, inputs, targets, bucket_numel, dist)


def train_zero1(model: GPT, batches, adamw: dict, bucket_numel: int, dist=torch.distributed) -> int:
    """Our ZeRO-1 on this rank: per global batch, backward on this rank's shard, the bucketed gradient average,
    then a `ShardedAdamW` step (weights already equal). Returns this rank's optimizer-state bytes."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    opt = ShardedAdamW(model.parameters(), dist=dist, **adamw)
    for inputs, targets in batches:
        opt.zero_grad()
        lm_loss(model, shard(inputs, rank, world_size), shard(targets, rank, world_size)).backward()
        data_parallel.all_reduce_gradients(list(model.parameters())[::-1], bucket_numel, dist)
        opt.step()
    return opt.state_bytes()


def train_distributed(config: GPTConfig, seed: int, batches, sgd: dict, adamw: dict, bucket_numel: int) -> dict:
    """On every rank, the same global batches trained four ways; returns each one's final parameters.
    `sgd` and `adamw` are the optimizers' keyword arguments (lr, ...).

    "ours, SGD" / "DDP, SGD": data parallel from scratch, then torch's DistributedDataParallel.
    "ours, ZeRO-1 AdamW" / "torch ZeRO, AdamW": ShardedAdamW, then DDP + ZeroRedundancyOptimizer; with the
    optimizer-state bytes each holds on this rank. Every model starts from a seed that differs per rank, so
    replicas agree only if rank 0's weights are broadcast.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = {}

    model = make_model(config, seed + rank)
    result["replicas agree at init"] = replicas_agree(model)
    broadcast_parameters(model)
    result["replicas agree after broadcast"] = replicas_agree(model)
    train_data_parallel(model, batches, sgd, bucket_numel)
    result["ours, SGD"] = parameters_of(model)

    model = make_model(config, seed + rank)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights in its constructor
    opt = torch.optim.SGD(ddp.parameters(), **sgd)
    for inputs, targets in batches:
        opt.zero_grad(set_to_none=True)
        lm_loss(ddp, shard(inputs, rank, world_size), shard(targets, rank, world_size)).backward()
        opt.step()
    result["DDP, SGD"] = parameters_of(model)

    model = make_model(config, seed + rank)
    broadcast_parameters(model)
    result["ours, ZeRO-1 AdamW: state bytes"] = train_zero1(model, batches, adamw, bucket_numel)
    result["ours, ZeRO-1 AdamW"] = parameters_of(model)

    from torch.distributed.optim import ZeroRedundancyOptimizer  # imports FSDP and more: seconds, so only here
    model = make_model(config, seed + rank)
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, **adamw)
    for inputs, targets in batches:
        opt.zero_grad(set_to_none=True)
        lm_loss(ddp, shard(inputs, rank, world_size), shard(targets, rank, world_size)).backward()
        opt.step()
    result["torch ZeRO, AdamW"] = parameters_of(model)
    result["torch ZeRO, AdamW: state bytes"] = optimizer_state_bytes(opt.optim)  # this rank's local AdamW
    return result

