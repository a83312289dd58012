"""minillm.distributed against torch.distributed (gloo, CPU, 127.0.0.1 only), DDP, ZeroRedundancyOptimizer and
accelerate.

Real 2-process runs go through `launch`; each is bounded (timeout=60 s, collectives 20 s) and `launch` stops and
reaps its processes even when a test fails, which `no_leftover_processes` checks after every test. Expected values
come from torch run in the test: dist.all_reduce beside the ring, one process on the whole batch beside data
parallelism, DDP and ZeroRedundancyOptimizer beside ours, the undispatched model beside accelerate's.
"""

import importlib
import math
import multiprocessing
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.distributed import (WorkerError, all_reduce_gradients, launch, make_buckets, ring_all_reduce,
                                 run_in_threads, shard)
from minillm.distributed import workers
from minillm.distributed.pictures import ring_contributions
from minillm.models import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
launch_module = importlib.import_module("minillm.distributed.launch")  # the module; the package exports the function
RUN = dict(timeout=60.0, collective_timeout=20.0)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    assert multiprocessing.active_children() == [], "launch left rank processes running; _stop must reap them"


# --- the rendezvous listens on loopback only -----------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The addresses this machine's TCP sockets on `port` listen on, read from the kernel's own tables."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads listening sockets from /proc/net/tcp{,6} (Linux)")
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if int(local_port, 16) == port and state == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(socket.inet_ntop(family, raw))
    return addresses


def test_launch_store_listens_on_loopback_only(monkeypatch):
    store = launch_module.loopback_store(timeout=5.0)
    assert listening_addresses(store.port) == {"127.0.0.1"}, \
        "the store must listen on 127.0.0.1 only, not on every interface ('::' or '0.0.0.0')"
    # The listener is the store's: a client on loopback gets in, and the port closes with the store.
    client = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False)
    client.set("key", "value")
    assert store.get("key") == b"value"
    port = store.port
    del client, store
    assert listening_addresses(port) == set(), "deleting the store must close its port"

    def refuse(*args, **kwargs):
        raise RuntimeError("launch built its store here")
    monkeypatch.setattr(launch_module, "loopback_store", refuse)
    with pytest.raises(RuntimeError, match="launch built its store here"):
        launch(workers.collectives_demo, 2, **RUN)  # stops before any process starts


# --- launch: results, errors, timeouts --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return launch(workers.collectives_demo, 2, **RUN)


def test_collectives_match_their_definitions(demo):
    before = [rank_result["all-reduce (sum)"][0] for rank_result in demo]  # rank r: 10 r + (0, 1, 2, 3)
    total = torch.stack(before).sum(0)
    pieces = [result["all-gather"][0] for result in demo]
    for rank, result in enumerate(demo):
        assert torch.equal(result["broadcast from rank 0"][1], before[0]), "broadcast must copy rank 0's tensor"
        assert torch.equal(result["all-reduce (sum)"][1], total), "all-reduce must leave the sum on every rank"
        assert torch.equal(result["reduce-scatter (sum)"][1], total.chunk(2)[rank]), "rank r gets chunk r's sum"
        assert torch.equal(pieces[rank], before[rank].chunk(2)[rank])
        assert torch.equal(result["all-gather"][1], torch.cat(pieces)), (
            "all-gather must concatenate every rank's piece in rank order")


def test_ring_all_reduce_equals_dist_all_reduce_on_two_processes(demo):
    for result in demo:
        ring, reference = result["ring vs all_reduce"]
        # Two ranks: each element is a + b on both sides, and float addition is commutative, so bit for bit.
        assert torch.equal(ring, reference), "the ring all-reduce must equal gloo's all_reduce bit for bit on 2 ranks"


def test_a_failing_rank_surfaces_its_exception_and_traceback():
    start = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        launch(workers.fail, 2, args=(1,), **RUN)
    assert caught.value.rank == 1, "the rank that raised first is the one to report"
    assert caught.value.last_line == "ValueError: rank 1 found a corrupt batch"
    assert 'in fail\n    raise ValueError' in caught.value.traceback, "the worker's own traceback must come back"
    assert time.monotonic() - start < 45, "a failing run must end promptly, not wait for the other rank's timeout"


