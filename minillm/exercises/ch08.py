"""Checks for chapter 08's exercises: torch's LR schedulers judge the schedule, `Tensor.unfold` the batches,
`torch.nn.utils.clip_grad_norm_` the clipping, `F.cross_entropy` the unigram baseline, and one big batch through
torch (cross-entropy, backward, `clip_grad_norm_`, an optimizer step) the training step, inside each check."""

import copy
import math

import torch
import torch.nn.functional as F

from minillm import train as train_module
from minillm.exercises import Mismatch, check, exercise, expect_equal, first_mismatch, use, verdict

# minillm's own step, kept when this module is imported (before any use() swap, which needs this module's
# registry entry first): the end-to-end check reruns training with it as the reference.
_MINILLM_TRAIN_STEP = train_module.train_step


def _torch_lrs(max_lr: float, min_lr: float, warmup: int, total: int) -> list[float]:
    """Learning rates of steps 0..total from torch's SequentialLR([LinearLR(start_factor=1/(warmup+1)),
    CosineAnnealingLR(eta_min=min_lr)]): the schedule `lr_at` must reproduce."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_lr)
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@exercise("8.3", "warmup + cosine", hides=("lr_at",))
def check_lr_at(lr_at) -> None:
    """Exercise 8.3: `lr_at(step, max_lr, min_lr, warmup_steps, total_steps)`, judged step by step against
    torch's `SequentialLR([LinearLR(start_factor=1/(warmup+1)), CosineAnnealingLR(eta_min=min_lr)])`."""

    def case(max_lr, min_lr, warmup, total):
        def run():
            for step, expected in enumerate(_torch_lrs(max_lr, min_lr, warmup, total)):
                got = lr_at(step, max_lr, min_lr, warmup, total)
                what = f"lr_at({step}, max_lr={max_lr}, min_lr={min_lr}, warmup_steps={warmup}, total_steps={total})"
                expect_equal(float(got), expected, what=what, atol=1e-12, rtol=1e-7)
        return run

    cases = [case(1e-3, 1e-4, 3, 12), case(0.5, 0.0, 1, 5), case(3e-3, 3e-4, 10, 11), case(2.0, 1.0, 4, 40)]
    check("8.3", cases,
          hint="two phases: a straight line up that reaches max_lr exactly at step warmup_steps (step 0 is not "
               "0), then half a cosine period from max_lr down to min_lr at total_steps, and min_lr after that",
          more="in the warmup, step s gets the fraction (s + 1) / (warmup_steps + 1) of max_lr. After it, measure "
               "the progress t through the decay steps, from 0 to 1 and capped at 1; cos(pi t) runs from 1 to -1, "
               "so shift and scale it onto [min_lr, max_lr]")


@exercise("8.1", "get_batch", hides=("get_batch",))
def check_get_batch(get_batch) -> None:
    """Exercise 8.1: `get_batch(tokens, batch_size, block_size, generator)` with starts drawn by
    `torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)`."""

    def case(n_tokens, batch_size, block_size, seed):
        tokens = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed + 100))

        def run():
            starts = torch.randint(n_tokens - block_size, (batch_size,), generator=torch.Generator().manual_seed(seed))
            windows = tokens.unfold(0, block_size + 1, 1)[starts]  # every window of block_size + 1, then pick
            got = get_batch(tokens, batch_size, block_size, torch.Generator().manual_seed(seed))
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"expected a pair (inputs, targets), got {type(got).__name__}")
            what = f"get_batch(tokens of length {n_tokens}, batch_size={batch_size}, block_size={block_size})"
            expect_equal(got[0], windows[:, :-1], what=f"{what} inputs", atol=0, rtol=0)
            expect_equal(got[1], windows[:, 1:], what=f"{what} targets", atol=0, rtol=0)
        return run

    cases = [case(50, 4, 8, 0), case(9, 3, 8, 1), case(101, 1, 13, 2), case(40, 7, 1, 3)]
    check("8.1", cases,
          hint="a window holds block_size + 1 consecutive tokens: the inputs are all of it but its last token, the "
               "targets all of it but its first",
          more="draw the starts exactly as the spec says, with one call that uses the generator before anything "
               "else does; the last valid start is len(tokens) - block_size - 1. Stack the windows into a "
               "(batch_size, block_size + 1) tensor, then slice it twice")


