"""Checks for chapter 07's exercises, judged inside each check: HF Transformers' `DynamicLayer` and
`DynamicSlidingWindowLayer` judge the cache update, HF `generate` on the same weights judges the decode loop
and the plugged-in generation, HF's `TopKLogitsWarper` / `TopPLogitsWarper` judge the filters, and
`torch.multinomial` with the same seed judges sampling."""

from functools import partial

import torch
import transformers

from minillm.exercises import Mismatch, check, exercise, expect_equal, first_mismatch, verdict

transformers.logging.set_verbosity_error()

VOCAB = 97  # the chapter's tiny vocabulary


def _hf_model(family: str, seed: int = 0, sliding_window: int | None = None) -> torch.nn.Module:
    """The chapter's tiny HF models (GPT-2, Llama with GQA, Mistral), weights redrawn with std 0.2 so that
    greedy decoding does not repeat one token. No eos token: HF then generates exactly max_new_tokens."""
    special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, **special))
    else:
        sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **special)
        model = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)) if sliding_window is None else
                 transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=sliding_window, **sizes)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    return model.eval()


def _ours(hf: torch.nn.Module) -> torch.nn.Module:
    from minillm.models import GPT, Llama

    return (GPT if isinstance(hf, transformers.GPT2LMHeadModel) else Llama).from_hf(hf).eval()


def _hf_generate(hf, prompts: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, **kwargs)


