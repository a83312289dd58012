"""Supervised fine-tuning on question-answer pairs, scored by exact match: the experiment of chapters 09-15.

Chapter 09 teaches this file. The task comes from `minillm.data.qa_pairs`: a story, a question about it, and
the answer copied from the story. Pairs from train stories train; pairs from val stories score, and a val
story's (hero, place) pair never occurred in training, so a good score means the model reads the story
rather than remembering who went where.

One example is `prompt + answer + "\\n"` as token ids. The pieces, in the order a step uses them:

- `encode_pair`: the prompt's ids and the answer's ids (the newline included, so the model learns to stop).
  The tokenizer's pre-tokenization cuts before the answer's leading space, so encoding the two parts
  separately gives the same ids as encoding the whole text (tests/test_finetune.py checks it).
- `make_batch`: B examples RIGHT-padded to one length, and targets that are -100 (ignored by
  `F.cross_entropy`) everywhere except where the next token belongs to the answer. No attention mask is
  needed: causal attention never lets a real token see a later pad, and with the padding on the right the
  real tokens keep positions 0, 1, 2, ... So any model that maps input_ids (B, T) to logits (B, T, V) over
  the positions it was given can be trained and scored here, a LoRA-wrapped GPT or a prompt-tuned one alike.
- `answer_loss`: the mean cross-entropy over answer tokens only; the story and the question are given,
  not predicted, so they add nothing to learn.
- `exact_match`: one teacher-forced forward pass per batch; an example counts when the argmax at every
  answer position is the answer's own next token. That is exactly when greedy decoding from the prompt
  writes the answer's ids and then the newline (each greedy step sees the same prefix the teacher-forced
  pass saw), so it equals `minillm.generation.generate`'s exact match on the answer's tokenization at a
  fraction of the cost; tests/test_finetune.py checks the two agree.
- `run`: AdamW (or any optimizer) on the parameters with `requires_grad=True`, on chapter 08's warmup +
  cosine schedule; it measures accuracy, trainable parameters, optimizer-state bytes and time per step and
  returns them as a `FinetuneResult`. `results_table` lines results up for comparison.

Which questions: the task uses TASK_KINDS (see there for why not all five kinds).

Shapes: B batch, T positions, V vocabulary.
"""

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minillm import data
from minillm.peft.lora import trainable_parameters
from minillm.progress import progress
from minillm.train import ENDOFTEXT, lr_at

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: positions that are not part of an answer
# "What did Mia find?" -> " an old kite". The answer is copied from the story: its article, adjective and noun,
# about 1 in 500 by guessing. The other kinds were measured too and need far more steps than a chapter has
# (a few seconds each, on two CPU cores): after 240 full fine-tuning steps "place" was still only at 23 %,
# barely above the 5 % of naming a random place (there is one place per story, and 20 places). The item is
# the fact the pretraining stories repeat ("found an old kite ... went home with the kite"), so the shipped
# model already knows how to look the noun up and copy it; fine-tuning has to point that skill at a question
# and teach it to fetch the adjective, which a story mentions once.
TASK_KINDS = ("item",)
N_STORIES = 1600  # 1456 train pairs, 144 val pairs: enough to tell 10 % from 20 % apart


@dataclass(frozen=True)
class FinetuneResult:
    """What one fine-tuning run measured; `results_table` prints a list of them.

    accuracy: exact match on the held-out pairs after training, in [0, 1].
    trainable_params: parameters that had `requires_grad=True` (shared tensors counted once).
    optimizer_state_bytes: bytes of every tensor in `optimizer.state` after the last step.
    ms_per_step: median wall-clock milliseconds of one training step (forward, backward, optimizer step).
    losses: the training loss of every step, for plotting.
    """

    method: str
    accuracy: float
    trainable_params: int
    optimizer_state_bytes: int
    ms_per_step: float
    losses: list[float]


def task_pairs(split: str, kinds: Sequence[str] = TASK_KINDS, n_stories: int = N_STORIES) -> list[data.QAPair]:
    """The QA pairs of one split ("train" or "val") of the task: one per story and kind."""
    return data.qa_pairs(data.split_stories(split, n_stories=n_stories), tuple(kinds))


def encode_pair(tokenizer, pair: data.QAPair) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a pair; the answer's ids end with the newline that closes it."""
    if not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
        raise TypeError(f"expected a QAPair(prompt, answer) of two strings, got {pair!r:.80}")
    prompt, answer = pair
    if not prompt or not answer:
        raise ValueError(f"a pair needs a non-empty prompt and answer, got {pair!r:.80}")
    return tokenizer.encode(prompt), tokenizer.encode(answer + "\n")