@exercise("8.4", "clip by global norm")
def check_clip_grad_norm(clip_grad_norm) -> None:
    """Exercise 8.4: `clip_grad_norm(grads, max_norm)` -> (clipped grads, total norm before clipping),
    judged by `torch.nn.utils.clip_grad_norm_` on parameters holding the same gradients."""
    g = torch.Generator().manual_seed(83)

    def case(shapes, max_norm, scale):
        grads = [torch.randn(shape, generator=g, dtype=torch.float64) * scale for shape in shapes]

        def run():
            params = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            got = clip_grad_norm([grad.clone() for grad in grads], max_norm)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"expected a pair (clipped grads, total norm), got {type(got).__name__}")
            clipped, norm = got
            expect_equal(float(norm), expected_norm.item(), what="the total norm before clipping", rtol=1e-9)
            if len(clipped) != len(grads):
                raise Mismatch(f"expected {len(grads)} clipped gradients, got {len(clipped)}")
            for i, (mine, param) in enumerate(zip(clipped, params)):
                expect_equal(mine, param.grad, what=f"clipped gradient {i} (max_norm={max_norm})", rtol=1e-9)
        return run

    cases = [case([(3, 4), (4,)], 1.0, 3.0), case([(2, 5), (5,), (1,)], 100.0, 1.0),
             case([(7,)], 0.25, 0.01), case([(2, 3, 2), (6,)], 0.5, -2.0)]
    check("8.4", cases,
          hint="one norm for all the gradients together, as if they were one long vector; every gradient is then "
               "scaled by the same factor, and only when that norm is above max_norm",
          more="the factor is max_norm / (norm + 1e-6), torch's epsilon, capped at 1; return the norm measured "
               "before scaling, and gradients of the same shapes as given")


@exercise("8.2", "unigram baseline", hides=("unigram_loss",))
def check_unigram_loss(unigram_loss) -> None:
    """Exercise 8.2: `unigram_loss(train_tokens, targets, vocab_size)` with add-one smoothing, judged by
    `F.cross_entropy` on logits that are the smoothed log-frequencies, the same for every position."""
    g = torch.Generator().manual_seed(84)

    def case(n_train, n_targets, vocab_size, high):
        train_tokens = torch.randint(high, (n_train,), generator=g)  # ids >= high never occur in train
        targets = torch.randint(vocab_size, (n_targets,), generator=g)

        def run():
            counts = torch.bincount(train_tokens, minlength=vocab_size).double()  # (V,)
            logits = torch.log(counts + 1).expand(n_targets, vocab_size)  # softmax divides by N + V itself
            expected = F.cross_entropy(logits, targets).item()
            what = f"unigram_loss({n_train} train tokens, {n_targets} targets, vocab_size={vocab_size})"
            expect_equal(float(unigram_loss(train_tokens, targets, vocab_size)), expected, what=what, rtol=1e-9)
        return run

    cases = [case(100, 30, 10, 10), case(50, 20, 12, 5), case(1, 5, 3, 1), case(1000, 200, 64, 40)]
    check("8.2", cases,
          hint="add one to the count of every id of the vocabulary, also the ids train never has, and divide by "
               "the total of those smoothed counts; the loss is the mean negative log-probability of the targets",
          more="a count per id needs the vocabulary size, not just the ids that occur (torch.bincount has an "
               "argument for that); the smoothed counts add up to N + V. Index the log-probabilities with the "
               "targets and average")


# --- 8.5 one training step (build) ------------------------------------------------------------------------


def _tiny_gpt(seed: int, vocab_size: int = 31, max_seq_len: int = 16, hidden_size: int = 16, num_layers: int = 1):
    from minillm.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, hidden_size=hidden_size,
                         num_layers=num_layers, num_heads=2))