def test_a_stalled_collective_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        launch(workers.stall, 2, args=(1, 120.0), timeout=60.0, collective_timeout=2.0)
    assert caught.value.rank == 0, "rank 0 waits in all_reduce and must be the one that times out"
    assert "Timed out" in caught.value.last_line, caught.value.last_line
    assert time.monotonic() - start < 45, "collective_timeout=2 must end the run long before rank 1 wakes up"


def test_the_whole_run_has_a_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within timeout=3.0 s"):
        launch(workers.stall, 1, args=(0, 120.0), timeout=3.0)
    assert time.monotonic() - start < 20


def notebook_style_function():
    return 1


def test_launch_refuses_functions_a_new_process_cannot_import(monkeypatch):
    with pytest.raises(TypeError, match="cannot be imported by a new process"):
        launch(lambda: 1, 2)
    main = sys.modules["__main__"]
    monkeypatch.setattr(notebook_style_function, "__module__", "__main__")
    monkeypatch.delattr(main, "__file__", raising=False)  # an interactive __main__, as in Jupyter
    with pytest.raises(TypeError, match="defined in a notebook"):
        launch(notebook_style_function, 2)


@pytest.mark.parametrize("kwargs, message", [(dict(world_size=0), "world_size must be a positive int"),
                                             (dict(world_size=2, timeout=0), "timeouts must be positive")])
def test_launch_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(workers.fail, **kwargs)


# --- data parallel and ZeRO-1 on 2 processes ---------------------------------------------------------

CONFIG = GPTConfig(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=2)
SGD = dict(lr=0.1)
ADAMW = dict(lr=1e-3, weight_decay=0.1)


@pytest.fixture(scope="module")
def training():
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 6, 17), generator=torch.Generator().manual_seed(0))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]  # 3 global batches of (6, 16): 3 rows per rank
    ranks = launch(workers.train_distributed, 2, args=(CONFIG, 0, batches, SGD, ADAMW, 3000), **RUN)
    sgd, _ = workers.train_one_process(CONFIG, 0, batches, "sgd", **SGD)
    adamw, adamw_bytes = workers.train_one_process(CONFIG, 0, batches, "adamw", **ADAMW)
    return ranks, sgd, adamw, adamw_bytes


