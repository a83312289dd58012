"""Ranks as threads of one process: a stand-in for `torch.distributed` that runs functions defined in a notebook.

Chapter 16's exercises use it. `launch` (minillm.distributed.launch) starts each rank as a new process that must
import the function it runs, so a function written in a notebook cannot run there. Here each rank is a thread of
the notebook's own process, and each gets a `ThreadDist`: an object with the subset of `torch.distributed`'s
functions the chapter uses (`get_rank`, `get_world_size`, `send`, `recv`, `isend`, `irecv`, `all_reduce`,
`broadcast`, `all_gather`, `all_gather_single`, `barrier`, `ReduceOp`). Code written against it as `dist.…` runs
unchanged with the real module: pass `torch.distributed` instead.

It is stricter than gloo in one way that matters: `send` waits until the receiver has taken the message, as gloo
does for large tensors (and NCCL always). Code that sends on every rank before anyone receives therefore
deadlocks here at any size, and a deadlock raises after `timeout` seconds instead of hanging.

It also records what each rank did (`sent_numel`, `collectives`), so an exercise can check *how* a result was
computed, e.g. that a ring all-reduce spreads the traffic evenly.
"""

import threading

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Raised in the other ranks' threads when one rank has failed, so that none waits for it forever."""


class _World:
    """What the ranks share: one mailbox per (src, dst) pair, a barrier and slots for collectives."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size, self.timeout = world_size, timeout
        self.lock = threading.Condition()
        self.mailboxes = {(src, dst): [] for src in range(world_size) for dst in range(world_size)}
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size
        self.failed = None  # (rank, exception) of the first rank that raised

    def wait_until(self, ready, rank: int, what: str):
        """Block until ready() is true (under the lock); raise on timeout or when another rank failed."""
        with self.lock:
            if not self.lock.wait_for(lambda: ready() or self.failed is not None, timeout=self.timeout):
                raise TimeoutError(f"rank {rank} waited {self.timeout} s in {what}: its partner never took part. "
                                   f"If every rank sends before it receives, they all wait for each other "
                                   f"(deadlock): post sends with dist.isend, then recv, then wait()")
            if self.failed is not None and not ready():
                raise RankFailed(f"rank {rank} stopped in {what}: rank {self.failed[0]} failed")
            return ready()

    def sync(self, rank: int, what: str) -> None:
        try:
            self.barrier.wait(timeout=self.timeout)
        except threading.BrokenBarrierError:
            if self.failed is not None:
                raise RankFailed(f"rank {rank} stopped in {what}: rank {self.failed[0]} failed") from None
            raise TimeoutError(f"rank {rank} waited {self.timeout} s in {what}: every rank must call the same "
                               f"collectives in the same order") from None


class _Message:
    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.taken = tensor.detach().clone(), False


class _Work:
    """What isend/irecv return: wait() blocks until the operation is complete, like torch's Work."""

    def __init__(self, wait):
        self.wait = wait