def _sgd(model, weight_decay: float = 0.1) -> torch.optim.SGD:
    """Plain SGD in two groups (decay on matrices only, as `make_optimizer` groups AdamW): the parameters after
    a step are then a smooth function of the gradient, so a step can be compared within rounding."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.SGD([{"params": matrices, "weight_decay": weight_decay},
                            {"params": others, "weight_decay": 0.0}], lr=1.0)


def _reference_step(model, optimizer, micro_batches, lr: float, grad_clip: float, bf16: bool) -> tuple[float, float]:
    """The step from its definition, without accumulation: equal-size micro-batches are one big batch whose mean
    loss is the mean of theirs. Returns (loss, gradient norm before clipping)."""
    inputs = torch.cat([x for x, _ in micro_batches])  # (k * B, T)
    targets = torch.cat([y for _, y in micro_batches])
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.item(), norm.item()


def _record_forwards(model) -> tuple[list[bool], object]:
    """Record, for each forward call of `model`, whether bf16 autocast was on. Returns (record, hook handle)."""
    record = []
    hook = model.register_forward_pre_hook(lambda module, args: record.append(torch.is_autocast_enabled("cpu")))
    return record, hook


@exercise("8.5", "one training step", kind="build", component="train_step", replaces="minillm.train:train_step",
          hides=("train_step", "minillm.train.train_step", "accumulate_gradients"))
def check_train_step(train_step) -> None:
    """Exercise 8.5: `train_step(model, optimizer, micro_batches, step, config)` -> (lr, loss, grad_norm): the
    schedule's learning rate in every group, gradients accumulated from zero over the micro-batches, clipped to
    a global norm, one optimizer step. Judged by torch on one big batch and by torch's schedulers."""
    from minillm.train import TrainConfig

    def case(k, steps, bf16=False, grad_clip=1.0, B=2, T=8):
        def run():
            config = TrainConfig(steps=12, warmup_steps=3, max_lr=0.5, min_lr=0.05, grad_clip=grad_clip, bf16=bf16,
                                 grad_accum_steps=k, batch_size=B, block_size=T, show_progress=False)
            lrs = _torch_lrs(config.max_lr, config.min_lr, config.warmup_steps, config.steps)
            model = _tiny_gpt(seed=k + len(steps))
            reference = copy.deepcopy(model)
            optimizer, reference_optimizer = _sgd(model), _sgd(reference)
            g = torch.Generator().manual_seed(85 + k)
            for step in steps:
                micro_batches = [(torch.randint(31, (B, T), generator=g), torch.randint(31, (B, T), generator=g))
                                 for _ in range(k)]
                loss, norm = _reference_step(reference, reference_optimizer, micro_batches, lrs[step], grad_clip, bf16)
                what = (f"step {step} ({k} micro-batch{'es' if k > 1 else ''}, grad_clip={grad_clip}"
                        f"{', bf16' if bf16 else ''})")
                forwards, hook = _record_forwards(model)
                try:
                    got = train_step(model, optimizer, micro_batches, step, config)
                finally:
                    hook.remove()
                if not isinstance(got, tuple) or len(got) != 3:
                    raise Mismatch(f"{what}: expected a triple (lr, loss, grad_norm), got {type(got).__name__}")
                if len(forwards) != k:
                    raise Mismatch(f"{what}: expected {k} forward calls, one per micro-batch, got {len(forwards)}")
                if any(on != bf16 for on in forwards):
                    raise Mismatch(f"{what}: a forward call ran with bf16 autocast {'off' if bf16 else 'on'}")
                expect_equal(float(got[0]), lrs[step], what=f"{what}: the learning rate", atol=1e-12, rtol=1e-9)
                for group_number, group in enumerate(optimizer.param_groups):
                    expect_equal(group["lr"], lrs[step], what=f"{what}: the lr of parameter group {group_number}",
                                 atol=1e-12, rtol=1e-9)
                # bf16 rounds the big batch and the micro-batches differently: only the loss and norm, loosely.
                expect_equal(float(got[1]), loss, what=f"{what}: the mean loss", atol=0, rtol=2e-2 if bf16 else 1e-5)
                expect_equal(float(got[2]), norm, what=f"{what}: the gradient norm before clipping", atol=0,
                             rtol=5e-2 if bf16 else 1e-4)
                if not bf16:
                    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
                        expect_equal(p.detach(), p_ref.detach(), what=f"{what}: {name} after the step", atol=1e-6,
                                     rtol=1e-5)
        return run

    cases = [case(1, [0]), case(3, [7], grad_clip=0.05), case(2, [4], grad_clip=0.0), case(2, [5, 6]),
             case(2, [1], bf16=True), case(1, [12])]
    check("8.5", cases,
          hint="the step's parts, in order: the learning rate of this step in every parameter group, gradients "
               "from zero, one forward and backward per micro-batch so that the sum of their gradients is the "
               "gradient of the mean loss, then clipping, then the optimizer's update",
          more="each micro-batch's loss (section 3's cross-entropy) divided by their number before backward; the "
               "returned loss is the sum of those divided losses. With config.bf16 the forward runs under "
               "torch.autocast('cpu', dtype=torch.bfloat16). torch.nn.utils.clip_grad_norm_ returns the norm from "
               "before clipping; grad_clip 0 means no clipping. Read the schedule from lr_at with the config's "
               "fields")


