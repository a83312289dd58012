"""Checks for chapter 05's exercises: torch builds every expected mask (`tril`), repeats kv heads
(`repeat_interleave`) and computes attention (`F.scaled_dot_product_attention`) inside the check.

The build exercise, 5.4, is the attention every minillm model calls (`minillm.attention.scaled_dot_product_attention`);
`end_to_end_attention` runs GPT-2 and Llama with it beside Hugging Face Transformers' eager models."""

import math

import torch
import torch.nn.functional as TF

from minillm import attention as package
from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict

# The package's own attention, kept before any use() swaps the module attribute: the bound's Jacobians need it.
_MINILLM_ATTENTION = package.scaled_dot_product_attention


def _expect_bool_mask(got, expected: torch.Tensor, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        kind = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a torch.bool tensor (True = may attend), got {kind}")
    expect_equal(got, expected, what=f"{what}, entry [query, key] (1 = may attend)")


@exercise("5.1", "causal mask", hides=("_positions", "causal_mask"))
def check_causal_mask(causal_mask) -> None:
    """Exercise 5.1: `causal_mask(T_q, T_k, offset)`, query i at absolute position offset + i, key j at j."""

    def case(T_q, T_k, offset):
        def run():
            expected = torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=offset)
            _expect_bool_mask(causal_mask(T_q, T_k, offset), expected, f"causal_mask({T_q}, {T_k}, offset={offset})")
        return run

    cases = [case(4, 4, 0), case(3, 7, 4), case(1, 6, 5), case(2, 6, 1)]
    check("5.1", cases,
          hint="think in absolute positions: query i sits at offset + i, key j at j, and a query may see every "
               "key that is not after it",
          more="make the query positions a column (T_q, 1) and the key positions a row (1, T_k); one comparison "
               "then broadcasts to the whole (T_q, T_k) mask, no loop. The offset only shifts the queries")


@exercise("5.2", "sliding-window mask", hides=("sliding_window_mask",))
def check_sliding_window_mask(sliding_window_mask) -> None:
    """Exercise 5.2: `sliding_window_mask(T_q, T_k, window, offset)`: the query at p sees keys p-window+1..p."""

    def case(T_q, T_k, window, offset):
        def run():
            ones = torch.ones(T_q, T_k, dtype=torch.bool)
            expected = ones.tril(diagonal=offset) & ~ones.tril(diagonal=offset - window)
            got = sliding_window_mask(T_q, T_k, window, offset)
            _expect_bool_mask(got, expected, f"sliding_window_mask({T_q}, {T_k}, window={window}, offset={offset})")
        return run

    cases = [case(8, 8, 3, 0), case(3, 10, 4, 7), case(6, 6, 1, 0), case(5, 5, 9, 0), case(1, 9, 4, 8)]
    check("5.2", cases,
          hint="the causal rule plus a second one: the key may not be too far behind the query. A window of W "
               "holds exactly W keys, the query's own position among them (window=1 sees only itself)",
          more="write both conditions on the (query position, key position) grid of exercise 5.1 and require "
               "both; then count the True entries of one long row: there must be exactly `window`")


@exercise("5.3", "repeat_kv", hides=("repeat_kv",))
def check_repeat_kv(repeat_kv) -> None:
    """Exercise 5.3: `repeat_kv(x, n_rep)`: (B, nkv, T, hd) -> (B, nkv * n_rep, T, hd), kv head j serving
    query heads j*n_rep .. j*n_rep + n_rep - 1; then attention with it must equal torch's GQA."""
    g = torch.Generator().manual_seed(53)

    def case(B, nkv, T, hd, n_rep):
        q = torch.randn(B, nkv * n_rep, T, hd, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, nkv, T, hd, generator=g, dtype=torch.float64) for _ in range(2))

        def run():
            what = f"repeat_kv(x of shape {(B, nkv, T, hd)}, n_rep={n_rep})"
            expect_equal(repeat_kv(k, n_rep), torch.repeat_interleave(k, n_rep, dim=1), what=what, atol=0, rtol=0)
            expected = TF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            got = TF.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
            expect_equal(got, expected, what="attention with your repeated heads vs torch's enable_gqa", atol=1e-12)
        return run

    cases = [case(1, 2, 3, 4, 2), case(2, 3, 5, 2, 3), case(1, 4, 2, 3, 1), case(2, 1, 4, 5, 4)]
    check("5.3", cases,
          hint="each kv head's copies must sit next to each other: kv head j serves query heads j*n_rep to "
               "j*n_rep + n_rep - 1, not j, j + nkv, j + 2*nkv, ... (that is tiling)",
          more="copying the whole stack of kv heads n_rep times is tiling, the wrong order. Give each kv head a new "
               "axis of its own right after the head axis, stretch that axis to n_rep (a view needs no copy), then "
               "merge the two axes into one of size nkv * n_rep")


