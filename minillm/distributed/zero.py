"""ZeRO stage 1 from scratch: each rank keeps the AdamW state of its own 1/N of the parameters.

Chapter 16 teaches this file and checks it against `torch.distributed.optim.ZeroRedundancyOptimizer`. In plain
data parallelism every rank holds the whole AdamW state: two fp32 moments per parameter, 8 bytes on top of the
4 of the weight, and N identical copies of it. ZeRO-1 (Rajbhandari et al., 2020) splits that state:

- lay all parameters end to end in one flat vector of n elements, padded to N * S with S = ceil(n / N);
- rank r owns elements [r * S, (r + 1) * S): it keeps their AdamW moments (2 * S floats, 1/N of the total),
  and steps only those elements, with the gradient already averaged over ranks (`all_reduce_gradients`);
- an all-gather then gives every rank every updated slice, so all replicas hold the full new weights again.

AdamW works element by element, so stepping slices computes the same numbers as stepping whole tensors.
Communication: this version all-reduces the whole gradient (2(N - 1)/N * n elements sent per rank on a ring) and
then all-gathers the weights ((N - 1)/N * n more), about 1.5 times plain data parallelism's traffic; chapter 16
measures it. A rank needs only its own slice of the gradient, so the paper's ZeRO-1 reduce-scatters it instead of
all-reducing, which brings the traffic back to data parallelism's (an all-reduce is a reduce-scatter plus an
all-gather). `torch.distributed.optim.ZeroRedundancyOptimizer` behind DDP also sends more than DDP alone: DDP
all-reduces the gradients, then each parameter's owner broadcasts its new value.
"""

import torch
import torch.distributed
import torch.nn.functional as F


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in `optimizer.state` (moments and step counters), as measured, not estimated."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def flatten_padded(tensors: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """The tensors laid end to end, zero-padded to a multiple of world_size elements: (N * S,)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (n,)
    return F.pad(flat, (0, -flat.numel() % world_size))  # (N * S,)


@torch.no_grad()
def zero1_step(params: list[torch.nn.Parameter], shard: torch.nn.Parameter, optimizer: torch.optim.Optimizer,
               dist=torch.distributed) -> None:
    """One ZeRO-1 step: step this rank's slice `shard` with `optimizer` (which owns only it), then all-gather.

    `params` hold the full weights and, in .grad, gradients already averaged over ranks; `shard` is this rank's
    slice of their flattened values, S elements starting at rank * S.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    size = shard.numel()  # S
    flat_grad = flatten_padded([p.grad for p in params], world_size)  # (N * S,)
    shard.grad = flat_grad[rank * size:(rank + 1) * size].clone()  # (S,): only our slice's gradient
    optimizer.step()
    gathered = torch.empty(world_size * size, dtype=shard.dtype)  # (N * S,)
    dist.all_gather_single(gathered, shard.detach())  # rank r's slice lands at [r * S, (r + 1) * S)
    numels = [p.numel() for p in params]
    for p, new in zip(params, gathered[:sum(numels)].split(numels)):  # the padding at the end is dropped
        p.copy_(new.view_as(p))


class ShardedAdamW:
    """AdamW with ZeRO-1 sharded state: `ShardedAdamW(params, lr=..., ...)`, then `step()` / `zero_grad()`.

    Takes AdamW's own arguments, applied to every element (no per-group weight decay: the flat slices cut across
    tensors). Call it after the gradients have been averaged over ranks.
    """

    def __init__(self, params, dist=torch.distributed, **adamw_kwargs):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ShardedAdamW got no parameters that require grad")
        self.dist = dist
        rank, world_size = dist.get_rank(), dist.get_world_size()
        flat = flatten_padded([p.detach() for p in self.params], world_size)  # (N * S,)
        size = flat.numel() // world_size  # S = ceil(n / N)
        self.shard = torch.nn.Parameter(flat[rank * size:(rank + 1) * size].clone())  # (S,) this rank's slice
        self.optimizer = torch.optim.AdamW([self.shard], **adamw_kwargs)  # state for S elements only

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        zero1_step(self.params, self.shard, self.optimizer, self.dist)

    def state_bytes(self) -> int:
        """This rank's optimizer-state bytes: about 1/N of a full AdamW's."""
        return optimizer_state_bytes(self.optimizer)
