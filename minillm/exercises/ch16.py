"""Checks for chapter 16's exercises. Each runs the learner's function on every rank of a small world whose ranks
are threads of the notebook's process (minillm.distributed.threads), because a spawned process cannot import a
function defined in a notebook. The function gets `dist`, a stand-in with torch.distributed's functions; the same
code runs on real ranks when given `torch.distributed` itself.

The expected answers come from torch: `torch.stack(...).sum(0)` / `.mean(0)` of every rank's tensors, and
`torch.optim.AdamW` stepping the whole unsharded model.
"""

import math

import torch

from minillm.distributed.data_parallel import make_buckets
from minillm.distributed.threads import run_in_threads
from minillm.distributed.zero import ShardedAdamW, optimizer_state_bytes
from minillm.exercises import Mismatch, check, expect_equal

TIMEOUT_S = 3.0  # how long a rank waits for a partner before the check calls it a deadlock


def _randn(shape, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale - 1.0


def check_ring_all_reduce(ring_all_reduce) -> None:
    """Exercise 16.1: `ring_all_reduce(tensor, dist)` sums `tensor` over all ranks in place with dist.isend /
    dist.recv around a ring; every rank sends at most 2(N - 1) chunks of ceil(n / N) elements."""
    def case(world_size, shape, seed):
        def run():
            inputs = [_randn(shape, seed + rank) for rank in range(world_size)]
            expected = torch.stack(inputs).sum(0)

            def rank_body(dist, tensor):
                ring_all_reduce(tensor, dist)
                return tensor
            results, ranks = run_in_threads(rank_body, world_size, [(x.clone(),) for x in inputs], TIMEOUT_S)
            label = f"{world_size} ranks, shape {tuple(shape)}"
            for rank, got in enumerate(results):
                expect_equal(got, expected, what=f"rank {rank}'s tensor after the call ({label})", atol=1e-5)
            for rank, d in enumerate(ranks):
                if d.collectives:
                    raise Mismatch(f"rank {rank} called dist.{d.collectives[0][0]} ({label}): build the sum from "
                                   f"isend/recv only")
            numel = math.prod(shape)
            bound = 2 * (world_size - 1) * math.ceil(numel / world_size)
            rank, sent = max(enumerate(d.sent_numel for d in ranks), key=lambda pair: pair[1])
            if sent > bound:
                raise Mismatch(f"the sums are right, but rank {rank} sent {sent} elements ({label}); in a ring each "
                               f"rank sends 2(N-1) chunks of at most ceil(n/N) elements, {bound} in all")
        return run

    cases = [case(2, (8,), 1), case(3, (10,), 2), case(4, (2, 5), 3), case(4, (3,), 4), case(3, (6, 7), 5)]
    check("Exercise 16.1 (ring all-reduce)", cases,
          hint="chunks = tensor.view(-1).tensor_split(N); reduce-scatter: at step s send chunk (rank - s) % N to "
               "rank + 1, recv chunk (rank - s - 1) % N from rank - 1 and add it; all-gather: send chunk "
               "(rank + 1 - s) % N, recv chunk (rank - s) % N and copy it. isend first, then recv, then wait()")


def check_all_reduce_gradients(all_reduce_gradients) -> None:
    """Exercise 16.2: `all_reduce_gradients(params, bucket_numel, dist)` replaces every p.grad by its mean over
    ranks with one dist.all_reduce per bucket: params in the order given, a bucket closed when the next
    gradient would take it past bucket_numel elements."""
    def case(world_size, shapes, bucket_numel, seed):
        def run():
            grads = [[_randn(shape, seed + 100 * rank + i) for i, shape in enumerate(shapes)]
                     for rank in range(world_size)]
            expected = [torch.stack([grads[rank][i] for rank in range(world_size)]).mean(0) for i in range(len(shapes))]

            def rank_body(dist, rank_grads):
                params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
                for p, g in zip(params, rank_grads):
                    p.grad = g.clone()
                all_reduce_gradients(params, bucket_numel, dist)
                return [p.grad for p in params]
            results, ranks = run_in_threads(rank_body, world_size, [(g,) for g in grads], TIMEOUT_S)
            label = f"{world_size} ranks, bucket_numel={bucket_numel}"
            for rank, got in enumerate(results):
                for i, (g, e) in enumerate(zip(got, expected)):
                    expect_equal(g, e, what=f"rank {rank}, gradient of parameter {i} ({label})", atol=1e-6)
            plan = [sum(p.numel() for p in bucket) for bucket in make_buckets([torch.empty(s) for s in shapes],
                                                                                bucket_numel)]
            calls = ranks[0].collectives
            if calls != [("all_reduce", n) for n in plan]:
                raise Mismatch(f"the gradients are right, but the collectives differ ({label}): expected "
                               f"{len(plan)} all_reduce calls of {plan} elements (one per bucket), got {calls}")
        return run

    shapes = [(3, 4), (5,), (2, 2, 2), (7,)]  # 12, 5, 8 and 7 elements
    cases = [case(2, shapes, 16, 1), case(3, shapes, 1000, 2), case(2, shapes, 1, 3), case(4, [(5, 3), (1,)], 15, 4)]
    check("Exercise 16.2 (bucketed gradient all-reduce)", cases,
          hint="fill a list of params until the next one would pass bucket_numel; for each bucket: flat = "
               "torch.cat([p.grad.reshape(-1) ...]); dist.all_reduce(flat); flat /= dist.get_world_size(); "
               "copy flat.split(sizes) back into the grads")


def check_zero1_step(zero1_step) -> None:
    """Exercise 16.3: `zero1_step(params, shard, optimizer, dist)` steps this rank's slice `shard` (S elements of
    the flattened params, starting at rank * S) with `optimizer`, which owns only it, then all-gathers the slices
    into every rank's params. After 3 steps the params must equal torch's AdamW on the whole model."""
    def case(world_size, shapes, seed):
        def run():
            initial = [_randn(shape, seed + i, scale=0.5) for i, shape in enumerate(shapes)]
            grads = [[_randn(shape, seed + 10 * step + i + 50) for i, shape in enumerate(shapes)] for step in range(3)]
            adamw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
            reference = [torch.nn.Parameter(x.clone()) for x in initial]
            reference_optimizer = torch.optim.AdamW(reference, **adamw)
            for step_grads in grads:
                for p, g in zip(reference, step_grads):
                    p.grad = g.clone()
                reference_optimizer.step()

            def rank_body(dist):
                params = [torch.nn.Parameter(x.clone()) for x in initial]
                sharded = ShardedAdamW(params, dist=dist, **adamw)
                for step_grads in grads:  # already averaged over ranks: the same on every rank
                    for p, g in zip(params, step_grads):
                        p.grad = g.clone()
                    zero1_step(params, sharded.shard, sharded.optimizer, dist)
                return [p.detach() for p in params], optimizer_state_bytes(sharded.optimizer)
            results, _ = run_in_threads(rank_body, world_size, None, TIMEOUT_S)
            label = f"{world_size} ranks"
            for rank, (params, state_bytes) in enumerate(results):
                if state_bytes == 0:
                    raise Mismatch(f"rank {rank}'s optimizer holds no state ({label}): step the optimizer you are "
                                   f"given - it owns this rank's slice and nothing else")
                for i, (got, expected) in enumerate(zip(params, reference)):
                    expect_equal(got, expected.detach(), what=f"rank {rank}, parameter {i} after 3 steps ({label})",
                                 atol=1e-6)
        return run

    cases = [case(2, [(3, 4), (5,)], 1), case(3, [(4, 4), (7,), (2, 3)], 2), case(4, [(10,)], 3)]
    check("Exercise 16.3 (ZeRO-1 step)", cases,
          hint="flat = cat of p.grad.reshape(-1), padded to N * S; shard.grad = flat[rank*S:(rank+1)*S]; "
               "optimizer.step(); dist.all_gather_single(out, shard.detach()) into an (N*S,) tensor; copy "
               "out.split(numels) back into the params (inside torch.no_grad())")