# --- 5.4 (build): the attention every minillm model calls -----------------------------------------------------


def _qkv(g: torch.Generator, B: int, nh: int, nkv: int, T_q: int, T_k: int, hd: int, spread: float = 1.0):
    q = torch.randn(B, nh, T_q, hd, generator=g) * spread
    k, v = (torch.randn(B, nkv, T_k, hd, generator=g) * spread for _ in range(2))
    return q, k, v


def _left_padding(B: int, T_q: int, T_k: int) -> torch.Tensor:
    """Causal & left padding (B, 1, T_q, T_k); the last sequence is all padding, so some queries see no key."""
    lengths = torch.tensor([T_k, T_k - 2, 0])[:B]
    real = torch.arange(T_k)[None, :] >= (T_k - lengths)[:, None]  # (B, T_k)
    return torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=T_k - T_q) & real[:, None, None, :]


@exercise("5.4", "multi-head attention with GQA and masks", kind="build", component="attention",
          replaces="minillm.attention:scaled_dot_product_attention",
          hides=("scaled_dot_product_attention", "attention_weights"))
def check_attention(attention) -> None:
    """Exercise 5.4: `attention(q, k, v, mask=None)` -> (B, nh, T_q, hd) in q's dtype, for q (B, nh, T_q, hd) and
    k, v (B, nkv, T_k, hd) with nkv dividing nh, a bool mask (True = may attend) broadcastable to
    (B, nh, T_q, T_k) or None, zeros for a query that may attend to no key. Judged by
    `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`.

    Tolerances: with scores of size ~1 float32 rounding is ~1e-7, far below atol 1e-5; the overflow case (scores
    in the hundreds) is judged at 1e-3 of the values' size, since what it catches is NaN or inf, not rounding.
    """
    g = torch.Generator().manual_seed(54)

    def case(B, nh, nkv, T_q, T_k, hd, make_mask, why, spread=1.0):
        q, k, v = _qkv(g, B, nh, nkv, T_q, T_k, hd, spread)
        mask = make_mask(B, T_q, T_k)

        def run():
            expected = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            got = expect_tensor(attention(q.clone(), k.clone(), v.clone(), mask), expected, what=why)
            tolerance = 1e-3 * spread if spread > 1 else 1e-5
            expect_equal(got, expected, what=f"{why}, output [batch, head, query, dim]", atol=tolerance, rtol=1e-4)
        return run

    def causal(B, T_q, T_k):
        return torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=T_k - T_q)

    def window_of_3_and_padding(B, T_q, T_k):
        return _left_padding(B, T_q, T_k) & ~torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=T_k - T_q - 3)

    cases = [case(2, 3, 3, 5, 5, 4, causal, "multi-head (3 heads), causal"),
             case(1, 6, 2, 3, 7, 5, causal, "6 query heads sharing 2 kv heads, 3 queries after 4 cached keys"),
             case(2, 4, 1, 4, 4, 3, lambda *_: None, "4 query heads sharing 1 kv head, mask=None"),
             case(1, 2, 2, 4, 4, 8, causal, "scores in the hundreds: exp overflows unless stable", spread=12.0),
             case(3, 4, 2, 4, 6, 6, _left_padding, "left padding, GQA: some queries see no key at all"),
             case(2, 2, 1, 6, 6, 4, window_of_3_and_padding, "sliding window of 3 & padding")]
    check("5.4", cases,
          hint="score every (query, key) pair with q·k / sqrt(hd); a blocked key must get exactly zero weight; "
               "softmax over the keys must not overflow; a query with no allowed key outputs zeros; kv head j "
               "serves a block of consecutive query heads (exercise 5.3)",
          more="widen k and v to nh heads first (your repeat_kv), then everything is per-head matrix products: "
               "scores (B, nh, T_q, T_k), weights of the same shape, output weights times values. Blocked scores "
               "become -inf (exp(-inf) = 0). A row whose scores are all -inf must not produce NaN: find those rows "
               "from the mask and zero their weights. mask=None means every key is allowed")