class ThreadDist:
    """One rank's view of a world of threads; use it where you would use `torch.distributed`."""

    ReduceOp = dist.ReduceOp

    def __init__(self, world: _World, rank: int):
        self._world, self._rank = world, rank
        self.sent_numel = 0      # elements this rank sent with send/isend
        self.collectives = []    # (name, numel) of each collective this rank called, in order

    def get_rank(self) -> int:
        return self._rank

    def get_world_size(self) -> int:
        return self._world.world_size

    # --- point to point ---------------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, dst: int) -> _Work:
        self._check_peer(dst, "isend")
        message = _Message(tensor)
        world = self._world
        with world.lock:
            world.mailboxes[(self._rank, dst)].append(message)
            world.lock.notify_all()
        self.sent_numel += tensor.numel()
        return _Work(lambda: world.wait_until(lambda: message.taken, self._rank, f"send to rank {dst}"))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._check_peer(src, "recv")
        world, box = self._world, self._world.mailboxes[(src, self._rank)]
        world.wait_until(lambda: len(box) > 0, self._rank, f"recv from rank {src}")
        with world.lock:
            message = box.pop(0)
            if message.tensor.shape != tensor.shape:
                raise ValueError(f"recv on rank {self._rank}: rank {src} sent shape {tuple(message.tensor.shape)} "
                                 f"but the receiving tensor has shape {tuple(tensor.shape)}; they must match")
            tensor.copy_(message.tensor)
            message.taken = True
            world.lock.notify_all()

    def irecv(self, tensor: torch.Tensor, src: int) -> _Work:
        # The receive is posted now, in a helper thread, so a partner's blocking send can complete before
        # this rank calls wait(), as with a real irecv.
        errors = []
        def receive():
            try:
                self.recv(tensor, src)
            except Exception as err:  # handed to wait()
                errors.append(err)
        helper = threading.Thread(target=receive, daemon=True)
        helper.start()
        def wait():
            helper.join()
            if errors:
                raise errors[0]
        return _Work(wait)

    # --- collectives: every rank posts its tensor, waits for all, then reads what it needs ------------
    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        if op != dist.ReduceOp.SUM:
            raise ValueError(f"ThreadDist.all_reduce supports op=ReduceOp.SUM only, got {op}")
        values = self._exchange("all_reduce", tensor)
        total = values[0].clone()
        for value in values[1:]:  # in rank order, so every rank gets bit-identical sums
            total += value
        tensor.copy_(total)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._check_peer(src, "broadcast", allow_self=True)
        tensor.copy_(self._exchange("broadcast", tensor)[src])

    def all_gather(self, tensor_list: list[torch.Tensor], tensor: torch.Tensor) -> None:
        for out, value in zip(tensor_list, self._exchange("all_gather", tensor), strict=True):
            out.copy_(value)

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        output.copy_(torch.cat([v.reshape(-1) for v in self._exchange("all_gather_single", tensor)])
                     .reshape(output.shape))

    def barrier(self) -> None:
        self._exchange("barrier", torch.zeros(0))

    def _exchange(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Post this rank's tensor, wait for every rank's, return them all (copies, in rank order)."""
        self.collectives.append((name, tensor.numel()))
        world = self._world
        world.slots[self._rank] = tensor.detach().clone()
        world.sync(self._rank, name)  # every rank has posted
        values = [value.clone() for value in world.slots]
        world.sync(self._rank, name)  # every rank has read: the slots may be reused by the next collective
        if len({tuple(v.shape) for v in values}) != 1:
            raise ValueError(f"{name}: the ranks passed tensors of different shapes "
                             f"{[tuple(v.shape) for v in values]}; every rank must pass the same shape")
        return values

    def _check_peer(self, peer: int, op: str, allow_self: bool = False) -> None:
        last = self._world.world_size - 1
        if not isinstance(peer, int) or not 0 <= peer <= last or (peer == self._rank and not allow_self):
            raise ValueError(f"{op} on rank {self._rank}: peer rank must be an int in 0..{last}"
                             f"{'' if allow_self else ' other than itself'}, got {peer!r}")


def run_in_threads(fn, world_size: int, args_per_rank=None, timeout: float = 5.0) -> tuple[list, list[ThreadDist]]:
    """Call fn(dist, *args_per_rank[rank]) on `world_size` threads, each with its own `ThreadDist`.

    Returns ([result of rank 0, ...], [rank 0's ThreadDist, ...]). If a rank raises, the others are released
    and the first exception is re-raised here with the rank added to its message (`.rank` on it too).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_in_threads: world_size must be a positive int, got {world_size!r}")
    args_per_rank = list(args_per_rank) if args_per_rank is not None else [()] * world_size
    if len(args_per_rank) != world_size:
        raise ValueError(f"run_in_threads: args_per_rank has {len(args_per_rank)} entries, one per rank is "
                         f"needed ({world_size})")
    world = _World(world_size, timeout)
    ranks = [ThreadDist(world, rank) for rank in range(world_size)]
    results = [None] * world_size

    def body(rank):
        try:
            results[rank] = fn(ranks[rank], *args_per_rank[rank])
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            with world.lock:
                if world.failed is None:
                    world.failed = (rank, err)
                world.lock.notify_all()
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Waits inside ThreadDist end by themselves; this bounds a rank stuck in its own code.
        thread.join(timeout=4 * timeout)
        if thread.is_alive():
            raise TimeoutError(f"run_in_threads: a rank was still running after {4 * timeout} s (an endless loop?)")
    if world.failed is not None:
        rank, err = world.failed
        err.rank = rank  # which rank raised, for the caller's message
        raise err
    return results, ranks
