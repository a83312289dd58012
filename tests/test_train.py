"""minillm.train against torch: the schedule vs torch's LR schedulers, the loop vs a plain torch loop,
gradient accumulation vs one big batch, the baselines vs counts done another way."""

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from minillm import data
from minillm.models import GPT, GPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.train import (ENDOFTEXT, TrainConfig, accumulate_gradients, bigram_loss, eval_windows, evaluate,
                           get_batch, lm_loss, lr_at, sample, story_tokens, train, unigram_loss)

N_STORIES = 60  # a small corpus keeps every test here fast


@pytest.fixture(scope="module")
def tokenizer():
    texts = [story.text for story in data.split_stories("train", n_stories=N_STORIES)]
    return BPETokenizer.train(texts, 300, special_tokens=[ENDOFTEXT])


@pytest.fixture(scope="module")
def streams(tokenizer):
    return (story_tokens(tokenizer, "train", n_stories=N_STORIES),
            story_tokens(tokenizer, "val", n_stories=N_STORIES))


def tiny_gpt(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=tokenizer.vocab_size, max_seq_len=32, hidden_size=32, num_layers=2, num_heads=2)
    return GPT(GPTConfig(**{**sizes, **overrides}))


# --- data -------------------------------------------------------------------------------------------


def test_story_tokens_decode_to_the_stories_each_followed_by_endoftext(tokenizer, streams):
    stories = data.split_stories("train", n_stories=N_STORIES)
    expected = "".join(story.text + ENDOFTEXT for story in stories)
    assert tokenizer.decode(streams[0].tolist()) == expected, "the stream must be story, <|endoftext|>, story, ..."
    assert streams[0].dtype == torch.long and streams[0].dim() == 1


def test_story_tokens_needs_the_separator():
    plain = BPETokenizer.train([data.corpus("train", n_stories=5)], 260)
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        story_tokens(plain, "train", n_stories=5)


def test_get_batch_windows_are_shifted_slices_of_the_stream(streams):
    tokens = streams[0]
    inputs, targets = get_batch(tokens, 5, 7, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (5, 7)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]), "targets must be the inputs shifted left by one"
    starts = torch.randint(len(tokens) - 7, (5,), generator=torch.Generator().manual_seed(1))
    for row, start in zip(inputs, starts.tolist()):
        assert torch.equal(row, tokens[start:start + 7]), "each window must be consecutive stream tokens"
    again, _ = get_batch(tokens, 5, 7, torch.Generator().manual_seed(1))
    assert torch.equal(inputs, again), "the same seed must give the same batch"


def test_get_batch_rejects_a_stream_shorter_than_a_window():
    with pytest.raises(ValueError, match="block_size \\+ 1 = 9"):
        get_batch(torch.arange(8), 2, 8)


# --- schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup, total", [(5, 30), (0, 10), (1, 7), (20, 21)])
def test_lr_at_equals_torch_linear_then_cosine(warmup, total):
    max_lr, min_lr = 1e-2, 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_lr)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    else:
        scheduler = cosine
    for step in range(total + 1):
        expected = optimizer.param_groups[0]["lr"]
        got = lr_at(step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
        assert math.isclose(got, expected, rel_tol=1e-9), (
            f"step {step}: lr_at gives {got}, torch's LinearLR -> CosineAnnealingLR gives {expected}")
        optimizer.step()
        scheduler.step()
    assert lr_at(total + 5, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total) == min_lr


def test_lr_at_rejects_warmup_as_long_as_training():
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        lr_at(0, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=10)


# --- gradients and the loop -------------------------------------------------------------------------


def test_accumulating_k_micro_batches_equals_one_big_batch(tokenizer, streams):
    model = tiny_gpt(tokenizer)
    inputs, targets = get_batch(streams[0], 6, 16, torch.Generator().manual_seed(2))
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro = [(inputs[i:i + 2], targets[i:i + 2]) for i in range(0, 6, 2)]
    loss = accumulate_gradients(model, micro)
    assert math.isclose(loss, lm_loss(model, inputs, targets).item(), rel_tol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: 3 accumulated micro-batches of 2 must give the "
                                                 f"gradient of one batch of 6 (divide each loss by 3)\n{m}")


def test_train_equals_a_plain_torch_loop(tokenizer, streams):
    """Same batches, AdamW with decay on matrices only, LambdaLR, clip_grad_norm_: the same weights."""
    config = TrainConfig(steps=6, batch_size=3, block_size=16, warmup_steps=2, grad_clip=0.5, eval_every=3,
                         eval_windows=2, show_progress=False, seed=7)
    model = tiny_gpt(tokenizer)
    reference = copy.deepcopy(model)
    history = train(model, *streams, config)

    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.max_lr, betas=config.betas)
    schedule = lambda step: lr_at(step, max_lr=config.max_lr, min_lr=config.min_lr,  # noqa: E731
                                  warmup_steps=config.warmup_steps, total_steps=config.steps) / config.max_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    reference.train()
    for _ in range(config.steps):
        inputs, targets = get_batch(streams[0], config.batch_size, config.block_size, generator)
        optimizer.zero_grad()
        F.cross_entropy(reference(inputs).flatten(0, 1), targets.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} after 6 steps differs from the torch loop's\n{m}")
    assert len(history["train_loss"]) == len(history["lr"]) == len(history["grad_norm"]) == 6
    assert history["val_step"] == [3, 6] and len(history["val_loss"]) == 2
    assert any(norm > config.grad_clip for norm in history["grad_norm"]), "clipping was never exercised"