# --- the plugged-in end-to-end check: GPT-2 and Llama logits beside transformers' ------------------------------

U32 = 2.0 ** -24  # float32's unit roundoff


def _gamma(n: torch.Tensor | int) -> torch.Tensor:
    """Higham's γ_n = n·u / (1 - n·u) for float32: the relative error bound of a length-n sum of products."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return n * U32 / (1 - n * U32)


def attention_rounding_bound(output, q, k, v, mask=None, scale: float | None = None, **keywords) -> torch.Tensor:
    """Elementwise bound (B, nh, T_q, hd) on |attention computed in float32 - exact attention|, for ANY order of
    the float32 operations (computed in float64 from the float64 inputs).

    Scores: |ŝ_j - s_j| <= σ_j = γ_{hd+2} · scale · Σ_i |q_i k_ji| (the dot product, then the scale). Softmax of
    perturbed scores: each weight moves by at most a factor e^{±2σ}, σ = max_j σ_j over the allowed keys; the
    softmax's own rounding (shift, exp, sum of T_k terms, divide) adds γ_{T_k+3} relative, plus u times the row's
    score range for the shift. Output: Σ_j w_j v_j in float32 adds γ_{T_k} · Σ_j w_j |v_j| (Higham §3.1).
    Together: (e^{2σ} - 1 + γ_{T_k+3} + u·range + γ_{T_k}) · Σ_j w_j |v_j|, doubled for safety.
    """
    hd, T_k, n_rep = q.size(-1), k.size(-2), q.size(1) // k.size(1)
    k, v = package.repeat_kv(k, n_rep), package.repeat_kv(v, n_rep)  # (B, nh, T_k, hd)
    scale = hd ** -0.5 if scale is None else scale
    allowed = torch.ones(q.shape[:-1] + (T_k,), dtype=torch.bool) if mask is None else mask.expand(
        q.shape[:-1] + (T_k,))  # (B, nh, T_q, T_k)
    scores = (q @ k.mT) * scale
    sigma = (_gamma(hd + 2) * scale * (q.abs() @ k.abs().mT)).masked_fill(~allowed, 0).amax(-1, keepdim=True)
    spread = (scores.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)
              - scores.masked_fill(~allowed, math.inf).amin(-1, keepdim=True)).nan_to_num(0.0, 0.0, 0.0)
    weights = package.attention_weights(q, k, mask, scale)  # exact enough: float64
    relative = torch.expm1(2 * sigma) + _gamma(T_k + 3) + U32 * spread + _gamma(T_k)  # (B, nh, T_q, 1)
    return 2 * relative * (weights @ v.abs())  # (B, nh, T_q, hd)


def tiny_hf_models():
    """A tiny HF GPT-2 and an HF Llama with grouped-query attention (4 query heads, 2 kv heads), eager attention,
    weights redrawn with std 0.2 so that a wrong answer shows far above rounding; and token ids with padding."""
    import transformers

    transformers.logging.set_verbosity_error()
    gpt2 = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                   eos_token_id=0, attn_implementation="eager")
    llama = transformers.LlamaConfig(vocab_size=64, max_position_embeddings=16, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    models = {}
    with torch.random.fork_rng(devices=[]):  # leave the learner's random state alone
        torch.manual_seed(55)
        for name, model in (("GPT-2", transformers.GPT2LMHeadModel(gpt2)), ("Llama", transformers.LlamaForCausalLM(llama))):
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, 0.2)
            models[name] = model.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding: pad queries see no key (yours and ours: zeros; HF: an average)
    return models, ids, attention_mask


def exact_logits_and_sensitivity(hf_model, ids, attention_mask, real, local_bounds: dict):
    """minillm's float64 twin of `hf_model` (the exact logits, to float32's eyes), and for any cotangent c of the
    logits the local rounding bounds carried to c·logits: Σ_calls |∂(c·logits)/∂output| · bound, to first order.

    `local_bounds` maps a component name (as `use()` knows it) to (minillm's own function, bound(output, *args)):
    every call of that component gets a zero perturbation on its output, to differentiate against, and the
    elementwise bound of how far a correct float32 implementation may round from its exact output. Returns
    (exact logits of the real tokens (N, V), a function cotangent -> bound). One backward pass per cotangent.
    """
    from minillm.exercises import use
    from minillm.models import GPT, Llama

    twin = (GPT if hf_model.config.model_type == "gpt2" else Llama).from_hf(hf_model).double().eval()
    perturbations = []  # (zero perturbation, its bound) per call, in call order

    def perturbing(original, bound):
        def perturbed(*args, **keywords):
            out = original(*args, **keywords)
            with torch.no_grad():
                perturbations.append((torch.zeros_like(out, requires_grad=True), bound(out, *args, **keywords)))
            return out + perturbations[-1][0]
        return perturbed

    with use(**{name: perturbing(*pair) for name, pair in local_bounds.items()}):
        exact = twin(ids, attention_mask=attention_mask)[real]  # (N, V)

    def carried(cotangent: torch.Tensor) -> torch.Tensor:
        if not perturbations:  # this model never calls the component
            return torch.zeros((), dtype=torch.float64)
        grads = torch.autograd.grad(exact, [p for p, _ in perturbations], cotangent, retain_graph=True)
        return sum((g.abs() * b).sum() for g, (_, b) in zip(grads, perturbations))
    return exact.detach(), carried


def logits_verdict(claim: str, local_bounds: dict) -> bool:
    """The plug-in verdict chapters 05 and 06 share: minillm's GPT-2 and Llama (GQA), run with whatever is plugged
    in, against transformers' eager models with the same weights, on the real tokens of a left-padded batch.

    A learner's ops need not be HF's in HF's order, so the claim is a bound on Σ|Δ| over all real logits, not
    bit-for-bit. To first order, Δ = J (δ_yours - δ_HF) + (rounding elsewhere), where each side's error |δ| in a
    plugged-in component is within its local bound; so Σ|Δ| = sign(Δ)·Δ <= |Jᵀ sign(Δ)| · 2 bound, plus twice
    transformers' own float32 error Σ|L_HF - L_exact| for everything else (the one measured term). J comes from
    one backward pass of the float64 twin. Bit-for-bit equality is reported on its own where it happens: then
    your ops are HF's, in HF's order.
    """
    from minillm.models import GPT, Llama

    models, ids, attention_mask = tiny_hf_models()
    real = attention_mask.bool()
    bitwise = True
    for name, hf in models.items():
        ours = (GPT if name == "GPT-2" else Llama).from_hf(hf).eval()
        try:
            with torch.no_grad():
                got = ours(ids, attention_mask=attention_mask)[real]
        except NotImplementedError:
            raise  # an unwritten stub: use() prints "plug-in skipped"
        except Exception as crash:  # noqa: BLE001 - the learner's code broke the model: report it
            return verdict(False, claim, f"{name}: your code raised {type(crash).__name__}: {crash}")
        with torch.no_grad():
            expected = hf(ids, attention_mask=attention_mask).logits[real]  # (N, V)
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return verdict(False, claim, f"{name}: logits {got.dtype} {tuple(got.shape)}, transformers' "
                           f"{expected.dtype} {tuple(expected.shape)}")
        exact, carried = exact_logits_and_sensitivity(hf, ids, attention_mask, real, local_bounds)
        difference = got.double() - expected.double()  # (N, V)
        bound = 2 * carried(difference.sign()) + 2 * (expected.double() - exact).abs().sum()
        total = difference.abs().sum()
        if not total <= bound:  # also catches NaN
            token, vocab = divmod(int(difference.abs().nan_to_num(math.inf).argmax()), got.size(1))
            return verdict(False, claim, f"{name}: Σ|Δ| over the real tokens' logits is {total:.3g}, more than the "
                           f"rounding bound {bound:.3g}; the largest |Δ|, {difference[token, vocab].abs():.3g}, is "
                           f"at real token {token}, logit {vocab}")
        bitwise &= torch.equal(got, expected)
    return verdict(True, claim + (", and bit for bit (your ops are HF's, in HF's order)" if bitwise else ""))


def end_to_end_attention() -> bool:
    """Plug-in verdict for 5.4: `logits_verdict` with the attention's rounding bound (`attention_rounding_bound`)."""
    claim = "GPT-2 and Llama (GQA) logits with your attention equal transformers' eager logits within the rounding bound"
    return logits_verdict(claim, {"attention": (_MINILLM_ATTENTION, attention_rounding_bound)})
