"""Checks for chapter 08's exercises: torch's LR schedulers judge the schedule, `Tensor.unfold` the batches,
`torch.nn.utils.clip_grad_norm_` the clipping and `F.cross_entropy` the unigram baseline, inside each check."""

import torch
import torch.nn.functional as F

from minillm.exercises import Mismatch, check, expect_equal


def check_lr_at(lr_at) -> None:
    """Exercise 8.1: `lr_at(step, max_lr, min_lr, warmup_steps, total_steps)`, judged step by step against
    torch's `SequentialLR([LinearLR(start_factor=1/(warmup+1)), CosineAnnealingLR(eta_min=min_lr)])`."""

    def case(max_lr, min_lr, warmup, total):
        def run():
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_lr)
            linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
            for step in range(total + 1):
                got = lr_at(step, max_lr, min_lr, warmup, total)
                what = f"lr_at({step}, max_lr={max_lr}, min_lr={min_lr}, warmup_steps={warmup}, total_steps={total})"
                expect_equal(float(got), optimizer.param_groups[0]["lr"], what=what, atol=1e-12, rtol=1e-7)
                optimizer.step()
                scheduler.step()
        return run

    cases = [case(1e-3, 1e-4, 3, 12), case(0.5, 0.0, 1, 5), case(3e-3, 3e-4, 10, 11), case(2.0, 1.0, 4, 40)]
    check("Exercise 8.1 (warmup + cosine)", cases,
          hint="warmup: max_lr * (step + 1) / (warmup_steps + 1); after it, with t = (step - warmup_steps) / "
               "(total_steps - warmup_steps): min_lr + (max_lr - min_lr) * (1 + cos(pi * t)) / 2")


def check_get_batch(get_batch) -> None:
    """Exercise 8.2: `get_batch(tokens, batch_size, block_size, generator)` with starts drawn by
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
    check("Exercise 8.2 (get_batch)", cases,
          hint="starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator); stack the "
               "slices tokens[s : s + block_size + 1]; inputs drop each window's last token, targets its first")


def check_clip_grad_norm(clip_grad_norm) -> None:
    """Exercise 8.3: `clip_grad_norm(grads, max_norm)` -> (clipped grads, total norm before clipping),
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
    check("Exercise 8.3 (clip by global norm)", cases,
          hint="one norm for all gradients together: sqrt(sum of every squared entry); scale every gradient by "
               "min(1, max_norm / (norm + 1e-6)), torch's epsilon, and return the norm from before scaling")


def check_unigram_loss(unigram_loss) -> None:
    """Exercise 8.4: `unigram_loss(train_tokens, targets, vocab_size)` with add-one smoothing, judged by
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
    check("Exercise 8.4 (unigram baseline)", cases,
          hint="count each id with torch.bincount(train_tokens, minlength=vocab_size); p = (count + 1) / "
               "(len(train_tokens) + vocab_size); the loss is the mean of -log p[target]")
