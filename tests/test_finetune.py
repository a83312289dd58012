"""minillm.finetune against torch and against greedy decoding: the batch layout, the answer-only loss, exact
match vs `generate`, what run() measures, and the errors bad inputs get."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minillm import data
from minillm.finetune import (IGNORE_INDEX, FinetuneResult, answer_loss, encode_pair, exact_match, make_batch,
                              optimizer_state_bytes, results_table, run, task_pairs)
from minillm.generation import generate
from minillm.models import GPT, GPTConfig
from minillm.pretrained import PRETRAINED_DIR
from minillm.tokenizer import BPETokenizer

# Short made-up pairs keep a tiny model fast; the answers share words so that the model has to tell them apart.
TOY_PAIRS = [data.QAPair("Q: What is red?\nA:", " a ripe apple"), data.QAPair("Q: What is blue?\nA:", " the sky"),
             data.QAPair("Q: Who sang?\nA:", " Mia"), data.QAPair("Q: Who ran?\nA:", " Leo and Mia"),
             data.QAPair("Q: Where is it?\nA:", " the old barn"), data.QAPair("Q: When?\nA:", " one morning")]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.load(PRETRAINED_DIR / "tokenizer.json")


def tiny_gpt(seed=0, max_seq_len=256):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=1024, max_seq_len=max_seq_len, hidden_size=32, num_layers=1, num_heads=2))


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny GPT trained until it answers some toy pairs and not others: exact match is then neither 0 nor 1."""
    model = tiny_gpt()
    run("memorise", model, tokenizer, steps=60, lr=3e-2, batch_size=4, train_pairs=TOY_PAIRS[:4],
        eval_pairs=TOY_PAIRS, show_progress=False)
    return model


# --- the batch -----------------------------------------------------------------------------------------


def test_encoding_the_parts_equals_encoding_the_whole(tokenizer):
    for pair in task_pairs("val", kinds=data.QUESTION_KINDS, n_stories=40) + TOY_PAIRS:
        prompt_ids, answer_ids = encode_pair(tokenizer, pair)
        assert prompt_ids + answer_ids == tokenizer.encode(pair.prompt + pair.answer + "\n"), (
            f"the prompt and answer of {pair!r} tokenize differently apart than together; training would then "
            "teach a tokenization that greedy decoding never produces")
        assert answer_ids[-1] == tokenizer.encode("\n")[0], "the answer's ids must end with the newline token"


def test_batch_is_right_padded_and_targets_cover_exactly_the_answer(tokenizer):
    pairs = TOY_PAIRS[:3] + task_pairs("train", kinds=("item",), n_stories=12)[:2]
    inputs, targets = make_batch(tokenizer, pairs)
    longest = max(len(tokenizer.encode(p.prompt + p.answer + "\n")) for p in pairs)
    assert inputs.shape == targets.shape == (len(pairs), longest - 1)
    for b, pair in enumerate(pairs):
        full = tokenizer.encode(pair.prompt + pair.answer + "\n")
        n_prompt = len(tokenizer.encode(pair.prompt))
        assert inputs[b, :len(full) - 1].tolist() == full[:-1], f"row {b}: the example must start at column 0"
        scored = (targets[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(n_prompt - 1, len(full) - 1)), (
            f"row {b}: targets must be set from the last prompt position to the one before the newline, "
            f"got positions {scored}")
        assert targets[b, scored].tolist() == full[n_prompt:], f"row {b}: each target is the next answer token"


def test_answer_loss_is_the_cross_entropy_of_answer_tokens_of_each_unpadded_example(tokenizer):
    model = tiny_gpt(seed=1)
    pairs = TOY_PAIRS[:4]
    inputs, targets = make_batch(tokenizer, pairs)
    # Reference: every example alone, unpadded, and torch's cross-entropy summed over its answer tokens.
    total, count = 0.0, 0
    for pair in pairs:
        prompt_ids, answer_ids = encode_pair(tokenizer, pair)
        logits = model(torch.tensor([prompt_ids + answer_ids[:-1]]))[0, len(prompt_ids) - 1:]  # (answer, V)
        total = total + F.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum")
        count += len(answer_ids)
    torch.testing.assert_close(answer_loss(model, inputs, targets), total / count, rtol=1e-5, atol=1e-6,
                               msg="right padding without a mask must not change any answer token's loss")


# --- exact match ----------------------------------------------------------------------------------------


def test_exact_match_equals_greedy_generation(tokenizer, memorised):
    per_pair = []
    for pair in TOY_PAIRS:
        prompt_ids, answer_ids = encode_pair(tokenizer, pair)
        out = generate(memorised, torch.tensor([prompt_ids]), max_new_tokens=len(answer_ids))
        by_generate = out[0, len(prompt_ids):].tolist() == answer_ids
        assert exact_match(memorised, tokenizer, [pair]) == float(by_generate), (
            f"{pair!r}: teacher-forced exact match must agree with greedy generate "
            f"(generate wrote {tokenizer.decode(out[0, len(prompt_ids):].tolist())!r})")
        per_pair.append(by_generate)
    assert any(per_pair) and not all(per_pair), f"the test needs right and wrong answers, got {per_pair}"
    assert exact_match(memorised, tokenizer, TOY_PAIRS, batch_size=4) == sum(per_pair) / len(per_pair), (
        "batched exact match (padded batches of 4 and 2) must equal the per-pair count")


def test_exact_match_restores_the_training_mode(tokenizer):
    model = tiny_gpt().train()
    exact_match(model, tokenizer, TOY_PAIRS[:2])
    assert model.training, "exact_match must put the model back in the mode it found it in"


# --- what run measures ----------------------------------------------------------------------------------


def test_optimizer_state_bytes_counts_adams_two_moments_and_step():
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    for amsgrad, moments in ((False, 2), (True, 3)):
        opt = torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad)
        sum(p.sum() for p in params).backward()
        opt.step()
        step_bytes = opt.state[params[0]]["step"].element_size()  # torch keeps `step` as a scalar tensor
        expected = sum(moments * 4 * p.numel() + step_bytes for p in params)
        assert optimizer_state_bytes(opt) == expected, (
            f"AdamW(amsgrad={amsgrad}) keeps {moments} fp32 buffers of each parameter's size plus a step")
    assert optimizer_state_bytes(torch.optim.SGD(params, lr=0.1)) == 0, "plain SGD keeps no state"


