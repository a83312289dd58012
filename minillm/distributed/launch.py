"""Run a function on N local processes, one per rank, in a gloo process group on 127.0.0.1.

Chapter 16 teaches this file. `launch(fn, world_size, args)` is a small `torch.multiprocessing.spawn` that a
notebook can use safely:

- Each rank is a fresh Python started with the "spawn" method. It imports `fn` by module and name, so `fn` must
  live in an importable module (minillm's workers do); a function defined in a notebook cannot be found by a new
  process, and `launch` says so before starting anything. (The chapter's exercises run their functions in
  threads instead: minillm.distributed.threads.)
- The parent owns the rendezvous: a `TCPStore` on a port the operating system picks, held until the run ends,
  so two runs never race for the same port. Ranks join it as clients and build the process group from it.
  The store accepts connections from this machine only (`loopback_store`).
- Every collective has a timeout (`collective_timeout`): a rank waiting for a partner that never comes raises
  instead of hanging. The whole run has one too (`timeout`).
- A rank's exception comes back to the parent with its traceback and is raised there as `WorkerError`; the
  other ranks are stopped, and every process is reaped even on failure or Ctrl-C.
- Results come back pickled by value, so a rank may return tensors and exit at once.

torchrun does the same job from a shell (scripts/multinode.py shows it across two "nodes").
"""

import datetime
import os
import pickle
import queue
import socket
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"  # every rank, store and gloo connection stays on this machine
GRACE_S = 1.0  # how long a failing run waits for the other ranks' last words before stopping them


class WorkerError(RuntimeError):
    """A rank raised; `rank` says which one, `traceback` holds its traceback as printed in that process."""

    def __init__(self, rank: int, world_size: int, worker_traceback: str, others: list[int]):
        self.rank, self.traceback = rank, worker_traceback
        also = (f"\n(ranks {others} failed after it, usually because they were waiting for rank {rank})"
                if others else "")
        super().__init__(f"rank {rank} of {world_size} raised; its traceback:\n{worker_traceback.rstrip()}{also}")

    @property
    def last_line(self) -> str:
        """The exception line of the worker's traceback, e.g. 'ValueError: rank 1 has no data'."""
        return self.traceback.rstrip().splitlines()[-1]


def loopback_interface() -> str:
    """The name of the loopback network interface ('lo' on Linux, 'lo0' on macOS).

    gloo opens its connections on the interface named by GLOO_SOCKET_IFNAME, or else on the address the
    machine's hostname resolves to, which may be a real network card; naming loopback keeps ranks local.
    """
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        if name.startswith("lo"):
            return name
    raise RuntimeError(f"no loopback network interface found among {names}")


