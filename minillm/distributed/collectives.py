"""The ring all-reduce, written from point-to-point sends and receives.

Chapter 16 teaches this file and checks it against `torch.distributed.all_reduce`. An all-reduce leaves on every
rank the sum of every rank's tensor. The ring version cuts the tensor into N chunks and passes chunks around a
ring of ranks (each sends to rank + 1 and receives from rank - 1):

1. reduce-scatter, N - 1 steps: each rank adds the chunk that arrives to its own copy and passes the sum on;
   afterwards rank r holds the finished sum of chunk (r + 1) mod N.
2. all-gather, N - 1 steps: the finished chunks travel once more around the ring, overwriting stale copies.

Each rank sends 2(N - 1) chunks of n / N elements: 2(N - 1)/N * n, under 2n however many ranks there are. That is
why NCCL and gloo use rings (and trees) rather than sending everything to one rank.

Functions take `dist`, the module `torch.distributed` or anything with its functions: the chapter's exercises
pass the thread-backed stand-in of minillm.distributed.threads. `RingDist` wraps such a `dist` so that its
`all_reduce` is this ring: chapter 16 runs its data parallelism and ZeRO-1 on thread ranks over it.
"""

import torch
import torch.distributed


def ring_steps(rank: int, world_size: int) -> list[tuple[str, int, int]]:
    """(phase, chunk sent to the right, chunk received from the left) for each of rank's 2(N - 1) steps.

    At step s of the reduce-scatter, rank r sends chunk r - s, the partial sum it received one step earlier,
    and receives chunk r - s - 1 (mod N). In the all-gather it sends the finished chunk it got last.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"ring_steps: rank must be in 0..{world_size - 1}, got {rank}")
    reduce = [("reduce", (rank - s) % world_size, (rank - s - 1) % world_size) for s in range(world_size - 1)]
    gather = [("gather", (rank + 1 - s) % world_size, (rank - s) % world_size) for s in range(world_size - 1)]
    return reduce + gather


def ring_all_reduce(tensor: torch.Tensor, dist=torch.distributed) -> torch.Tensor:
    """Sum `tensor` over all ranks in place, as `dist.all_reduce(tensor)` does, with isend/recv around a ring."""
    if not tensor.is_contiguous():
        raise ValueError("ring_all_reduce needs a contiguous tensor (as dist.all_reduce does); pass "
                         "tensor.contiguous() and use the result")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    chunks = tensor.view(-1).tensor_split(world_size)  # N views; sizes differ by at most one element
    for phase, send_index, recv_index in ring_steps(rank, world_size):
        incoming = torch.empty_like(chunks[recv_index])
        # isend first, then recv: if every rank did a blocking send first, each would wait for its right
        # neighbour to receive, and none would ever get to its recv (gloo does block on large sends).
        request = dist.isend(chunks[send_index], right)
        dist.recv(incoming, left)
        request.wait()  # a chunk must not change before its send completes; a later step writes into it
        if phase == "reduce":
            chunks[recv_index].add_(incoming)
        else:
            chunks[recv_index].copy_(incoming)
    return tensor


class RingDist:
    """`dist` with every `all_reduce` done by `ring_all_reduce` over dist's own isend/recv; the rest passes through.

    The ring is looked up at call time, so the chapter's exercise 16.1 can swap in the learner's. Sums only (the
    ring adds), as data parallelism needs.
    """

    def __init__(self, dist):
        self.dist = dist

    def __getattr__(self, name: str):
        return getattr(self.dist, name)

    def all_reduce(self, tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> None:
        if op != torch.distributed.ReduceOp.SUM:
            raise ValueError(f"RingDist.all_reduce: the ring sums, so op must be ReduceOp.SUM, got {op}")
        ring_all_reduce(tensor, self.dist)
