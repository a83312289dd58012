"""Chapter 16's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; plugged into
the package on thread ranks, the three build exercises drive the chapter's comparisons with DDP and
ZeroRedundancyOptimizer and leave nothing behind.

The right answers are written here, not imported from minillm.distributed, so a bug there cannot hide a bug in
a check. The learner functions run on ranks that are threads (minillm.distributed.threads).
"""

import pytest
import torch

from minillm.distributed import collectives, data_parallel, launch, workers, zero
from minillm.distributed.threads import run_in_threads
from minillm.exercises import ch16, use
from minillm.models import GPTConfig
from minillm.pretrained import load_pretrained
from minillm.train import get_batch, story_tokens
from exercise_helpers import stub, outputs, run_three


# --- 16.1 ring all-reduce ---------------------------------------------------------------------------


def ring_all_reduce(tensor, dist):
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.view(-1).tensor_split(n)
    for phase in ("reduce", "gather"):
        for s in range(n - 1):
            send = (rank - s) % n if phase == "reduce" else (rank + 1 - s) % n
            receive = (send - 1) % n
            incoming = torch.empty_like(chunks[receive])
            request = dist.isend(chunks[send], (rank + 1) % n)
            dist.recv(incoming, (rank - 1) % n)
            request.wait()
            if phase == "reduce":
                chunks[receive].add_(incoming)
            else:
                chunks[receive].copy_(incoming)


def everyone_sends_everything(tensor, dist):  # right sums, but (N - 1) * n elements leave every rank
    rank, n = dist.get_rank(), dist.get_world_size()
    requests = [dist.isend(tensor.clone(), peer) for peer in range(n) if peer != rank]
    total = tensor.clone()
    for peer in range(n):
        if peer != rank:
            incoming = torch.empty_like(tensor)
            dist.recv(incoming, peer)
            total += incoming
    for request in requests:
        request.wait()
    tensor.copy_(total)


def blocking_sends_first(tensor, dist):  # every rank sends before anyone receives: deadlock
    rank, n = dist.get_rank(), dist.get_world_size()
    dist.send(tensor, (rank + 1) % n)
    incoming = torch.empty_like(tensor)
    dist.recv(incoming, (rank - 1) % n)


def test_ring_all_reduce_check(capsys):
    passed, stubbed, wrong = run_three(ch16.check_ring_all_reduce, ring_all_reduce, everyone_sends_everything, capsys)
    assert passed == "Exercise 16.1 (ring all-reduce): passed ✓"
    assert stubbed.startswith("Exercise 16.1 (ring all-reduce): not attempted yet")
    assert wrong.startswith("Exercise 16.1 (ring all-reduce): not yet ✗ - case 2: the sums are right, but rank 0 sent "
                            "20 elements (3 ranks, shape (10,))"), wrong


def test_ring_check_reports_a_deadlock_instead_of_hanging(capsys, monkeypatch):
    monkeypatch.setattr(ch16, "TIMEOUT_S", 0.5)
    ch16.check_ring_all_reduce(blocking_sends_first)
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 16.1 (ring all-reduce): not yet ✗ - case 1: your code raised TimeoutError: "
                           "rank "), line
    assert "deadlock" in line


def test_ring_check_rejects_the_library_all_reduce(capsys):
    ch16.check_ring_all_reduce(lambda tensor, dist: dist.all_reduce(tensor))
    (line,) = outputs(capsys)
    assert line == ("Exercise 16.1 (ring all-reduce): not yet ✗ - case 1: rank 0 called dist.all_reduce "
                    "(2 ranks, shape (8,)): build the sum from isend/recv only")


# --- 16.2 bucketed gradient all-reduce --------------------------------------------------------------


def all_reduce_gradients(params, bucket_numel, dist):
    buckets, current = [], []
    for p in params:
        if current and sum(q.numel() for q in current) + p.numel() > bucket_numel:
            buckets.append(current)
            current = []
        current.append(p)
    buckets.append(current)
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p.grad))


def one_all_reduce_per_parameter(params, bucket_numel, dist):  # right means, many small messages
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def summed_not_averaged(params, bucket_numel, dist):
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def test_all_reduce_gradients_check(capsys):
    passed, stubbed, wrong = run_three(ch16.check_all_reduce_gradients, all_reduce_gradients,
                                       one_all_reduce_per_parameter, capsys)
    assert passed == "Exercise 16.2 (bucketed gradient all-reduce): passed ✓"
    assert stubbed.startswith("Exercise 16.2 (bucketed gradient all-reduce): not attempted yet")
    assert wrong == ("Exercise 16.2 (bucketed gradient all-reduce): not yet ✗ - case 1: the gradients are right, but "
                     "the collectives differ (2 ranks, bucket_numel=16): expected 3 all_reduce calls of [12, 13, 7] "
                     "elements (one per bucket), got [('all_reduce', 12), ('all_reduce', 5), ('all_reduce', 8), "
                     "('all_reduce', 7)]")