def max_delta(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_broadcast_makes_replicas(training):
    for result in training[0]:
        assert not result["replicas agree at init"], "ranks are seeded differently, so they must start different"
        assert result["replicas agree after broadcast"], "broadcast_parameters must copy rank 0's weights everywhere"


def test_data_parallel_equals_one_process_and_ddp(training):
    ranks, sgd, _, _ = training
    for result in ranks:
        # One process sums the weight gradients over all 6 rows at once; two ranks sum 3 rows each and then
        # add: the same numbers in another order, so float32 rounding (~6e-8 relative per add) differs. After 3
        # SGD steps of lr 0.1 that moves weights by well under 1e-6; forgetting to average would move them by
        # about lr * |grad|, orders of magnitude more.
        assert max_delta(result["ours, SGD"], sgd) < 1e-6, "data parallel must equal one process on the whole batch"
        # DDP computes the same local gradients and averages them the same way (divide by N, then sum).
        assert max_delta(result["ours, SGD"], result["DDP, SGD"]) == 0, "ours must equal DDP bit for bit"
    assert max_delta(ranks[0]["ours, SGD"], ranks[1]["ours, SGD"]) == 0, "replicas must stay identical"


def test_zero1_equals_zero_redundancy_optimizer_and_adamw(training):
    ranks, _, adamw, _ = training
    for result in ranks:
        # AdamW is elementwise: stepping slices of a flat vector computes exactly what stepping whole tensors does.
        assert max_delta(result["ours, ZeRO-1 AdamW"], result["torch ZeRO, AdamW"]) == 0
        # Against one process, the gradients differ by rounding as above; Adam divides by sqrt(v), which can
        # turn a relative gradient difference of 1e-7 into the same relative update difference: < 1e-5 after 3
        # steps of lr 1e-3.
        assert max_delta(result["ours, ZeRO-1 AdamW"], adamw) < 1e-5
    assert max_delta(ranks[0]["ours, ZeRO-1 AdamW"], ranks[1]["ours, ZeRO-1 AdamW"]) == 0


def test_zero1_holds_half_the_optimizer_state_per_rank(training):
    ranks, _, adamw, full_bytes = training
    numel = sum(p.numel() for name, p in adamw.items() if name != "lm_head.weight")  # tied to wte
    for result in ranks:
        ours = result["ours, ZeRO-1 AdamW: state bytes"]
        assert ours == 2 * 4 * math.ceil(numel / 2) + 4, "two fp32 moments for ceil(n/2) elements plus a step count"
        assert abs(ours - full_bytes / 2) / full_bytes < 0.01, f"{ours} bytes is not about half of {full_bytes}"
    torch_bytes = [result["torch ZeRO, AdamW: state bytes"] for result in ranks]
    assert sum(torch_bytes) == full_bytes, "ZeroRedundancyOptimizer's shards must add up to one full AdamW state"


# --- the same functions on thread ranks, and the pieces ----------------------------------------------


@pytest.mark.parametrize("world_size, shape", [(3, (10,)), (4, (2, 5)), (4, (3,)), (5, (17, 3))])
def test_ring_all_reduce_on_thread_ranks(world_size, shape):
    inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(r)) for r in range(world_size)]
    results, ranks = run_in_threads(lambda dist, x: ring_all_reduce(x, dist), world_size,
                                    [(x.clone(),) for x in inputs])
    expected = torch.stack(inputs).sum(0)
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # summed in another order than stack().sum()
    bound = 2 * (world_size - 1) * math.ceil(math.prod(shape) / world_size)
    assert max(d.sent_numel for d in ranks) <= bound, "a ring sends 2(N-1) chunks per rank"


def test_ring_rejects_a_non_contiguous_tensor():
    with pytest.raises(ValueError, match="needs a contiguous tensor"):
        run_in_threads(lambda dist: ring_all_reduce(torch.zeros(4, 4).t(), dist), 2)


def test_ring_picture_ends_with_every_chunk_summed_everywhere():
    for world_size in (2, 3, 5):
        final = ring_contributions(world_size)[-1]
        assert all(chunk == set(range(world_size)) for row in final for chunk in row)


def test_thread_ranks_report_a_deadlock():
    def sends_first(dist):
        dist.send(torch.zeros(3), 1 - dist.get_rank())
    with pytest.raises(TimeoutError, match="deadlock"):
        run_in_threads(sends_first, 2, timeout=0.5)


def test_thread_ranks_reject_bad_peers_and_shapes():
    with pytest.raises(ValueError, match=r"peer rank must be an int in 0..1 other than itself, got [01]"):
        run_in_threads(lambda dist: dist.send(torch.zeros(1), dist.get_rank()), 2)

    def mismatched_recv(dist):
        if dist.get_rank() == 0:
            dist.send(torch.zeros(3), 1)
        else:
            dist.recv(torch.zeros(2), 0)
    with pytest.raises(ValueError, match=r"rank 0 sent shape \(3,\) but the receiving tensor has shape \(2,\)"):
        run_in_threads(mismatched_recv, 2, timeout=2)
    with pytest.raises(ValueError, match="every rank must pass the same shape"):
        run_in_threads(lambda dist: dist.all_reduce(torch.zeros(dist.get_rank() + 1)), 2)