def test_run_trains_only_what_requires_grad_and_reports_it(tokenizer):
    model = tiny_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".h.0." not in n}
    for name, p in model.named_parameters():
        p.requires_grad_(".h.0." in name)  # train the block, freeze embeddings and final norm
    before = copy.deepcopy(model.state_dict())
    result = run("block only", model, tokenizer, steps=2, lr=1e-2, batch_size=2, train_pairs=TOY_PAIRS,
                 eval_pairs=TOY_PAIRS[:2], show_progress=False)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert isinstance(result, FinetuneResult) and result.method == "block only"
    assert result.trainable_params == expected
    assert result.optimizer_state_bytes == sum(2 * 4 * p.numel() + 4 for p in model.parameters() if p.requires_grad)
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    assert 0.0 <= result.accuracy <= 1.0 and result.ms_per_step > 0
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} is frozen and must not change"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_run_is_deterministic_and_its_first_loss_is_the_untrained_answer_loss(tokenizer):
    def once(seed):
        model = tiny_gpt()
        return run("x", model, tokenizer, steps=3, lr=1e-2, batch_size=3, seed=seed, train_pairs=TOY_PAIRS,
                   eval_pairs=TOY_PAIRS, show_progress=False)

    first, again, other = once(0), once(0), once(1)
    assert first.losses == again.losses and first.accuracy == again.accuracy, "same seed, same numbers"
    assert first.losses != other.losses, "the seed must choose the batches"
    # The first batch is the first 3 entries of torch's seeded permutation; its loss is that of the fresh model.
    order = torch.randperm(len(TOY_PAIRS), generator=torch.Generator().manual_seed(0)).tolist()
    inputs, targets = make_batch(tokenizer, [TOY_PAIRS[i] for i in order[:3]])
    assert first.losses[0] == pytest.approx(answer_loss(tiny_gpt(), inputs, targets).item(), rel=1e-6)


def test_results_table_shows_timing_only_when_asked():
    results = [FinetuneResult("full fine-tuning", 0.25, 1000, 8000, 12.3, [1.0]),
               FinetuneResult("LoRA r=2", 0.125, 20, 160, 9.9, [1.0])]
    table = results_table(results)
    assert "full fine-tuning" in table and "25.0%" in table and "12.5%" in table and "2.0%" in table
    assert "ms/step" not in table, "timings change every run; a stored notebook output must not show them"
    assert "ms/step" in results_table(results, timing=True)


# --- bad inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(lr=0.0), "lr must be a number > 0"),
    (dict(batch_size=True), "batch_size must be an int >= 1"),
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(warmup_steps=-2), "warmup_steps must be None or an int >= 0"),
    (dict(grad_clip=-1.0), "grad_clip must be a number >= 0"),
    (dict(train_pairs=[]), "train_pairs is empty"),
])
def test_run_rejects_bad_arguments(tokenizer, kwargs, message):
    args = dict(steps=1, lr=1e-3, train_pairs=TOY_PAIRS, eval_pairs=TOY_PAIRS, show_progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        run("bad", tiny_gpt(), tokenizer, **args)


def test_run_rejects_a_model_with_nothing_to_train_and_a_bad_optimizer(tokenizer):
    frozen = tiny_gpt().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        run("frozen", frozen, tokenizer, steps=1, lr=1e-3, train_pairs=TOY_PAIRS, show_progress=False)
    with pytest.raises(TypeError, match="optimizer must return a torch.optim.Optimizer"):
        run("bad", tiny_gpt(), tokenizer, steps=1, lr=1e-3, optimizer=lambda params: params,
            train_pairs=TOY_PAIRS, show_progress=False)
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        run("", tiny_gpt(), tokenizer, steps=1, lr=1e-3, train_pairs=TOY_PAIRS, show_progress=False)


def test_batch_and_exact_match_reject_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="at least one pair"):
        make_batch(tokenizer, [])
    with pytest.raises(ValueError, match="max_seq_len=8"):
        make_batch(tokenizer, TOY_PAIRS, max_len=8)
    with pytest.raises(TypeError, match="QAPair"):
        encode_pair(tokenizer, "Q: x\nA: y")
    with pytest.raises(ValueError, match="non-empty prompt and answer"):
        encode_pair(tokenizer, data.QAPair("Q: x\nA:", ""))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        exact_match(tiny_gpt(), tokenizer, TOY_PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="at least one pair to score"):
        exact_match(tiny_gpt(), tokenizer, [])
    with pytest.raises(TypeError, match="list of FinetuneResult"):
        results_table([])