def test_all_reduce_gradients_check_catches_a_sum(capsys):
    ch16.check_all_reduce_gradients(summed_not_averaged)
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 16.2 (bucketed gradient all-reduce): not yet ✗ - case 1: rank 0, gradient of "
                           "parameter 0 (2 ranks, bucket_numel=16): first mismatch at index (0, 0)"), line


# --- 16.3 ZeRO-1 step -------------------------------------------------------------------------------


@torch.no_grad()
def zero1_step(params, shard, optimizer, dist):
    rank, n, size = dist.get_rank(), dist.get_world_size(), shard.numel()
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = torch.cat([flat, flat.new_zeros(n * size - flat.numel())])
    shard.grad = flat[rank * size:(rank + 1) * size].clone()
    optimizer.step()
    gathered = torch.empty(n * size)
    dist.all_gather_single(gathered, shard.detach())
    numels = [p.numel() for p in params]
    for p, new in zip(params, gathered[:sum(numels)].split(numels)):
        p.copy_(new.view_as(p))


@torch.no_grad()
def forgets_the_all_gather(params, shard, optimizer, dist):  # each rank updates only its own slice
    rank, n, size = dist.get_rank(), dist.get_world_size(), shard.numel()
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = torch.cat([flat, flat.new_zeros(n * size - flat.numel())])
    shard.grad = flat[rank * size:(rank + 1) * size].clone()
    optimizer.step()
    numels = [p.numel() for p in params]
    mine = torch.cat([p.reshape(-1) for p in params] + [flat.new_zeros(n * size - sum(numels))])
    mine[rank * size:(rank + 1) * size] = shard
    for p, new in zip(params, mine[:sum(numels)].split(numels)):
        p.copy_(new.view_as(p))


@torch.no_grad()
def full_optimizer_on_every_rank(params, shard, optimizer, dist):  # right numbers, nothing sharded
    if not hasattr(full_optimizer_on_every_rank, "optimizers"):
        full_optimizer_on_every_rank.optimizers = {}
    key = id(params[0])
    if key not in full_optimizer_on_every_rank.optimizers:
        full_optimizer_on_every_rank.optimizers[key] = torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.99),
                                                                         weight_decay=0.1)
    with torch.enable_grad():
        full_optimizer_on_every_rank.optimizers[key].step()


def test_zero1_step_check(capsys):
    passed, stubbed, wrong = run_three(ch16.check_zero1_step, zero1_step, forgets_the_all_gather, capsys)
    assert passed == "Exercise 16.3 (ZeRO-1 step): passed ✓"
    assert stubbed.startswith("Exercise 16.3 (ZeRO-1 step): not attempted yet")
    assert wrong.startswith("Exercise 16.3 (ZeRO-1 step): not yet ✗ - case 1: rank 0, parameter 0 after 3 steps "
                            "(2 ranks): first mismatch at index (2, 1)"), wrong  # element 9: rank 1's slice


def test_zero1_check_wants_the_sharded_optimizer_used(capsys):
    ch16.check_zero1_step(full_optimizer_on_every_rank)
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 16.3 (ZeRO-1 step): not yet ✗ - case 1: rank "), line
    assert "holds no state" in line


# --- the plug-in: the learner's code inside the chapter's data parallelism and ZeRO-1, against torch ----------

DP_CLAIM = "data parallel on 2 thread ranks with your code equals DistributedDataParallel's weights bit for bit"
ZERO_CLAIM = "ZeRO-1 on 2 thread ranks with your code equals ZeroRedundancyOptimizer's weights bit for bit"


def ring_without_all_gather(tensor, dist):  # stops after the reduce-scatter: each rank has one finished chunk
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = tensor.view(-1).tensor_split(n)
    for s in range(n - 1):
        send, receive = (rank - s) % n, (rank - s - 1) % n
        incoming = torch.empty_like(chunks[receive])
        request = dist.isend(chunks[send], (rank + 1) % n)
        dist.recv(incoming, (rank - 1) % n)
        request.wait()
        chunks[receive].add_(incoming)


