"""Checks for chapter 16's exercises. Each runs the learner's function on every rank of a small world whose ranks
are threads of the notebook's process (minillm.distributed.threads), because a spawned process cannot import a
function defined in a notebook. The function gets `dist`, a stand-in with torch.distributed's functions; the same
code runs on real ranks when given `torch.distributed` itself.

The expected answers come from torch: `torch.stack(...).sum(0)` / `.mean(0)` of every rank's tensors, and
`torch.optim.AdamW` stepping the whole unsharded model.

All three are build exercises. Plugged in with `use(...)`, they run inside the chapter's data parallelism and
ZeRO-1 on 2 thread ranks whose every all-reduce goes around the ring (`collectives.RingDist`), and
`end_to_end_data_parallel` / `end_to_end_zero1` compare the weights after the chapter's 3 steps with what
`DistributedDataParallel` and `ZeroRedundancyOptimizer` computed on 2 real processes.
"""

import math

import torch

from minillm.distributed import collectives, data_parallel, workers
from minillm.distributed.data_parallel import make_buckets
from minillm.distributed.threads import run_in_threads
from minillm.distributed.zero import ShardedAdamW, optimizer_state_bytes
from minillm.exercises import Mismatch, check, exercise, expect_equal, verdict
from minillm.train import lm_loss

TIMEOUT_S = 3.0  # how long a rank waits for a partner before the check calls it a deadlock


