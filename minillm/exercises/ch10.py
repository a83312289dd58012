"""Checks for chapter 10's exercises. PEFT judges the prefix layout, the parameter counts and generation (its
`get_prompt`, `get_nb_trainable_parameters` and a cached loop over HF's model, run inside the check), torch's
`scaled_dot_product_attention` the attention over a prefix."""

import logging

import torch
import torch.nn.functional as F

from minillm.exercises import Mismatch, check, exercise, expect_equal


def _peft():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-feature probe logs on import
    import peft  # imported here: importing peft takes a second or two
    return peft


def _hf_model(arch: str, seed: int, **sizes):
    """A tiny HF GPT-2 or Llama (eager attention, eval mode) with weights drawn N(0, 0.2), so logits spread."""
    import transformers
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0,
                                                                     attn_implementation="eager", **sizes))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(bos_token_id=0, eos_token_id=0,
                                                                       attn_implementation="eager", **sizes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _llama_sizes(num_layers, num_heads, num_kv_heads, head_dim, vocab_size=29, max_len=32):
    return dict(vocab_size=vocab_size, hidden_size=num_heads * head_dim, intermediate_size=12,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=head_dim, max_position_embeddings=max_len)


@exercise("10.1", "cut the prefix table into layers")
def check_prefix_layers(prefix_layers) -> None:
    """Exercise 10.1: `prefix_layers(table, num_layers, num_kv_heads, head_dim)` cuts a (B, P, 2·L·nkv·hd) table
    into L pairs (keys, values), each (B, nkv, P, hd), in PEFT's layout."""
    def case(num_layers, num_heads, num_kv_heads, head_dim, P, B, seed):
        def run():
            peft = _peft()
            hf = _hf_model("llama", seed, **_llama_sizes(num_layers, num_heads, num_kv_heads, head_dim))
            reference = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
            weight = reference.prompt_encoder.default.embedding.weight  # (P, 2·L·nkv·hd)
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
                expected = reference.get_prompt(B)  # HF DynamicCache: layers[i].keys / .values
                got = prefix_layers(weight.expand(B, P, -1).clone(), num_layers, num_kv_heads, head_dim)
            what = f"prefix_layers(L={num_layers}, nkv={num_kv_heads}, hd={head_dim}, P={P}, B={B})"
            if not isinstance(got, (list, tuple)) or len(got) != num_layers:
                raise Mismatch(f"{what}: expected a list of {num_layers} (keys, values) pairs, got {type(got).__name__}"
                               + (f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""))
            for i, pair in enumerate(got):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise Mismatch(f"{what}: element {i} should be a pair (keys, values)")
                expect_equal(pair[0], expected.layers[i].keys, what=f"{what}, layer {i} keys", atol=0, rtol=0)
                expect_equal(pair[1], expected.layers[i].values, what=f"{what}, layer {i} values", atol=0, rtol=0)
        return run

    cases = [case(1, 2, 2, 3, 2, 1, 1), case(2, 4, 2, 4, 5, 2, 2), case(3, 6, 3, 2, 3, 3, 3)]
    check("Exercise 10.1 (cut the prefix table into layers)", cases,
          hint="table.view(B, P, 2 * L, nkv, hd).permute(2, 0, 3, 1, 4) gives (2L, B, nkv, P, hd): layer i's keys are "
               "at index 2i and its values at 2i + 1")


@exercise("10.2", "attention over a prefix")
def check_attention_with_prefix(attention_with_prefix) -> None:
    """Exercise 10.2: `attention_with_prefix(q, k, v, prefix_k, prefix_v)`: causal attention of T real queries
    (B, nh, T, hd) over P prefix keys, which every query sees, and the T real keys; returns (B, nh, T, hd)."""
    def case(B, nh, P, T, hd, seed):
        def run():
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(B, nh, T, hd, generator=g) for _ in range(3))
            prefix_k, prefix_v = (2 * torch.randn(B, nh, P, hd, generator=g) for _ in range(2))
            visible = torch.cat((torch.ones(T, P, dtype=torch.bool),
                                 torch.ones(T, T, dtype=torch.bool).tril()), dim=1)  # (T, P + T)
            expected = F.scaled_dot_product_attention(q, torch.cat((prefix_k, k), dim=2),
                                                      torch.cat((prefix_v, v), dim=2), attn_mask=visible)
            got = attention_with_prefix(q.clone(), k.clone(), v.clone(), prefix_k.clone(), prefix_v.clone())
            expect_equal(got, expected, what=f"attention_with_prefix(B={B}, nh={nh}, P={P}, T={T}, hd={hd})",
                         atol=1e-5, rtol=1e-4)
        return run

    cases = [case(1, 1, 1, 1, 4, 1), case(2, 3, 4, 6, 5, 2), case(1, 2, 7, 3, 8, 3), case(3, 1, 2, 9, 2, 4)]
    check("Exercise 10.2 (attention over a prefix)", cases,
          hint="put the prefix keys in front of the real ones: the mask is (T, P + T), all True over the first P "
               "columns, then the usual lower triangle; softmax(q kᵀ / sqrt(hd) + mask) v")