def _expect_same_ids(got, expected: torch.Tensor, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected ids of shape {tuple(expected.shape)} (prompt + new tokens), got {shape}")
    different = (got != expected).nonzero()
    if len(different):
        row, column = (int(i) for i in different[0])
        raise Mismatch(f"{what}: first different id at row {row}, position {column}: HF {int(expected[row, column])}"
                       f", yours {int(got[row, column])}")


# --- 7.1 the cache update (build) -------------------------------------------------------------------------


@exercise("7.1", "KV cache update with a rolling window", kind="build", component="cache_update",
          replaces="minillm.cache:update_layer", hides=("update_layer", "minillm.cache.update_layer"))
def check_update_layer(update_layer) -> None:
    """Exercise 7.1: `update_layer(K, V, seen, k, v)` stores k, v (B, nkv, T, hd) in one layer's buffers K, V
    (B, nkv, L, hd) after the `seen` positions so far and returns what the layer may attend to; once the
    buffer is full it rolls (a sliding window keeps L = W - 1 positions), as HF's cache layers do."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # judges every step

    g = torch.Generator().manual_seed(71)

    def case(B, nkv, hd, chunks, max_len, window=None):
        def run():
            L = max_len if window is None else min(max_len, window - 1)
            K, V = torch.randn(B, nkv, L, hd, generator=g), torch.randn(B, nkv, L, hd, generator=g)  # stale data
            reference = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
            seen = 0
            for step, T in enumerate(chunks, start=1):
                k, v = torch.randn(B, nkv, T, hd, generator=g), torch.randn(B, nkv, T, hd, generator=g)
                expected_k, expected_v = reference.update(k.clone(), v.clone())
                what = (f"{'no window' if window is None else f'window {window}'}, buffer L={L}, step {step} "
                        f"(seen={seen}, T={T} new)")
                got = update_layer(K, V, seen, k, v)
                if not isinstance(got, tuple) or len(got) != 2:
                    raise Mismatch(f"{what}: expected a pair (keys, values), got {type(got).__name__}")
                expect_equal(got[0], expected_k, what=f"{what}: keys returned", atol=0, rtol=0)
                expect_equal(got[1], expected_v, what=f"{what}: values returned", atol=0, rtol=0)
                stored = min(seen + T, L)
                expect_equal(K[:, :, :stored], reference.keys, atol=0, rtol=0,
                             what=f"{what}: the first {stored} positions of the buffer K afterwards")
                expect_equal(V[:, :, :stored], reference.values, atol=0, rtol=0,
                             what=f"{what}: the first {stored} positions of the buffer V afterwards")
                fits = seen + T <= L
                if fits and got[0].untyped_storage().data_ptr() != K.untyped_storage().data_ptr():
                    raise Mismatch(f"{what}: the new positions fit in the buffer, so the keys returned should be "
                                   "a view of K, not a copy (the buffer was preallocated to avoid copies)")
                seen += T
        return run

    cases = [case(1, 2, 4, [5, 1, 1], max_len=8), case(2, 3, 6, [3, 2, 1, 4], max_len=10),
             case(1, 2, 4, [2, 1, 1, 1, 1], max_len=16, window=4), case(2, 1, 3, [7, 1, 1, 2], max_len=16, window=5),
             case(1, 2, 4, [1, 1, 3, 1], max_len=16, window=2)]
    check("7.1", cases,
          hint="while the new positions fit after the `seen` stored ones, write them there and return the "
               "filled part of the buffer; once they do not fit, the layer attends to the kept positions plus "
               "the new ones, and the buffer keeps only the newest L of those, oldest first",
          more="the kept positions are the first min(seen, L) of the buffer. A slice along dim 2 is a view "
               "you can copy into (and return without copying); when rolling, join the kept and the new "
               "positions along dim 2 and copy the last L of them back into the buffer before returning the "
               "joined keys and values")


# --- 7.2 the decode loop (build) ---------------------------------------------------------------------------


def _forward_calls(model, cache) -> tuple[list, object]:
    """Record each forward call of `model`: (positions fed, whether it got `cache`). Returns (calls, hook handle)."""
    calls = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        given = kwargs["cache"] if "cache" in kwargs else (args[2] if len(args) > 2 else None)
        calls.append((ids.size(1) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None, given is cache))

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


def _expect_calls(calls: list, prompt_len: int, new_tokens: int, cached: bool, what: str) -> None:
    expected = ([prompt_len] + [1] * (new_tokens - 1)) if cached else [prompt_len + i for i in range(new_tokens)]
    if len(calls) != len(expected):
        raise Mismatch(f"{what}: expected {len(expected)} forward calls (one per new token), got {len(calls)}")
    for i, ((fed, with_cache), wanted) in enumerate(zip(calls, expected), start=1):
        if not with_cache:
            given = "the cache" if cached else "None"
            raise Mismatch(f"{what}: forward call {i} did not get the loop's cache argument ({given})")
        if fed != wanted:
            raise Mismatch(f"{what}: forward call {i} fed {fed} positions, expected {wanted}"
                           + (" (with a cache, only the newest token after the prompt)" if cached and i > 1 else ""))


@exercise("7.2", "the cached decode loop", kind="build", component="decode_loop",
          replaces="minillm.generation:decode_loop", hides=("decode_loop", "minillm.generation.decode_loop"))
def check_decode_loop(decode_loop) -> None:
    """Exercise 7.2: `decode_loop(model, input_ids, max_new_tokens, choose_next, cache, eos_token_id)` continues
    input_ids (B, T) by one forward per new token, prefill then one token per step with a cache; the ids must
    be HF `generate`'s on the same weights."""
    from minillm.generation import sample_next_token

    def greedy(logits):
        return logits.argmax(dim=-1)

    def case(family, B, T, new_tokens, cached=True, window=None, eos_step=None, sampled=False):
        def run():
            hf = _hf_model(family, seed=B + T, sliding_window=window)
            ours = _ours(hf)
            prompts = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(T))
            # HF runs with a cache exactly when the loop does: the same ops in the same order on both sides, so
            # the logits, and with them every argmax and draw, are the same on every CPU.
            settings = dict(do_sample=False, use_cache=cached)
            choose = greedy
            if sampled:
                settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, use_cache=cached)
                choose = partial(sample_next_token, temperature=0.8, top_k=20, top_p=0.9)
            eos = None
            if eos_step is not None:  # a token row 0 produces at that step: row 0 finishes early, the rest go on
                eos = int(_hf_generate(hf, prompts, new_tokens, **settings)[0, T + eos_step])
                settings.update(eos_token_id=eos, pad_token_id=eos)
            what = (f"{type(hf).__name__}{f' (window {window})' if window else ''}, B={B}, prompt {T}, "
                    f"{new_tokens} new{', no cache' if not cached else ''}{f', eos {eos}' if eos is not None else ''}"
                    f"{', sampled' if sampled else ''}")
            with torch.random.fork_rng(devices=[]):  # sampling draws from the global generator, as HF does
                torch.manual_seed(7)
                expected = _hf_generate(hf, prompts, new_tokens, **settings)
                cache = ours.make_cache(B, max_len=T + new_tokens) if cached else None
                calls, hook = _forward_calls(ours, cache)
                torch.manual_seed(7)
                try:
                    with torch.no_grad():
                        got = decode_loop(ours, prompts.clone(), new_tokens, choose, cache, eos)
                finally:
                    hook.remove()
            _expect_same_ids(got, expected, what)
            _expect_calls(calls, T, expected.size(1) - T, cached, what)
        return run

    cases = [case("gpt2", 2, 5, 8), case("llama", 2, 4, 10, eos_step=2), case("llama", 1, 3, 12, window=3),
             case("gpt2", 2, 6, 6, cached=False), case("llama", 1, 5, 8, eos_step=3),
             case("llama", 2, 6, 10, sampled=True)]
    check("7.2", cases,
          hint="with a cache, the first forward gets the whole prompt and every later one only the token just "
               "chosen; without a cache, every forward gets the whole text so far. Choose from the logits of "
               "the last position",
          more="model(x, cache=cache) returns (B, T_x, V); choose_next wants (B, V) and returns (B,) ids, "
               "which become a new column of the text (and, shaped (B, 1), the next input). With "
               "eos_token_id, keep a finished flag per row: a finished row gets eos_token_id again instead "
               "of its choice, and the loop stops once all rows are finished. No forward after the last token")


