"""Data parallelism from scratch: replicate the model, shard the batch, all-reduce the gradients in buckets, step.

Chapter 16 teaches this file and checks it against one process training on the whole batch and against
`torch.nn.parallel.DistributedDataParallel` (DDP). One step on N ranks:

1. every rank holds the same weights (`broadcast_parameters` copies rank 0's once, at the start);
2. every rank runs forward and backward on its own 1/N of the global batch (`shard`);
3. the gradients are averaged over ranks (`all_reduce_gradients`): the mean of N equal-sized shards' mean-loss
   gradients is the gradient of the mean loss over the whole batch;
4. every rank takes the same optimizer step on the same gradient, so the replicas stay identical.

Buckets: one all-reduce per parameter tensor means hundreds of small messages, each paying a fixed latency;
concatenating gradients into buckets of about `bucket_numel` elements sends a few large ones. DDP does the same
(25 MB buckets) and also starts a bucket's all-reduce while backward is still computing earlier layers' gradients;
this version waits for backward to finish, which computes the same numbers.
"""

import torch
import torch.distributed


def broadcast_parameters(model: torch.nn.Module, dist=torch.distributed, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank `src`'s, so that all replicas start equal."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src)


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size of the batch's rows: (B, ...) -> (B / world_size, ...)."""
    if batch.shape[0] % world_size:
        raise ValueError(f"shard: the batch's {batch.shape[0]} rows do not split evenly over {world_size} ranks; "
                         f"use a global batch size divisible by the world size (unequal shards would weight "
                         f"some examples more in the averaged gradient)")
    rows = batch.shape[0] // world_size
    return batch[rank * rows:(rank + 1) * rows]


def make_buckets(params: list[torch.nn.Parameter], bucket_numel: int) -> list[list[torch.nn.Parameter]]:
    """Group params, in the order given, into buckets of at most `bucket_numel` elements each.

    A bucket is closed when the next parameter would not fit; a parameter larger than `bucket_numel` gets a
    bucket of its own.
    """
    if not isinstance(bucket_numel, int) or bucket_numel < 1:
        raise ValueError(f"make_buckets: bucket_numel must be a positive int, got {bucket_numel!r}")
    buckets, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return buckets + [current] if current else buckets


@torch.no_grad()
def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_numel: int, dist=torch.distributed) -> None:
    """Replace each parameter's .grad by its mean over all ranks, one all-reduce per bucket."""
    world_size = dist.get_world_size()
    for bucket in make_buckets([p for p in params if p.grad is not None], bucket_numel):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (bucket numel,): one message, not len(bucket)
        flat /= world_size  # divide first, as DDP does: a sum of N unscaled fp16 gradients could overflow
        dist.all_reduce(flat)
        for p, grad in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(grad.view_as(p.grad))


def data_parallel_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, inputs: torch.Tensor,
                       targets: torch.Tensor, bucket_numel: int, dist=torch.distributed) -> float:
    """One data-parallel step on a GLOBAL batch (every rank passes the same one); returns this rank's loss.

    Buckets are filled from the last parameter to the first: backward produces the last layers' gradients
    first, which is the order DDP uses too.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, shard(inputs, rank, world_size), shard(targets, rank, world_size))
    loss.backward()
    all_reduce_gradients(list(model.parameters())[::-1], bucket_numel, dist)
    optimizer.step()
    return loss.item()