@exercise("10.3", "count prefix-tuning parameters")
def check_prefix_num_params(prefix_num_params) -> None:
    """Exercise 10.3: `prefix_num_params(num_layers, num_heads, num_kv_heads, head_dim, num_virtual_tokens,
    encoder_hidden_size=None)` is the number of trainable parameters of prefix tuning (None: no projection MLP)."""
    def case(num_layers, num_heads, num_kv_heads, head_dim, P, encoder_hidden_size):
        def run():
            peft = _peft()
            hf = _hf_model("llama", 0, **_llama_sizes(num_layers, num_heads, num_kv_heads, head_dim))
            config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                             prefix_projection=encoder_hidden_size is not None,
                                             encoder_hidden_size=encoder_hidden_size)
            expected, _ = peft.get_peft_model(hf, config).get_nb_trainable_parameters()
            got = prefix_num_params(num_layers, num_heads, num_kv_heads, head_dim, P, encoder_hidden_size)
            what = (f"prefix_num_params(L={num_layers}, nh={num_heads}, nkv={num_kv_heads}, hd={head_dim}, P={P}, "
                    f"encoder_hidden_size={encoder_hidden_size})")
            if isinstance(got, bool) or not isinstance(got, int):
                raise Mismatch(f"{what}: expected an int, got {type(got).__name__}")
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(2, 4, 4, 4, 5, None), case(3, 4, 2, 8, 10, None), case(2, 6, 2, 4, 3, 16), case(1, 2, 1, 6, 7, 5)]
    check("Exercise 10.3 (count prefix-tuning parameters)", cases,
          hint="a layer's keys are num_kv_heads * head_dim wide (not the hidden size); without projection P rows of "
               "2·L·that; with it an embedding (P, kv), Linear(kv, E) and Linear(E, 2·L·kv), biases included")


@exercise("10.4", "cached greedy decoding with virtual tokens")
def check_greedy_generate(greedy_generate) -> None:
    """Exercise 10.4: `greedy_generate(model, input_ids, max_new_tokens)` runs the prompt once into a cache
    from `model.make_cache`, then feeds one token per step; for a PrefixTuning or PromptTuning model."""
    from minillm.models import GPT, Llama
    from minillm.peft.prefix import PrefixTuning
    from minillm.peft.prompt import PromptTuning

    def case(kind, arch, P, B, T, n, seed):
        def run():
            peft = _peft()
            if arch == "gpt2":
                hf = _hf_model("gpt2", seed, vocab_size=31, n_positions=32, n_embd=12, n_layer=2, n_head=3)
            else:
                hf = _hf_model("llama", seed, **_llama_sizes(2, 4, 2, 4, vocab_size=31))
            ours = (GPT if arch == "gpt2" else Llama).from_hf(hf)
            if kind == "prefix":
                config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
                model = PrefixTuning(ours, P)
            else:
                config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
                model = PromptTuning(ours, P)
            torch.manual_seed(seed)  # PEFT draws its virtual tokens from the global generator
            reference = peft.get_peft_model(hf, config)
            ids = torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                model.embedding.weight.copy_(reference.prompt_encoder.default.embedding.weight)
                base = reference.base_model
                if kind == "prefix":  # the prefix is HF's initial cache
                    cache = reference.get_prompt(B)
                    logits = base(ids, cache=cache).logits
                else:  # the soft prompt goes in front of the token embeddings, once
                    embeds = torch.cat((reference.get_prompt(B), base.get_input_embeddings()(ids)), dim=1)
                    out = base(inputs_embeds=embeds, use_cache=True)
                    cache, logits = out.cache, out.logits
                expected = ids
                for _ in range(n):
                    next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                    expected = torch.cat((expected, next_id), dim=1)
                    logits = base(next_id, cache=cache).logits
                calls = _record_calls(model)
                got = greedy_generate(model, ids.clone(), n)
            what = f"greedy_generate({kind} tuning on {arch}, B={B}, T={T}, n={n})"
            expect_equal(got, expected, what=what, atol=0, rtol=0)
            _expect_cached_loop(calls, T, n, what)
        return run

    cases = [case("prefix", "gpt2", 4, 1, 3, 6, 1), case("prefix", "llama", 3, 2, 5, 8, 2),
             case("prompt", "gpt2", 5, 2, 4, 7, 3), case("prompt", "llama", 2, 1, 1, 5, 4)]
    check("Exercise 10.4 (cached greedy decoding with virtual tokens)", cases,
          hint="one cache for the whole text: the prompt goes in once, then each step feeds only the token it just "
               "chose; the virtual tokens are already in that cache after the first call.",
          more="ask the model for a cache long enough for the prompt and every new token, pass that same cache to "
               "every call, and pick each new token as the argmax of the last position's logits.")


def _record_calls(model) -> list[tuple[int, object]]:
    """Record (tokens fed, cache passed) for every call of `model`, so a check can see how a loop used it."""
    calls = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        cache = kwargs.get("cache", args[2] if len(args) > 2 else None)
        calls.append((ids.shape[-1] if isinstance(ids, torch.Tensor) else None, cache))
    model.register_forward_pre_hook(record, with_kwargs=True)
    return calls


def _expect_cached_loop(calls: list[tuple[int, object]], T: int, n: int, what: str) -> None:
    """Raise `Mismatch` unless the prompt went in once and every later call fed one token into the same cache."""
    fed = [tokens for tokens, _ in calls]
    if not calls or calls[0][1] is None:
        raise Mismatch(f"{what}: right ids, but the first call got no cache; make one with model.make_cache and "
                       "pass it to every call")
    later = calls[1:]
    if fed[0] != T or any(tokens != 1 for tokens in fed[1:]) or any(cache is not calls[0][1] for _, cache in later) \
            or not n <= len(calls) <= n + 1:
        raise Mismatch(f"{what}: right ids, but not one cached pass: expected the {T} prompt tokens once, then one "
                       f"token per call into the same cache ({n} or {n + 1} calls); the calls fed {fed} tokens"
                       + ("" if all(cache is calls[0][1] for _, cache in later) else ", not all into the first cache"))
