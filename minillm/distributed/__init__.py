"""Scaling out on torch.distributed: launching ranks, collectives, data parallelism, ZeRO-1 (chapter 16).

- launch.py: `launch(fn, world_size, args)` runs fn on N local processes in a gloo group on 127.0.0.1.
- threads.py: `run_in_threads(fn, world_size)`, ranks as threads with a stand-in `dist` (the exercises use it).
- collectives.py: the ring all-reduce from isend/recv.
- data_parallel.py: replicate, shard the batch, bucketed gradient all-reduce, step.
- zero.py: ZeRO stage 1, AdamW state sharded over ranks.
- device_map.py: a model bigger than the memory budget, placed layer by layer with accelerate.
- workers.py: what the chapter runs on each rank; pictures.py: its drawings.
"""

from minillm.distributed.collectives import ring_all_reduce, ring_steps
from minillm.distributed.data_parallel import (all_reduce_gradients, broadcast_parameters, data_parallel_step,
                                               make_buckets, shard)
from minillm.distributed.launch import WorkerError, launch
from minillm.distributed.threads import ThreadDist, run_in_threads
from minillm.distributed.zero import ShardedAdamW, optimizer_state_bytes, zero1_step

__all__ = ["launch", "WorkerError", "run_in_threads", "ThreadDist", "ring_all_reduce", "ring_steps",
           "broadcast_parameters", "shard", "make_buckets", "all_reduce_gradients", "data_parallel_step",
           "ShardedAdamW", "zero1_step", "optimizer_state_bytes"]