def loopback_store(timeout: float, port: int = 0, multi_tenant: bool = False) -> dist.TCPStore:
    """A master `TCPStore` that listens on 127.0.0.1 only; port 0 lets the operating system pick a free one.

    Given a host and a port, a master TCPStore listens on every interface (`::`), whatever the host: a
    program on another machine could connect and set keys. So we bind a socket to 127.0.0.1 ourselves and
    hand the store its file descriptor (`master_listen_fd`); the store takes it over and closes it with
    itself. `multi_tenant=True` lets a later master store on the same port in this process share this one
    (scripts/multinode.py uses that to put torchrun's rendezvous on loopback).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((HOST, port))
        listener.listen()
        store = dist.TCPStore(HOST, listener.getsockname()[1], is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout), multi_tenant=multi_tenant,
                              master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


def launch(fn, world_size: int = 2, args: tuple = (), *, timeout: float = 60.0,
           collective_timeout: float = 20.0) -> list:
    """Run `fn(*args)` on ranks 0..world_size-1, each a new process in one gloo process group; return
    [rank 0's result, rank 1's result, ...].

    Inside `fn`, `torch.distributed` is initialised: `dist.get_rank()`, `dist.all_reduce(...)` and friends
    work, exactly as in a script started by torchrun. Each rank uses one CPU thread. Raises `WorkerError`
    if a rank raises, and `TimeoutError` if the run takes longer than `timeout` seconds.
    """
    _check_launchable(fn)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"launch: world_size must be a positive int, got {world_size!r}")
    if not timeout > 0 or not collective_timeout > 0:
        raise ValueError(f"launch: timeouts must be positive seconds, got timeout={timeout!r}, "
                         f"collective_timeout={collective_timeout!r}")
    ctx = mp.get_context("spawn")
    store = loopback_store(timeout)  # a free port, held for the whole run; 127.0.0.1 only
    reports = ctx.Queue()
    processes = [ctx.Process(target=_run_rank, daemon=True, name=f"minillm-rank-{rank}",
                             args=(fn, args, rank, world_size, store.port, timeout, collective_timeout, reports))
                 for rank in range(world_size)]
    try:
        for process in processes:
            process.start()
        return _collect(reports, processes, timeout)
    finally:
        _stop(processes)
        reports.close()
        del store  # closes the port


def _check_launchable(fn) -> None:
    """A spawned process finds `fn` by importing fn.__module__ and looking up fn.__qualname__."""
    if not callable(fn):
        raise TypeError(f"launch needs a function, got {type(fn).__name__}")
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    interactive = module is not None and module.__name__ == "__main__" and not hasattr(module, "__file__")
    nested = "<locals>" in getattr(fn, "__qualname__", "") or "<lambda>" in getattr(fn, "__qualname__", "")
    if interactive or nested:
        raise TypeError(
            f"launch: {getattr(fn, '__qualname__', fn)!r} cannot be imported by a new process: each rank is a "
            f"fresh Python that finds the function by module and name, and one defined in a notebook, inside "
            f"another function or as a lambda has no importable name. Put it in a .py module (minillm."
            f"distributed.workers holds the chapter's), or run it in threads with minillm.distributed.threads")


def _short_paths(text: str) -> str:
    """The traceback with the repository's and site-packages' directories cut off the file names.

    'minillm/distributed/workers.py' reads better than an absolute path, and is the same on every machine.
    """
    for directory in (sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parents[2])):
        text = text.replace(directory + os.sep, "")
    return text


def _run_rank(fn, args, rank, world_size, port, timeout, collective_timeout, reports) -> None:
    """The body of one rank's process: join the group, run fn, report the result or the traceback."""
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    torch.set_num_threads(1)  # ranks share the machine's cores; more threads per rank only contend
    try:
        store = dist.TCPStore(HOST, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        # Starting a rank (importing torch) can take seconds longer on one rank than another on a busy machine.
        # Wait for all of them under the run's timeout, so that joining the group, which uses the collective
        # timeout, never waits for a rank that is still starting.
        store.set(f"started/{rank}", "1")
        store.wait([f"started/{r}" for r in range(world_size)])
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        result = fn(*args)
        # Pickled here, by value: a tensor put on a torch.multiprocessing queue as is travels as a handle to
        # shared memory that this process frees when it exits, possibly before the parent reads it.
        reports.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything, KeyboardInterrupt included, goes back to the parent
        reports.put((rank, "error", _short_paths(traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(reports, processes, timeout: float) -> list:
    """Wait for every rank's report; raise on the first error, a silent death or the deadline."""
    world_size = len(processes)
    results, errors = {}, {}  # errors keep their arrival order: the first is usually the cause
    exited_at = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    while len(results) + len(errors) < world_size:
        now = time.monotonic()
        if first_error_at is not None and now > first_error_at + GRACE_S:
            break  # the ranks still running were waiting for the one that failed; they get stopped
        if now > deadline:
            missing = [r for r in range(world_size) if r not in results and r not in errors]
            raise TimeoutError(
                f"launch: ranks {missing} did not finish within timeout={timeout} s and were stopped. Usually a "
                f"rank waits for a collective that another rank never calls; collective_timeout bounds each wait")
        try:
            rank, status, payload = reports.get(timeout=0.1)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank in results or rank in errors or process.exitcode is None:
                    continue
                # Its last report may still be in the pipe: give it GRACE_S before calling the exit silent.
                if now - exited_at.setdefault(rank, now) > GRACE_S:
                    errors[rank] = (f"rank {rank} exited with code {process.exitcode} without reporting "
                                    f"(a negative code is the signal that killed it)")
                    first_error_at = first_error_at or now
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            first_error_at = first_error_at or now
    if errors:
        (rank, text), *others = errors.items()
        raise WorkerError(rank, world_size, text, [r for r, _ in others])
    return [results[rank] for rank in range(world_size)]


def _stop(processes) -> None:
    """Stop every rank still running (SIGTERM, then SIGKILL) and reap them all, so none is left behind."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is None:
            continue  # never started
        process.join(timeout=GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