def end_to_end_generate(new_tokens: int = 24) -> bool:
    """Greedy ids of `minillm.generation.generate` (and so of whatever cache update and decode loop are plugged
    in) vs HF `generate(do_sample=False)` on the same weights: GPT-2, Llama (GQA) and Mistral with a window of 5,
    smaller than the 30 positions generated.

    Ids are equal when both sides pick the same argmax at every step. Our models run HF's ops in HF's order
    (chapter 06), and a plugged-in cache may hand attention its keys in another memory layout, which can move a
    logit by a few fp32 roundings (~1e-6 here); so the claim also requires every step's gap between HF's two
    best logits to exceed 1e-3, which makes the same argmax certain on every CPU, not just likely.
    """
    from minillm import cache as kv_cache
    from minillm import generation
    from minillm.generation import generate

    yours = [name for name, swapped in (("your cache update", kv_cache.update_layer.__module__ != kv_cache.__name__),
                                        ("your decode loop", generation.decode_loop.__module__ != generation.__name__))
             if swapped]
    plugged = " and ".join(yours) or "minillm's cache and loop"
    claim = (f"with {plugged}, greedy ids equal HF generate's (GPT-2, Llama GQA, Mistral window 5 < "
             f"{6 + new_tokens} positions; every top-2 logit gap > 1e-3)")
    prompts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    for name, hf in [("GPT-2", _hf_model("gpt2")), ("Llama", _hf_model("llama")),
                     ("Mistral", _hf_model("llama", sliding_window=5))]:
        out = _hf_generate(hf, prompts, new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        top2 = torch.stack(out.logits, dim=1).topk(2, dim=-1).values  # (B, new_tokens, 2)
        gap = (top2[..., 0] - top2[..., 1]).min().item()
        if gap <= 1e-3:
            return verdict(False, claim, f"{name}: HF's two best logits are only {gap:.1e} apart somewhere, too "
                                         "close to decide the argmax on every CPU")
        try:
            got = generate(_ours(hf), prompts, new_tokens)
        except NotImplementedError:
            raise  # an unwritten stub: use() prints "plug-in skipped"
        except Exception as crash:
            return verdict(False, claim, f"{name}: your code raised {type(crash).__name__}: {crash}")
        try:
            _expect_same_ids(got, out.sequences, name)
        except Mismatch as wrong:
            return verdict(False, claim, str(wrong))
    return verdict(True, claim)


# --- 7.3-7.5 choosing the next token (practice) ------------------------------------------------------------


def _logit_cases(seed: int) -> list[torch.Tensor]:
    """Awkward logits: one row, a batch, a 3-d batch, ties, negative and large values, an odd vocabulary."""
    g = torch.Generator().manual_seed(seed)
    tied = torch.randn(2, 11, generator=g)
    tied[0, :4] = tied[0].max()  # four equal maxima
    return [torch.randn(1, 10, generator=g), 4.0 * torch.randn(3, 37, generator=g) - 2.0, tied,
            torch.randn(2, 3, 13, generator=g)]


def _expect_same_filter(got, expected: torch.Tensor, what: str) -> None:
    """Same kept tokens per row as the reference, logits unchanged. Among tied logits any choice is right, so
    each row's kept logits are compared as sorted values (equal values stand for interchangeable tokens)."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a tensor of shape {tuple(expected.shape)}, got {shape}")
    rows, rows_expected = got.reshape(-1, got.size(-1)), expected.reshape(-1, expected.size(-1))
    for r, (row, row_expected) in enumerate(zip(rows, rows_expected)):
        kept, kept_expected = row[torch.isfinite(row)], row_expected[torch.isfinite(row_expected)]
        if len(kept) != len(kept_expected):
            raise Mismatch(f"{what}: row {r} keeps {len(kept)} tokens, HF keeps {len(kept_expected)}")
        problem = first_mismatch(kept.sort().values, kept_expected.sort().values, atol=0, rtol=0)
        if problem is not None:
            raise Mismatch(f"{what}: row {r}, the kept logits in increasing order (unchanged from the input): "
                           f"{problem}")


def _filter_cases(learner_filter, name: str, argument: str, make_warper):
    """`case(logits, value)` -> a check case comparing `learner_filter(logits, value)` with HF's warper for that
    value (HF's warpers take 2-d scores, so each case flattens the leading dimensions for it)."""
    def case(logits, value):
        def run():
            flat = logits.reshape(-1, logits.size(-1))
            expected = make_warper(value)(None, flat.clone()).view(logits.shape)
            what = f"{name}(logits {tuple(logits.shape)}, {argument}={value})"
            _expect_same_filter(learner_filter(logits.clone(), value), expected, what)
        return run
    return case


@exercise("7.3", "top-k filter", hides=("top_k_filter",))
def check_top_k_filter(top_k_filter) -> None:
    """Exercise 7.3: `top_k_filter(logits, k)` keeps the k largest logits of each row, -inf elsewhere."""
    from transformers.generation.logits_process import TopKLogitsWarper

    case = _filter_cases(top_k_filter, "top_k_filter", "k", lambda k: TopKLogitsWarper(top_k=k))
    a, b, tied, c = _logit_cases(71)
    cases = [case(a, 3), case(b, 5), case(tied, 2), case(c, 1), case(a, 10)]
    check("7.3", cases,
          hint="the k-th largest logit of a row is a threshold: what lies below it goes, what is tied with "
               "it stays (as in HF)",
          more="torch.topk returns the k largest values of each row in decreasing order, so the threshold is "
               "its last one (keep the dimension for broadcasting); masked_fill writes float('-inf') where "
               "a condition holds")


@exercise("7.4", "top-p filter", hides=("top_p_filter",))
def check_top_p_filter(top_p_filter) -> None:
    """Exercise 7.4: `top_p_filter(logits, p)` keeps the fewest most-likely tokens whose probabilities sum to
    at least p (always the top one), -inf elsewhere, deciding the boundary as HF's `TopPLogitsWarper` does."""
    from transformers.generation.logits_process import TopPLogitsWarper

    case = _filter_cases(top_p_filter, "top_p_filter", "p", lambda p: TopPLogitsWarper(top_p=p))
    a, b, tied, c = _logit_cases(72)
    boundary = torch.zeros(1, 2)  # probabilities 0.5, 0.5: with p = 0.5 the first token alone reaches p exactly
    cases = [case(a, 0.9), case(b, 0.5), case(b, 0.05), case(tied, 0.7), case(c, 0.8), case(boundary, 0.5),
             case(torch.zeros(2, 4), 0.5)]
    check("7.4", cases,
          hint="walk the tokens from least to most likely and remove each one while the probability mass "
               "removed so far, itself included, is at most 1 - p; the most likely token always stays",
          more="sort each row ascending, take the softmax of the sorted row and its running sum; 'at most' "
               "matters when a sum lands exactly on 1 - p (try probabilities 0.5, 0.5 with p = 0.5: HF "
               "keeps one token). Then carry the decision back to vocabulary order with the sort's indices")


@exercise("7.5", "sample with temperature", hides=("sample_next_token",))
def check_sample_next_token(sample_next_token) -> None:
    """Exercise 7.5: `sample_next_token(logits, temperature, generator)` -> ids (B,): argmax when temperature
    is 0, else one draw per row from softmax(logits / temperature) with torch.multinomial and `generator`."""

    def case(B, V, temperature, seed):
        def run():
            logits = 3.0 * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))
            if temperature == 0:
                expected = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            got = sample_next_token(logits.clone(), temperature, torch.Generator().manual_seed(seed))
            if not isinstance(got, torch.Tensor) or got.shape != (B,):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise Mismatch(f"expected token ids of shape ({B},), got {shape}")
            what = f"ids sampled at temperature {temperature} (seed {seed})"
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(3, 20, 0.0, 1), case(4, 50, 1.0, 2), case(2, 7, 0.5, 3), case(5, 31, 2.0, 4)]
    check("7.5", cases,
          hint="temperature 0 means no randomness at all (the most likely token); otherwise the temperature "
               "reshapes the logits before they become probabilities, and one token is drawn per row",
          more="a temperature below 1 must sharpen the distribution, above 1 flatten it: think about which "
               "operation on the logits does that. Draw with torch.multinomial, passing the generator so that "
               "the check's seed reproduces your draws, and return one id per row, shape (B,)")