def end_to_end_train(steps: int = 20) -> bool:
    """The first `steps` losses of `minillm.train.train` with whatever train_step is plugged in, against the same
    run with minillm's own step, in this process: a 2-layer GPT on the story corpus, 2 micro-batches per step,
    warmup and cosine, clipping at 1.0, AdamW.

    A learner's step may order the same arithmetic differently (sum the micro-batch losses and call backward
    once, divide the gradient instead of the loss), which changes float32 roundings (~1e-7 relative per
    operation) that 20 AdamW steps carry along; so the claim is a relative bound, not bit equality. Measured on
    this run: summing the losses first moves them by 9e-8 relative, while a wrong step moves them by 2e-3 or
    more (a schedule one step ahead 0.25, no zero_grad 1.5e-2, no division by the number of micro-batches 3e-3,
    no clipping or clipping each tensor on its own 2e-3). The bound 1e-5 sits between the two.
    """
    from minillm.models import GPT, GPTConfig
    from minillm.pretrained import PRETRAINED_DIR
    from minillm.tokenizer import BPETokenizer
    from minillm.train import TrainConfig, story_tokens, train

    tokenizer = BPETokenizer.load(PRETRAINED_DIR / "tokenizer.json")
    train_tokens, val_tokens = story_tokens(tokenizer, "train"), story_tokens(tokenizer, "val")
    config = TrainConfig(steps=steps, batch_size=4, block_size=32, grad_accum_steps=2, max_lr=1e-2, min_lr=1e-3,
                         warmup_steps=5, grad_clip=1.0, eval_every=steps, eval_windows=1, show_progress=False)

    def run() -> dict:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, max_seq_len=32, hidden_size=32, num_layers=2,
                              num_heads=2))
        return train(model, train_tokens, val_tokens, config)

    whose = "your" if train_module.train_step is not _MINILLM_TRAIN_STEP else "minillm's"
    claim = (f"{whose} train_step reproduces minillm.train's first {steps} losses (2 micro-batches, warmup + cosine, "
             "clipping at 1.0, AdamW): max relative |Δ| ≤ 1e-5")
    try:
        got = run()
    except NotImplementedError:
        raise  # an unwritten stub: use() prints "plug-in skipped"
    except Exception as crash:
        return verdict(False, claim, f"your code raised {type(crash).__name__}: {crash}")
    with use(train_step=_MINILLM_TRAIN_STEP):
        expected = run()
    for key, rtol in (("lr", 1e-9), ("train_loss", 1e-5)):
        try:
            values = [float(value) for value in got[key]]
        except (TypeError, ValueError, RuntimeError) as bad:
            return verdict(False, claim, f"history[{key!r}] holds something that is not a number: {bad}")
        problem = first_mismatch(values, expected[key], atol=0, rtol=rtol)
        if problem is not None:
            return verdict(False, claim, f"history[{key!r}] by step: {problem}")
    return verdict(True, claim)
