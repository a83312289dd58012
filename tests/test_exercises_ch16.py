"""Chapter 16's checks pass right answers, flag plausible wrong ones and wait for untouched stubs.

The right answers are written here, not imported from minillm.distributed, so a bug there cannot hide a bug in
a check. The learner functions run on ranks that are threads (minillm.distributed.threads).
"""

import torch

from minillm.exercises import ch16
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
