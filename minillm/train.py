"""Pretraining a language model: tokens -> random windows -> AdamW steps on a warmup + cosine schedule.

Chapter 08 teaches this file top to bottom. The pieces, in the order a step uses them:

- `story_tokens`: a split of `minillm.data` as one long stream of token ids (chapter 04's tokenizer), each
  story followed by `<|endoftext|>`, so the model learns where a story ends and a new one begins.
- `get_batch`: B random windows of block_size + 1 tokens from a seeded `torch.Generator`; the input is a
  window's first block_size tokens, the target the same window shifted by one.
- `lr_at`: linear warmup, then a cosine decay to `min_lr`; the same numbers as torch's
  `SequentialLR([LinearLR, CosineAnnealingLR])` (tests/test_train.py checks it).
- `accumulate_gradients`: forward and backward over k micro-batches, each loss divided by k, so the summed
  gradient equals that of one batch k times larger, in the memory of one micro-batch.
- `train_step`: one optimizer step: schedule, accumulated gradients, clipping by global norm, AdamW update.
- `train`: the loop (batches, `train_step`, optional bf16 autocast and gradient checkpointing, evaluation on
  the val split), which returns a history for plotting loss curves.
- `evaluate`, `unigram_loss`, `bigram_loss`: the validation loss and the two baselines it is judged against.

This is the recipe of nanoGPT's train.py, cut down to what one CPU and one screen hold.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minillm import data
from minillm.generation import generate
from minillm.progress import progress

ENDOFTEXT = "<|endoftext|>"  # separates stories in the token stream, as in GPT-2's training data


def story_tokens(tokenizer, split: str = "train", seed: int = 0, n_stories: int = data.DEFAULT_N_STORIES) -> torch.Tensor:
    """One split of the story corpus as a 1-D LongTensor: story, <|endoftext|>, story, <|endoftext|>, ...

    Each story is encoded on its own (a story is one line), so no token straddles two stories.
    """
    if ENDOFTEXT not in tokenizer.special_tokens:
        raise ValueError(f"the tokenizer needs the special token {ENDOFTEXT!r} to separate stories; train it "
                         f"with BPETokenizer.train(texts, vocab_size, special_tokens=[{ENDOFTEXT!r}])")
    eot = tokenizer.special_tokens[ENDOFTEXT]
    ids = []
    for story in data.split_stories(split, seed, n_stories):
        ids += tokenizer.encode(story.text) + [eot]
    return torch.tensor(ids, dtype=torch.long)  # (N,)


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B windows of block_size + 1 consecutive tokens at random starts: inputs (B, T) and targets (B, T).

    targets[b, t] = inputs[b, t + 1] within a window: every position predicts its next token, so one
    window gives T training examples at once (the causal mask keeps each from seeing its answer).
    """
    if tokens.dim() != 1 or len(tokens) < block_size + 1:
        raise ValueError(f"get_batch needs a 1-D token stream of at least block_size + 1 = {block_size + 1} "
                         f"tokens, got shape {tuple(tokens.shape)}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr.

    Warmup climbs max_lr * (step + 1) / (warmup_steps + 1) and reaches max_lr at step warmup_steps: Adam's
    second-moment estimates are still noise in the first steps, and full-size updates then can wreck the
    initialisation. The cosine then glides from max_lr to min_lr at total_steps and stays there.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"lr_at needs 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    done = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # 0 -> 1 over the decay
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of `model` on (B, T) inputs and targets."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def accumulate_gradients(model, micro_batches, bf16: bool = False) -> float:
    """Backward through each (inputs, targets) micro-batch with its loss divided by their number k.

    Gradients add up in `.grad` across backward calls, so the sum of k gradients of loss/k is the gradient
    of the mean loss over all k micro-batches: one big batch's gradient when the micro-batches are equal
    in size. Returns that mean loss.
    """
    micro_batches = list(micro_batches)
    total = 0.0
    for inputs, targets in micro_batches:
        # bf16 autocast runs the matmuls in bfloat16 (faster on CPUs that have it) and keeps the weights,
        # the gradients and the loss in float32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, inputs, targets) / len(micro_batches)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, block_size: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of `tokens` (no randomness).

    Windows start at 0, block_size, 2 * block_size, ...; each predicts its block_size next tokens. The
    same tokens always give the same number, so a recorded validation loss can be checked later.
    """
    was_training = model.training
    model.eval()
    n_windows = (len(tokens) - 1) // block_size
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    inputs, targets = eval_windows(tokens, block_size, n_windows)
    loss = lm_loss(model, inputs, targets).item()
    model.train(was_training)
    return loss


def eval_windows(tokens: torch.Tensor, block_size: int, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_windows` consecutive windows of `tokens`: inputs (n, T) and targets (n, T)."""
    if n_windows < 1:
        raise ValueError(f"need at least one window of block_size + 1 = {block_size + 1} tokens, "
                         f"got {len(tokens)} tokens")
    span = tokens[:n_windows * block_size + 1]
    return span[:-1].view(n_windows, block_size), span[1:].view(n_windows, block_size)  # (n, T), (n, T)


def unigram_loss(train_tokens: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Loss of predicting every token with its train-split frequency, add-one (Laplace) smoothed.

    p(t) = (count(t) + 1) / (N + V): adding one to every count gives tokens never seen in train a small
    probability instead of zero (an infinite loss). A model that ignores context can do no better.
    """
    counts = torch.bincount(train_tokens, minlength=vocab_size).double()  # (V,)
    log_p = torch.log((counts + 1) / (counts.sum() + vocab_size))  # (V,)
    return -log_p[targets.flatten()].mean().item()


def bigram_loss(train_tokens: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Loss of predicting each token from the one before it, with add-one smoothed train-split counts.

    p(b | a) = (count(a, b) + 1) / (count(a) + V), counting the pairs (a, b) of consecutive train tokens.
    A transformer that beats this uses more context than one token.
    """
    pairs = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)  # (V, V): row a, column b
    pairs.index_put_((train_tokens[:-1], train_tokens[1:]), torch.ones(len(train_tokens) - 1, dtype=torch.float64),
                     accumulate=True)
    log_p = torch.log((pairs + 1) / (pairs.sum(dim=1, keepdim=True) + vocab_size))  # (V, V)
    return -log_p[inputs.flatten(), targets.flatten()].mean().item()


@dataclass
class TrainConfig:
    """Everything `train` needs besides the model and the data. A step sees batch_size * grad_accum_steps
    windows of block_size tokens."""

    steps: int = 1000
    batch_size: int = 16
    block_size: int = 128
    grad_accum_steps: int = 1
    max_lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0           # max global gradient norm; 0 turns clipping off
    eval_every: int = 100            # evaluate on the val split every this many steps (and after the last)
    eval_windows: int | None = 16    # val windows per evaluation; None means the whole split
    bf16: bool = False               # autocast the forward pass to bfloat16
    gradient_checkpointing: bool = False
    seed: int = 0                    # of the generator that draws the batches
    show_progress: bool = True

    def __post_init__(self):
        _check_train_config(self)


def _check_train_config(config: TrainConfig) -> None:
    """ValueError naming the first field `train` cannot run with (eval_every=0 would divide by zero, steps=-5
    would train nothing, batch_size=0 would stack no windows), with the value and what is allowed."""
    def fail(name, allowed):
        raise ValueError(f"TrainConfig: {name} must be {allowed}, got {getattr(config, name)!r}")

    minimum = dict(steps=1, batch_size=1, block_size=1, grad_accum_steps=1, warmup_steps=0, eval_every=1, seed=0)
    for name, least in minimum.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(name, f"an int >= {least}")
    if config.warmup_steps >= config.steps:
        fail("warmup_steps", f"less than steps={config.steps} (the warmup is part of the run)")
    if not _is_finite_number(config.max_lr) or config.max_lr <= 0:
        fail("max_lr", "a finite number > 0")
    if not _is_finite_number(config.min_lr) or not 0 <= config.min_lr <= config.max_lr:
        fail("min_lr", f"a number in [0, max_lr={config.max_lr}] (where the cosine decay ends)")
    for name in ("weight_decay", "grad_clip"):
        if not _is_finite_number(getattr(config, name)) or getattr(config, name) < 0:
            fail(name, "a finite number >= 0" + (" (0 turns clipping off)" if name == "grad_clip" else ""))
    betas = config.betas
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_finite_number(b) and 0 <= b < 1 for b in betas)):
        fail("betas", "a pair (beta1, beta2) of numbers in [0, 1)")
    eval_windows = config.eval_windows
    if eval_windows is not None and (isinstance(eval_windows, bool) or not isinstance(eval_windows, int)
                                     or eval_windows < 1):
        fail("eval_windows", "None (the whole val split) or an int >= 1")
    for name in ("bf16", "gradient_checkpointing", "show_progress"):
        if not isinstance(getattr(config, name), bool):
            fail(name, "True or False")


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_optimizer(model, config: TrainConfig, optimizer_class=torch.optim.AdamW) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only: decaying biases, LayerNorm gains and embeddings' 1-D
    friends only pulls them away from the values they need (nanoGPT does the same). `optimizer_class` takes
    any optimizer with AdamW's arguments, such as chapter 15's `AdamW8bit`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return optimizer_class(groups, lr=config.max_lr, betas=config.betas)


