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
process stepping on the whole batch; the ranks exchange plain tensors, never pickles. Chapter 16 runs this script.

Everything stays on this machine. torchrun has no option for where its rendezvous store listens: node 0's
static rendezvous (torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py) creates
`TCPStore(master_addr, master_port, is_master=True)`, which listens on every interface (`::`) whatever
--master-addr says, and the c10d backend does the same. That store is multi-tenant, though: a master store
already serving the port in the same process is reused. So each node here runs torchrun's own entry point
(`torch.distributed.run.main`) inside this script, and node 0 first opens the store itself on 127.0.0.1
(`minillm.distributed.launch.loopback_store`). gloo's connections use the loopback interface
(GLOO_SOCKET_IFNAME). With the plain `torchrun` command, the store would accept connections from anywhere.
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


def torchrun_args(node_rank: int, port: int) -> list[str]:
    """torchrun's arguments for node `node_rank`: what `torchrun ...` would be given on a real cluster."""
    return [f"--nnodes={NODES}", "--nproc-per-node=1", f"--node-rank={node_rank}", "--master-addr=127.0.0.1",
            f"--master-port={port}", str(Path(__file__).resolve()), "--worker"]


def run_torchrun_on_loopback(node_rank: int, port: int, timeout: float) -> None:
    """Be node `node_rank`: torchrun in this process; node 0 first opens the rendezvous store on 127.0.0.1.

    torchrun's store for node 0 is multi-tenant: finding ours on its port in this process, it uses ours
    instead of opening one on every interface (see the module docstring).
    """
    from torch.distributed.run import main as torchrun

    from minillm.distributed.launch import loopback_store

    store = loopback_store(timeout, port, multi_tenant=True) if node_rank == 0 else None
    torchrun(torchrun_args(node_rank, port))
    del store  # held until torchrun is done with it


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


def start_nodes(port: int, timeout: float) -> tuple[list[int], list[tuple[str, str]]]:
    """Start both nodes and wait for both; return their exit codes and their (stdout, stderr)."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME=_loopback(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    commands = [[sys.executable, str(Path(__file__).resolve()), f"--node-rank={node_rank}", f"--port={port}",
                 f"--timeout={timeout}"] for node_rank in range(NODES)]
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
    return [node.returncode for node in nodes], outputs


def run_nodes(timeout: float) -> int:
    """Run the two nodes, print the commands and what the workers printed; 0 if both nodes succeeded.

    One known failure is retried once: a worker that aborts (SIGABRT) while tearing down its gloo connections
    after the step has completed and been checked. gloo can throw from its I/O thread when a peer closes a
    connection first (pytorch/pytorch#50701), and on a loaded machine that happens now and then at exit. The
    retry is said on stderr; any other failure, or the same one twice, fails.
    """
    port = free_port()
    for node_rank in range(NODES):
        print(f"node {node_rank} runs:  torchrun " + " ".join(Path(part).name if part.startswith("/") else part
                                                             for part in torchrun_args(node_rank, port)), flush=True)
    codes, outputs = start_nodes(port, timeout)
    checked = "equals one process on the whole batch" in outputs[0][0]
    if checked and any(code != 0 for code in codes) and "SIGABRT" in outputs[0][1] + outputs[1][1]:
        port = free_port()
        print(f"a worker aborted (SIGABRT) while tearing down gloo after the step was checked; running both nodes "
              f"once more, with --master-port={port}", file=sys.stderr)
        codes, outputs = start_nodes(port, timeout)
    failed = [i for i, code in enumerate(codes) if code != 0]  # a stopped node counts
    for i in failed:
        print(f"node process {i} exited with {codes[i]}; its stderr ends:\n"
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
    mine = torch.tensor([float(os.environ["GROUP_RANK"]), loss], dtype=torch.float64)  # (node, loss)
    gathered = [torch.empty(2, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(gathered, mine)  # tensors, not all_gather_object: nothing is unpickled
    places = [(int(node), loss) for node, loss in (t.tolist() for t in gathered)]
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
    parser.add_argument("--node-rank", type=int, help="run as this node: torchrun in this process")
    parser.add_argument("--port", type=int, help="the rendezvous port (with --node-rank)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before both nodes are stopped")
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    if args.node_rank is not None:
        run_torchrun_on_loopback(args.node_rank, args.port, args.timeout)
        return 0
    return run_nodes(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
