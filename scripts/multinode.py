"""Two "nodes" on one machine: two torchrun invocations that meet at node 0's address, as two servers would.

    python scripts/multinode.py          # starts both nodes, waits (at most --timeout s), prints the result

On a real cluster each node runs one command in its own shell, with node 0's address and a free port:

    torchrun --nnodes=2 --nproc-per-node=1 --node-rank=0 --master-addr=HOST --master-port=PORT \\
        scripts/multinode.py --worker                                                  # on node 0
    torchrun --nnodes=2 --nproc-per-node=1 --node-rank=1 --master-addr=HOST --master-port=PORT \\
        scripts/multinode.py --worker                                                  # on node 1

Node 0's torchrun opens the rendezvous store at HOST:PORT; node 1's joins it; once both are in, each sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT for its workers and starts them. (Elastic jobs use the dynamic form,
`--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB` without --node-rank, where the rendezvous numbers
the nodes as they arrive.) Every worker here takes one data-parallel training step of a small minillm GPT
(chapter 16's `data_parallel_step`) on its shard of a global batch, and rank 0 checks the result against one
process stepping on the whole batch. Chapter 16 runs this script.
"""

import argparse
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = 2


def node_command(node_rank: int, port: int) -> list[str]:
    """The command node `node_rank` runs (torchrun from this Python's environment)."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, f"--nnodes={NODES}", "--nproc-per-node=1", f"--node-rank={node_rank}",
            "--master-addr=127.0.0.1", f"--master-port={port}", str(Path(__file__).resolve()), "--worker"]


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that no socket bound to port 0 can take it first.

    The port is only reserved once node 0's torchrun binds it, seconds later. A port the kernel hands out
    for `bind(port 0)` (gloo's connections, a Jupyter kernel's sockets) could be given to someone else in
    between; ports below the ephemeral range are never handed out that way.
    """
    low = 32768
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if range_file.exists():
        low = int(range_file.read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 12000), low), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {low}")


def run_nodes(timeout: float) -> int:
    """Start both nodes, wait for both, print the commands and what the workers printed."""
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME=_loopback(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    commands = [node_command(node_rank, port) for node_rank in range(NODES)]
    for node_rank, command in enumerate(commands):
        print(f"node {node_rank} runs:  " + " ".join(Path(part).name if part.startswith("/") else part
                                                    for part in command))
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for command in commands]
    deadline = time.monotonic() + timeout
    # Wait until both finish, one fails (the other would wait for it until its own timeout), or time is up.
    while any(node.poll() is None for node in nodes) and not any(node.poll() for node in nodes):
        if time.monotonic() > deadline:
            print(f"the nodes did not finish within {timeout} s; stopping them", file=sys.stderr)
            break
        time.sleep(0.2)
    for node in nodes:  # each node's session holds its workers: stop them all, even on failure
        if node.poll() is None:
            os.killpg(node.pid, 9)
    outputs = [node.communicate() for node in nodes]
    failed = [i for i, node in enumerate(nodes) if node.returncode != 0]  # a stopped node counts
    for i in failed:
        print(f"node process {i} exited with {nodes[i].returncode}; its stderr ends:\n"
              + "\n".join(outputs[i][1].splitlines()[-20:]), file=sys.stderr)
    for stdout, _ in outputs:
        print(stdout, end="")
    return 1 if failed else 0


def _loopback() -> str:
    return next(name for _, name in socket.if_nameindex() if name.startswith("lo"))


def worker() -> None:
    """One rank, started by torchrun: a data-parallel step, checked on rank 0 against one process."""
    import torch
    import torch.distributed as dist

    from minillm.distributed.data_parallel import broadcast_parameters, data_parallel_step
    from minillm.distributed.workers import make_model, replicas_agree
    from minillm.models import GPTConfig
    from minillm.train import lm_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(vocab_size=256, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=2)
    tokens = torch.randint(0, config.vocab_size, (4 * world_size, 17), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # the same global batch on every rank: (4N, 16)

    model = make_model(config, seed=rank)  # different on every rank until rank 0's weights are broadcast
    broadcast_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = data_parallel_step(model, optimizer, lm_loss, inputs, targets, bucket_numel=10_000)
    places = [None] * world_size
    dist.all_gather_object(places, (int(os.environ["GROUP_RANK"]), round(loss, 4)))
    agree = replicas_agree(model)
    if rank == 0:
        reference = make_model(config, seed=0)
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        lm_loss(reference, inputs, targets).backward()
        reference_optimizer.step()
        delta = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        print(f"world size {world_size}: " + ", ".join(f"rank {r} on node {node}" for r, (node, _) in
                                                       enumerate(places)))
        print("loss on each rank's shard: " + ", ".join(f"{loss:.4f}" for _, loss in places))
        print(f"replicas agree after the step: {agree}")
        print(f"equals one process on the whole batch: max|Δ| < 1e-6 {'✓' if delta < 1e-6 else '✗'}")
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run as a rank (torchrun passes this)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before both nodes are stopped")
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    return run_nodes(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