def test_gradient_checkpointing_changes_nothing_but_memory(tokenizer, streams):
    config = TrainConfig(steps=3, batch_size=2, block_size=16, warmup_steps=1, eval_every=3, eval_windows=1,
                         show_progress=False)
    plain, checkpointed = tiny_gpt(tokenizer), tiny_gpt(tokenizer)
    expected = train(plain, *streams, config)
    got = train(checkpointed, *streams, TrainConfig(**{**vars(config), "gradient_checkpointing": True}))
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_trains_close_to_fp32(tokenizer, streams):
    config = TrainConfig(steps=4, batch_size=2, block_size=16, warmup_steps=1, eval_every=4, eval_windows=2,
                         show_progress=False)
    fp32 = train(tiny_gpt(tokenizer), *streams, config)
    bf16_model = tiny_gpt(tokenizer)
    bf16 = train(bf16_model, *streams, TrainConfig(**{**vars(config), "bf16": True}))
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters()), "autocast must keep float32 weights"
    # bfloat16 keeps 8 bits of mantissa: losses agree to about 1e-2, not to float32 precision.
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=2e-2)


def test_training_lowers_the_validation_loss(tokenizer, streams):
    config = TrainConfig(steps=40, batch_size=8, block_size=32, warmup_steps=5, max_lr=1e-2, eval_every=40,
                         eval_windows=None, show_progress=False)
    model = tiny_gpt(tokenizer)
    before = evaluate(model, streams[1], 32)
    after = train(model, *streams, config)["val_loss"][-1]
    assert after < before - 1.0, f"40 steps should lower the val loss by over a nat: {before:.3f} -> {after:.3f}"


# --- evaluation and baselines -----------------------------------------------------------------------


def test_evaluate_is_the_loss_on_consecutive_windows(tokenizer, streams):
    model = tiny_gpt(tokenizer)
    tokens = streams[1]
    inputs, targets = eval_windows(tokens, 16, 3)
    assert torch.equal(inputs.flatten(), tokens[:48]) and torch.equal(targets.flatten(), tokens[1:49])
    logits = model(inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert evaluate(model, tokens, 16, max_windows=3) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least one window"):
        evaluate(model, tokens[:10], 16)


def test_unigram_and_bigram_baselines_match_counting_by_hand(streams):
    train_tokens, val_tokens = streams
    V = 300
    inputs, targets = eval_windows(val_tokens, 16, 4)
    unigram = Counter(train_tokens.tolist())
    pairs = Counter(zip(train_tokens[:-1].tolist(), train_tokens[1:].tolist()))
    firsts = Counter(train_tokens[:-1].tolist())
    N = len(train_tokens)
    expected_uni = -sum(math.log((unigram[t] + 1) / (N + V)) for t in targets.flatten().tolist()) / targets.numel()
    expected_bi = -sum(math.log((pairs[a, b] + 1) / (firsts[a] + V))
                       for a, b in zip(inputs.flatten().tolist(), targets.flatten().tolist())) / targets.numel()
    assert unigram_loss(train_tokens, targets, V) == pytest.approx(expected_uni, rel=1e-12)
    assert bigram_loss(train_tokens, inputs, targets, V) == pytest.approx(expected_bi, rel=1e-12)
    assert bigram_loss(train_tokens, inputs, targets, V) < unigram_loss(train_tokens, targets, V) < math.log(V)


# --- sampling ---------------------------------------------------------------------------------------


def test_greedy_sample_follows_the_argmax(tokenizer):
    model = tiny_gpt(tokenizer, seed=3).eval()
    text = sample(model, tokenizer, "One morning,", 5, temperature=0)
    ids = tokenizer.encode("One morning,")
    for _ in range(5):
        next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
        if next_id == tokenizer.special_tokens[ENDOFTEXT]:
            break
        ids.append(next_id)
    assert text == tokenizer.decode(ids[len(tokenizer.encode("One morning,")):])


def test_sampling_is_reproducible_with_a_seeded_generator(tokenizer):
    model = tiny_gpt(tokenizer, seed=3).eval()
    first = sample(model, tokenizer, "Mia", 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    second = sample(model, tokenizer, "Mia", 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert first == second