def pad_id(tokenizer) -> int:
    """The id used for padding: <|endoftext|>. Its value never matters (pads are never seen nor scored)."""
    return tokenizer.special_tokens.get(ENDOFTEXT, 0)


def make_batch(tokenizer, pairs: Sequence[data.QAPair],
               max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T) for a list of pairs, right-padded to the longest example.

    Example b is prompt + answer without its last token; targets[b, t] is the token after position t where
    that token belongs to the answer, and IGNORE_INDEX everywhere else (prompt and padding).
    """
    if not pairs:
        raise ValueError("make_batch needs at least one pair")
    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    T = max(len(p) + len(a) for p, a in encoded) - 1  # the last token is only ever a target
    if max_len is not None and T > max_len:
        raise ValueError(f"make_batch: the longest example needs {T} positions but the model reads at most "
                         f"max_seq_len={max_len}; use shorter stories or a model with a longer context")
    inputs = torch.full((len(pairs), T), pad_id(tokenizer), dtype=torch.long)  # (B, T)
    targets = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (prompt_ids, answer_ids) in enumerate(encoded):
        ids = prompt_ids + answer_ids
        inputs[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        # The last prompt position predicts the first answer token, and so on to the closing newline.
        targets[b, len(prompt_ids) - 1:len(ids) - 1] = torch.tensor(answer_ids)
    return inputs, targets


def answer_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of the answer tokens; every IGNORE_INDEX position is skipped."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, pairs: Sequence[data.QAPair], batch_size: int = 64) -> float:
    """The fraction of pairs whose answer greedy decoding would write exactly (see the module docstring).

    The model runs in eval mode (no dropout) and is put back in its previous mode after.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"exact_match: batch_size must be an int >= 1, got {batch_size!r}")
    if not pairs:
        raise ValueError("exact_match needs at least one pair to score")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(pairs), batch_size):
            inputs, targets = make_batch(tokenizer, pairs[start:start + batch_size])
            predicted = model(inputs).argmax(dim=-1)  # (B, T)
            right = (predicted == targets) | (targets == IGNORE_INDEX)  # (B, T): only answer positions count
            correct += right.all(dim=1).sum().item()
    finally:
        model.train(was_training)
    return correct / len(pairs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in `optimizer.state` (Adam: exp_avg, exp_avg_sq and a step counter per
    parameter), looked up in nested dicts and lists too, so quantized states with their scales count."""
    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(nbytes(v) for v in value)
        return 0

    return sum(nbytes(state) for state in optimizer.state.values())


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW without weight decay: a few hundred fine-tuning steps should not pull weights toward zero."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def run(name: str, model: nn.Module, tokenizer, *, steps: int, lr: float,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None, seed: int = 0,
        batch_size: int = 8, warmup_steps: int | None = None, grad_clip: float = 1.0,
        train_pairs: Sequence[data.QAPair] | None = None, eval_pairs: Sequence[data.QAPair] | None = None,
        show_progress: bool = True) -> FinetuneResult:
    """Fine-tune the parameters of `model` that have requires_grad=True, in place, then score it.

    `optimizer` builds the optimizer from the list of trainable parameters (default: `default_optimizer`,
    AdamW); every step sets each group's lr from the schedule (linear warmup over `warmup_steps`, default a
    tenth of the steps, then cosine decay to lr / 10), so the factory's own lr is never used. Batches of
    `batch_size` pairs are drawn without replacement from a seeded generator, epoch after epoch.
    `train_pairs` / `eval_pairs` default to the task's train / val pairs. The same seed, model and thread
    count give the same numbers (minillm.notebook.setup() uses one thread), apart from `ms_per_step`.
    The model is left in eval mode.
    """
    _check_run_args(name, model, steps, lr, seed, batch_size, warmup_steps, grad_clip)
    train_pairs = task_pairs("train") if train_pairs is None else list(train_pairs)
    eval_pairs = task_pairs("val") if eval_pairs is None else list(eval_pairs)
    if not train_pairs:
        raise ValueError("run: train_pairs is empty; pass at least one QAPair to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"run({name!r}): the model has no parameter with requires_grad=True, nothing to train")
    opt = (optimizer or default_optimizer)(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"run: optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    torch.manual_seed(seed)  # dropout inside the model, if it has any
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses, step_seconds = [], []
    model.train()
    for step in progress(range(steps), desc=name, disable=not show_progress):
        if len(order) < batch_size:  # a new epoch: a fresh permutation after the leftovers
            order += torch.randperm(len(train_pairs), generator=generator).tolist()
        batch, order = [train_pairs[i] for i in order[:batch_size]], order[batch_size:]
        inputs, targets = make_batch(tokenizer, batch)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_lr=lr, min_lr=lr / 10, warmup_steps=min(warmup_steps, steps - 1),
                                total_steps=steps)
        opt.zero_grad(set_to_none=True)
        loss = answer_loss(model, inputs, targets)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    model.eval()
    return FinetuneResult(method=name, accuracy=exact_match(model, tokenizer, eval_pairs),
                          trainable_params=trainable_parameters(model),
                          optimizer_state_bytes=optimizer_state_bytes(opt),
                          ms_per_step=1000 * statistics.median(step_seconds), losses=losses)


def results_table(results: Sequence[FinetuneResult], timing: bool = False) -> str:
    """A fixed-width table of results, one row each; the optimizer state is also given relative to the
    first row (the chapter puts full fine-tuning first).

    `timing=False` leaves out ms/step: a time differs on every run, and a notebook's stored outputs must
    not (chapter 09 prints the timed table in a cell tagged `volatile-output`, see scripts/run_notebooks.py).
    """
    if not results or not all(isinstance(r, FinetuneResult) for r in results):
        raise TypeError("results_table needs a non-empty list of FinetuneResult (what run() returns)")
    first = results[0].optimizer_state_bytes
    header = f"{'method':<22} {'accuracy':>8} {'trainable':>10} {'optimizer state':>15} {'vs first':>8}"
    if timing:
        header += f" {'ms/step':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        relative = f"{100 * r.optimizer_state_bytes / first:.1f}%" if first else "-"
        line = (f"{r.method:<22} {100 * r.accuracy:>7.1f}% {r.trainable_params:>10,} "
                f"{r.optimizer_state_bytes:>15,} {relative:>8}")
        if timing:
            line += f" {r.ms_per_step:>8.0f}"
        lines.append(line)
    return "\n".join(lines)


SEEDS_RESULTS = Path(__file__).resolve().parent / "assets" / "finetune_seeds.json"


def seeds_table(methods: Sequence[str], path=SEEDS_RESULTS) -> str:
    """Rows of chapters 09 and 10's table over several seeds, as scripts/finetune_seeds.py recorded them.

    Each cell is mean ± sample standard deviation over the seeds, on the held-out pairs: exact match, answer
    loss (nats per answer token) and answer-token accuracy (teacher-forced argmax). A notebook trains one seed
    within its minute; this table, computed once by the script and committed, is what tells a difference
    between methods from the spread between seeds.
    """
    report = json.loads(Path(path).read_text())
    unknown = [m for m in methods if m not in report["methods"]]
    if unknown:
        raise ValueError(f"seeds_table: {unknown} not in {path}; it holds {list(report['methods'])}")
    header = (f"{'method':<20} {'steps':>5} {'exact match':>15} {'answer loss (nats)':>19} "
              f"{'token accuracy':>15}")
    lines = [f"{len(report['seeds'])} seeds ({', '.join(map(str, report['seeds']))}), mean ± sd over seeds, "
             f"{report['val_pairs']} held-out pairs", header, "-" * len(header)]
    for method in methods:
        row = report["methods"][method]
        em, loss, acc = row["exact_match"], row["answer_loss"], row["token_accuracy"]
        lines.append(f"{method:<20} {row['steps']:>5} {100 * em['mean']:>7.1f} ± {100 * em['sd']:>4.1f}% "
                     f"{loss['mean']:>11.3f} ± {loss['sd']:.3f} {100 * acc['mean']:>7.1f} ± {100 * acc['sd']:>3.1f}%")
    return "\n".join(lines)


def _check_run_args(name, model, steps, lr, seed, batch_size, warmup_steps, grad_clip) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"run: name must be a non-empty string (the table's row label), got {name!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"run: model must be an nn.Module mapping input_ids (B, T) to logits, "
                        f"got {type(model).__name__}")
    for what, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"run: {what} must be an int >= {minimum}, got {value!r}")
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                     or warmup_steps < 0):
        raise ValueError(f"run: warmup_steps must be None or an int >= 0, got {warmup_steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"run: lr must be a number > 0, got {lr!r}")
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or grad_clip < 0:
        raise ValueError(f"run: grad_clip must be a number >= 0 (0 turns clipping off), got {grad_clip!r}")


__all__ = ["FinetuneResult", "IGNORE_INDEX", "TASK_KINDS", "answer_loss", "encode_pair", "exact_match",
           "make_batch", "optimizer_state_bytes", "results_table", "run", "task_pairs"]