def _randn(shape, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale - 1.0


@exercise("16.1", "ring all-reduce", kind="build", component="ring_all_reduce",
          replaces="minillm.distributed.collectives:ring_all_reduce",
          hides=("collectives.ring_all_reduce", "collectives.ring_steps", "ring_all_reduce", "ring_steps"))
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
    check("16.1", cases,
          hint="cut the flat tensor into N chunks; in N - 1 steps every rank passes one partial sum to its right "
               "neighbour and adds the one arriving from its left, then in N - 1 more steps the finished sums travel "
               "around the ring the same way, copied instead of added",
          more="number the steps s = 0, 1, ...: what a rank sends at step s is the chunk it received (and added to) "
               "at step s - 1, so if rank r starts by sending its own chunk r, each step moves one chunk index down, "
               "mod N. After the first phase rank r holds one finished chunk, the one next to its own in the ring; the "
               "second phase starts by sending that one. Post the send with isend, then recv, then wait() on the send "
               "before the next step writes into a chunk: a rank that sends with a blocking send first waits forever.")


@exercise("16.2", "bucketed gradient all-reduce", kind="build", component="all_reduce_gradients",
          replaces="minillm.distributed.data_parallel:all_reduce_gradients",
          hides=("data_parallel.all_reduce_gradients", "data_parallel.make_buckets", "all_reduce_gradients",
                 "make_buckets"))
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
    check("16.2", cases,
          hint="the mean over ranks is the all-reduced sum divided by the world size; a bucket is one flat tensor "
               "holding several gradients end to end, so one collective carries all of them",
          more="walk params in the order given with a running count of elements, and start a new bucket when the next "
               "gradient would push the count past bucket_numel (a bucket is never empty, so a large gradient sits "
               "alone). torch.cat of the flattened gradients makes a bucket's tensor, which is a copy: after the "
               "all-reduce, split it by the gradients' sizes and write each piece back into its p.grad.")


@exercise("16.3", "ZeRO-1 step", kind="build", component="zero1_step", replaces="minillm.distributed.zero:zero1_step",
          hides=("zero.zero1_step", "zero1_step"))
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
    check("16.3", cases,
          hint="lay the gradients end to end like the weights, give the shard its own slice of them, let the "
               "optimizer step the shard, then every rank needs every rank's new slice back in its parameters",
          more="the flat gradient needs the same zero padding at the end as the flat weights had (to N * S elements), "
               "and rank r's slice starts at r * S. The optimizer reads shard.grad. all_gather_single fills a tensor "
               "of N * S elements in rank order; drop the padding, split by the parameters' sizes, and copy each "
               "piece into its parameter with the parameter's shape (under torch.no_grad(): they are leaves that "
               "require grad).")


# --- the plugged-in end-to-end checks: the chapter's 3 steps on thread ranks against torch's wrappers ----------

E2E_TIMEOUT_S = 60.0  # per wait for a partner: a rank's forward and backward come between two collectives


def _weights_on_thread_ranks(experiment: tuple, train, settings: dict) -> list[dict[str, torch.Tensor]]:
    """On 2 thread ranks, each with the model `workers.make_model` gives it (seed + rank, as on the chapter's
    processes) and a `dist` whose all-reduce is the ring: broadcast rank 0's weights, then
    `train(model, batches, settings, bucket_numel, dist)`; return each rank's final parameters.

    Every rank computes with one CPU thread, as `launch` sets its processes to: the same kernels on the same
    shapes, so local arithmetic matches the processes' bit for bit. The global random state is left unchanged.
    """
    config, seed, batches, _, _, bucket_numel = experiment
    with torch.random.fork_rng(devices=[]):  # model init draws from the global generator: not inside threads
        models = [workers.make_model(config, seed + rank) for rank in range(2)]

    def rank_body(dist, model):
        torch.set_num_threads(1)
        ring = collectives.RingDist(dist)
        data_parallel.broadcast_parameters(model, ring)
        train(model, batches, settings, bucket_numel, ring)
        return workers.parameters_of(model)

    threads = torch.get_num_threads()
    try:
        results, _ = run_in_threads(rank_body, 2, [(model,) for model in models], E2E_TIMEOUT_S)
    finally:
        torch.set_num_threads(threads)
    return results


def _compare(claim: str, experiment: tuple, torch_ranks: list[dict], key: str, train, settings: dict) -> bool:
    """Train on thread ranks, then compare each rank's weights with `torch_ranks[rank][key]` bit for bit."""
    if len(torch_ranks) != 2 or not all(key in rank for rank in torch_ranks):
        raise ValueError(f"torch_ranks must be the 2 results of launch(workers.train_distributed, 2, args=experiment), "
                         f"each with a {key!r} entry")
    try:
        ranks = _weights_on_thread_ranks(experiment, train, settings)
    except NotImplementedError:
        raise
    except Exception as error:  # noqa: BLE001 - the learner's code broke the run: report it, do not crash the cell
        where = f" on rank {error.rank}" if hasattr(error, "rank") else ""
        return verdict(False, claim, f"the run raised {type(error).__name__}{where}: {error}")
    for rank, (ours, theirs) in enumerate(zip(ranks, torch_ranks)):
        for name, expected in theirs[key].items():
            if not torch.equal(ours[name], expected):
                delta = (ours[name] - expected).abs().max().item()
                return verdict(False, claim, f"rank {rank}: {name} differs from torch's by up to {delta:.3g}")
    return verdict(True, claim)


def end_to_end_data_parallel(experiment: tuple, torch_ranks: list[dict]) -> bool:
    """Plug-in verdict for 16.1 and 16.2: section 4's data parallelism (`broadcast_parameters`, then
    `workers.train_data_parallel`: 3 SGD steps) on 2 thread ranks whose every all-reduce goes around the ring,
    against DDP's weights from the chapter's launch.

    `experiment` is the (config, seed, batches, sgd, adamw, bucket_numel) given to
    `launch(workers.train_distributed, 2, args=experiment)` and `torch_ranks` what that launch returned. Bit for
    bit is the right test: both sides run the same local forward and backward on the same shards, and with 2
    ranks every gradient element is averaged by one addition of two halves (the ring's, gloo's and DDP's alike;
    halving is exact), the same sum in either operand order.
    """
    claim = "data parallel on 2 thread ranks with your code equals DistributedDataParallel's weights bit for bit"
    return _compare(claim, experiment, torch_ranks, "DDP, SGD", workers.train_data_parallel, experiment[3])


def end_to_end_zero1(experiment: tuple, torch_ranks: list[dict]) -> bool:
    """Plug-in verdict for 16.3 (16.1 and 16.2 take part too): section 5's ZeRO-1 (`broadcast_parameters`, then
    `workers.train_zero1`, whose `ShardedAdamW` steps with `zero1_step`) on 2 thread ranks, against DDP +
    ZeroRedundancyOptimizer from the chapter's launch.

    Bit for bit, as in section 5: the averaged gradients are DDP's bit for bit (see `end_to_end_data_parallel`)
    and AdamW's update is elementwise, so stepping a flat slice computes the same numbers as stepping whole tensors.
    """
    claim = "ZeRO-1 on 2 thread ranks with your code equals ZeroRedundancyOptimizer's weights bit for bit"
    return _compare(claim, experiment, torch_ranks, "torch ZeRO, AdamW", workers.train_zero1, experiment[4])