def test_bucketed_all_reduce_averages_on_thread_ranks():
    shapes = [(4, 3), (5,), (2, 2)]
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(10 * r + i)) for i, s in enumerate(shapes)]
             for r in range(3)]

    def body(dist, rank_grads):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, g in zip(params, rank_grads):
            p.grad = g.clone()
        all_reduce_gradients(params, bucket_numel=16, dist=dist)
        return [p.grad for p in params]
    results, ranks = run_in_threads(body, 3, [(g,) for g in grads])
    for i in range(len(shapes)):
        torch.testing.assert_close(results[1][i], torch.stack([g[i] for g in grads]).mean(0), rtol=1e-6, atol=1e-6)
    assert ranks[0].collectives == [("all_reduce", 12), ("all_reduce", 9)], "12 | 5 + 4: two buckets of <= 16"


def test_make_buckets_and_shard_errors():
    params = [torch.empty(n) for n in (12, 5, 4, 30)]
    assert [[p.numel() for p in b] for b in make_buckets(params, 16)] == [[12], [5, 4], [30]]
    with pytest.raises(ValueError, match="bucket_numel must be a positive int"):
        make_buckets(params, 0)
    with pytest.raises(ValueError, match="do not split evenly over 2 ranks"):
        shard(torch.zeros(5, 3), 0, 2)


# --- device maps with accelerate --------------------------------------------------------------------


def test_device_map_with_disk_offload_matches_the_in_memory_model(tmp_path, monkeypatch):
    from accelerate.utils import compute_module_sizes

    from minillm.distributed.device_map import place_on_budget
    from minillm.pretrained import load_pretrained

    # Bit for bit only if both runs multiply the same layouts: an offloaded weight comes back row-major, so the
    # in-memory model gets that layout too (the shipped one keeps GPT-2's transposed layout). The layouts each
    # run's F.linear sees are recorded and compared below.
    layouts = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: layouts.append((x.stride(), w.shape, w.stride())) or linear(x, w, b))
    model, _ = load_pretrained()
    for param in model.parameters():
        param.data = param.data.contiguous()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    in_memory_layouts, layouts[:] = layouts[:], []
    sizes = compute_module_sizes(model)
    budget = sizes["transformer.wte"] + sizes["transformer.wpe"] + 3 * sizes["transformer.h.0"]
    device_map = place_on_budget(model, {"cpu": budget, "disk": "1GB"}, tmp_path)
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    assert device_map["lm_head"] == device_map["transformer.wte"], "tied weights must stay on one device"
    assert any(tmp_path.glob("*.dat")), "disk-offloaded weights are files in offload_dir"
    with torch.no_grad():
        assert torch.equal(model(ids), expected), "offloading moves weights, it must not change a single output bit"
    assert layouts and layouts == in_memory_layouts, "the offloaded run multiplied other layouts than the in-memory one"
    with pytest.raises(TypeError, match="needs a minillm model with .blocks"):
        place_on_budget(torch.nn.Linear(2, 2), {"cpu": "1GB"}, tmp_path)


# --- two torchrun nodes -------------------------------------------------------------------------------


def test_multinode_script_runs_two_torchrun_nodes(tmp_path):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen([sys.executable, "scripts/multinode.py", "--timeout", "100"], cwd=ROOT, text=True,
                               stdout=stdout, stderr=stderr)
    seen, deadline = set(), time.monotonic() + 110  # the script stops its nodes after 100 s
    while run.poll() is None and time.monotonic() < deadline:  # torchrun's rendezvous store, while it is up
        port = re.search(r"--master-port=(\d+)", out.read_text())  # printed before the nodes start
        seen |= listening_addresses(int(port[1])) if port else set()
        time.sleep(0.05)
    if run.poll() is None:
        run.kill()
    run.wait()
    stdout, stderr = out.read_text(), err.read_text()
    assert run.returncode == 0, f"stdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    assert seen == {"127.0.0.1"}, f"the rendezvous store listened on {seen or 'nothing we saw'}; 127.0.0.1 only"
    lines = stdout.splitlines()
    assert "--nnodes=2" in lines[1] and "--node-rank=1" in lines[1] and "--master-addr=127.0.0.1" in lines[1], lines
    assert "world size 2: rank 0 on node" in stdout and "replicas agree after the step: True" in stdout
    assert "equals one process on the whole batch: max|Δ| < 1e-6 ✓" in stdout, stdout