def train_step(model, optimizer: torch.optim.Optimizer, micro_batches, step: int,
               config: TrainConfig) -> tuple[float, float, float]:
    """Optimizer step number `step` (0-based) of `train` on a list of (inputs, targets) micro-batches (B, T).

    Sets every parameter group's learning rate from the schedule, accumulates the micro-batches' gradients
    from zero, clips them to a global norm of `config.grad_clip` (0: no clipping) and lets the optimizer
    update. Returns (learning rate, mean loss of the micro-batches, gradient norm before clipping).
    Chapter 08's build exercise 8.5; `train` calls it through this module, so a learner's can stand in.
    """
    lr = lr_at(step, max_lr=config.max_lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
               total_steps=config.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, micro_batches, bf16=config.bf16)
    # Clipping rescales the whole gradient when its norm is large: one bad batch cannot throw the
    # weights far. It returns the norm before clipping, worth watching in the history.
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    optimizer.step()
    return lr, loss, grad_norm


def train(model, train_tokens: torch.Tensor, val_tokens: torch.Tensor, config: TrainConfig,
          optimizer_class=torch.optim.AdamW) -> dict[str, list]:
    """Train `model` in place; return its history: per step "lr", "train_loss", "grad_norm", and per
    evaluation "val_step", "val_loss"."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config, optimizer_class)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.train()
    history = {"lr": [], "train_loss": [], "grad_norm": [], "val_step": [], "val_loss": []}
    for step in progress(range(config.steps), desc="train", disable=not config.show_progress):
        micro_batches = [get_batch(train_tokens, config.batch_size, config.block_size, generator)
                         for _ in range(config.grad_accum_steps)]
        lr, loss, grad_norm = train_step(model, optimizer, micro_batches, step, config)
        history["lr"].append(lr)
        history["train_loss"].append(loss)
        history["grad_norm"].append(grad_norm)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["val_step"].append(step + 1)
            history["val_loss"].append(evaluate(model, val_tokens, config.block_size, config.eval_windows))
    model.eval()
    return history


def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> str:
    """Continue `prompt` by up to `max_new_tokens` tokens and return the new text only; stops at <|endoftext|>.

    Text in, text out around chapter 07's `generate` (KV cache, temperature 0 means greedy).
    """
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)  # (1, T)
    out = generate(model, ids, max_new_tokens, temperature=temperature, generator=generator, eos_token_id=eot)
    new = out[0, ids.size(1):].tolist()
    return tokenizer.decode(new[:new.index(eot)] if eot in new else new)