@pytest.fixture(scope="module")
def chapter_run():
    """A smaller twin of the chapter's section-4 experiment and what torch's DDP / ZeroRedundancyOptimizer made of
    it on 2 real processes (one launch for the whole module: spawning costs seconds)."""
    _, tokenizer = load_pretrained()
    tokens = story_tokens(tokenizer, "val")
    generator = torch.Generator().manual_seed(1)
    batches = [get_batch(tokens, 4, 16, generator) for _ in range(2)]  # (4, 16) inputs and targets
    config = GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=16, hidden_size=32, num_layers=1, num_heads=2)
    experiment = (config, 3, batches, dict(lr=0.1), dict(lr=1e-3, weight_decay=0.1), 5_000)
    return experiment, launch(workers.train_distributed, 2, args=experiment)


RIGHT_AND_WRONG = [  # component, end-to-end function, claim, the right answer, a known-wrong one
    ("ring_all_reduce", ch16.end_to_end_data_parallel, DP_CLAIM, ring_all_reduce, ring_without_all_gather),
    ("all_reduce_gradients", ch16.end_to_end_data_parallel, DP_CLAIM, all_reduce_gradients, summed_not_averaged),
    ("zero1_step", ch16.end_to_end_zero1, ZERO_CLAIM, zero1_step, forgets_the_all_gather),
]
IDS = [component for component, *_ in RIGHT_AND_WRONG]


def test_end_to_end_holds_on_the_package_itself(chapter_run, capsys):
    assert ch16.end_to_end_data_parallel(*chapter_run)
    assert ch16.end_to_end_zero1(*chapter_run)
    assert capsys.readouterr().out == f"{DP_CLAIM}: ✓\n{ZERO_CLAIM}: ✓\n"


@pytest.mark.parametrize("component, end_to_end, claim, right, wrong", RIGHT_AND_WRONG, ids=IDS)
def test_plug_in_verdict(chapter_run, component, end_to_end, claim, right, wrong, capsys):
    with use(**{component: right}):
        assert end_to_end(*chapter_run)
    with use(**{component: wrong}):
        assert not end_to_end(*chapter_run)
    right_line, wrong_line = capsys.readouterr().out.splitlines()
    assert right_line == f"{claim}: ✓"
    assert wrong_line.startswith(f"{claim}: ✗ - rank 0: "), wrong_line
    assert "differs from torch's by up to" in wrong_line


def test_plug_in_reports_a_crash_with_its_rank(chapter_run, capsys):
    def no_grad_attribute(params, bucket_numel, dist):
        params[0].grad = None
        params[0].grad.add_(1)

    with use(all_reduce_gradients=no_grad_attribute):
        assert not ch16.end_to_end_data_parallel(*chapter_run)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{DP_CLAIM}: ✗ - the run raised AttributeError on rank "), line


def test_plug_in_of_a_stub_is_skipped(chapter_run, capsys):
    for component, end_to_end, *_ in RIGHT_AND_WRONG:
        with use(**{component: stub}):
            end_to_end(*chapter_run)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" is not written")[0] for line in lines] == [
        "plug-in skipped: your ring_all_reduce (exercise 16.1)",
        "plug-in skipped: your all_reduce_gradients (exercise 16.2)",
        "plug-in skipped: your zero1_step (exercise 16.3)"]


@pytest.mark.parametrize("component, end_to_end, claim, right, wrong", RIGHT_AND_WRONG, ids=IDS)
def test_plug_in_leaves_the_package_unchanged(chapter_run, component, end_to_end, claim, right, wrong):
    originals = (collectives.ring_all_reduce, data_parallel.all_reduce_gradients, zero.zero1_step)
    experiment = chapter_run[0]
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    before = ch16._weights_on_thread_ranks(experiment, workers.train_zero1, experiment[4])
    with use(**{component: wrong}):
        end_to_end(*chapter_run)
    with pytest.raises(RuntimeError, match="boom"), use(**{component: right}):
        raise RuntimeError("boom")
    assert (collectives.ring_all_reduce, data_parallel.all_reduce_gradients, zero.zero1_step) == originals
    after = ch16._weights_on_thread_ranks(experiment, workers.train_zero1, experiment[4])
    assert all(torch.equal(b[name], a[name]) for b, a in zip(before, after) for name in b)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_end_to_end_wants_the_launch_results(chapter_run):
    with pytest.raises(ValueError, match="torch_ranks must be the 2 results"):
        ch16.end_to_end_zero1(chapter_run[0], [{"DDP, SGD": {}}])


def test_ring_dist_sums_only():
    def body(dist):
        collectives.RingDist(dist).all_reduce(torch.ones(3), op=torch.distributed.ReduceOp.MAX)

    with pytest.raises(ValueError, match="the ring sums, so op must be ReduceOp.SUM"):
        run_in_threads(body, 2)
