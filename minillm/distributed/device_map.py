"""A model bigger than the memory budget: place it layer by layer with accelerate's device maps.

Chapter 16 teaches this file. `accelerate.infer_auto_device_map` walks the model's modules in order and gives
each to the first device that still has room in `max_memory`: GPUs 0, 1, ... first (integer keys), then
"cpu", then "disk". A transformer block is never split (`no_split_module_classes`): its pieces are used
together, and a block cut across devices would move activations back and forth inside it. Tied weights (GPT's
lm_head and token embedding) are kept on one device.

`accelerate.dispatch_model` then installs hooks that, before each module runs, bring its inputs to its device,
and for "disk" modules read its weights from `offload_dir` (a memory-mapped file per tensor) and drop them
afterwards. Layers on different GPUs run one after another, not at the same time: this is model placement, not
parallelism (pipeline parallelism would keep every GPU busy on different micro-batches).

On a machine without GPUs the map uses "cpu" and "disk" only; the computation is the same, so outputs equal the
in-memory model's bit for bit, provided the in-memory weights have the layout an offloaded one comes back in
(row-major): a matmul on a transposed weight may run another kernel and add in another order.
"""

import torch
from accelerate import dispatch_model, infer_auto_device_map


def place_on_budget(model: torch.nn.Module, max_memory: dict, offload_dir) -> dict[str, str | int]:
    """Give `model` a device map that respects `max_memory` ({0: "10GiB", "cpu": "2MB", "disk": "1GB"}) and
    dispatch it in place, offloading to `offload_dir`; return the map {module name: device}, in model order.

    Blocks are kept whole. When some modules go to disk, accelerate also keeps room on the main device for the
    largest block, which is where an offloaded block's weights are loaded while it runs.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"place_on_budget needs a minillm model with .blocks, got {type(model).__name__}")
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=[type(blocks[0]).__name__])
    dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return {name: device_map[name] for name in sorted(device_map, key=order.__getitem__)}

