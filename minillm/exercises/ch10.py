"""Checks for chapter 10's exercises. PEFT judges the prefix layout, the two build exercises, the parameter counts
and generation (its `get_prompt`, its forward, `get_nb_trainable_parameters` and a cached loop over HF's model,
run inside the check), torch's `scaled_dot_product_attention` the attention over a prefix.

The build exercises (10.2 `PrefixTuning.forward`, 10.3 `PromptTuning.prepend_soft_prompt`) are compared bit for
bit, on every CPU: the learner's code does no arithmetic of its own. It copies the prefix into the KV cache (or
casts and concatenates the soft prompt), then minillm's model runs, whose ops are its HF twin's in the same order
(chapter 06); PEFT feeds the same tensors to that twin. The gradients are summed over a batch of at most two
rows, where the order of a sum cannot matter (a + b = b + a exactly).
"""

import logging

import torch
import torch.nn.functional as F

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict


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
    check("10.1", cases,
          hint="read the layout [layer][key, value][head][hd] as separate axes of the last dimension, then move "
               "the axes so that each layer's keys and values come out with the heads before the positions.",
          more="the last dimension splits into four axes (2·L, heads, hd are three of the sizes you need); after "
               "reordering, layer i's keys and values are two neighbouring entries of the first axis. If only "
               "the values are wrong, count which entries belong to which layer.")


def _padded_batch(vocab_size: int, B: int, T: int, seed: int):
    """(ids (B, T), attention_mask (B, T)): random tokens; row 0 left-padded by 2, row 1 right-padded by 1."""
    ids = torch.randint(1, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0
    if B > 1:
        mask[1, -1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _expect_same_gradients(model, reference, what: str) -> None:
    theirs = dict(reference.prompt_encoder.default.named_parameters())
    for name, p in _trainable(model).items():
        if p.grad is None:
            raise Mismatch(f"{what}: no gradient reached {name}; is the prefix cut off from the graph?")
        expect_equal(p.grad, theirs[name].grad, what=f"{what}, gradient of {name}", atol=0, rtol=0)


@exercise("10.2", "prefix injection through the KV cache", kind="build", component="prefix_forward",
          replaces="minillm.peft.prefix:PrefixTuning.forward", hides=("PrefixTuning.forward",))
def check_prefix_forward(forward) -> None:
    """Exercise 10.2 (build): `forward(self, input_ids, attention_mask=None, cache=None)` of a `PrefixTuning`,
    judged bit for bit by PEFT's prefix-tuned HF twin: logits and prefix gradients (GPT-2, Llama with GQA), a
    padded batch with its attention mask, and a prefill plus decoding steps into one cache from `make_cache`."""
    def case(arch, P, B, T, seed, padded=False, steps=0):
        def run():
            model, reference = _virtual_twins("prefix", arch, P, seed)
            what = f"forward(prefix tuning on {arch}, P={P}, B={B}, T={T}" + (", padded" if padded else "")
            if steps:
                ids = torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed))
                expected_ids, expected = _manual_hf_greedy(reference, "prefix", ids, steps)
                cache = model.make_cache(B, T + steps)
                with torch.no_grad():
                    for step, want in enumerate(expected):
                        fed = ids if step == 0 else expected_ids[:, T + step - 1:T + step]  # the prompt, then 1 token
                        where = (f"{what}, with a cache: the prefill" if step == 0
                                 else f"{what}, with a cache: decoding step {step}")
                        got = forward(model, fed.clone(), cache=cache)
                        expect_equal(expect_tensor(got, want, where), want, what=f"{where}, logits", atol=0, rtol=0)
                return
            ids, mask = _padded_batch(31, B, T, seed) if padded else (
                torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed)), None)
            expected = reference(ids, attention_mask=mask).logits  # (B, T, V)
            logits = forward(model, ids.clone(), attention_mask=None if mask is None else mask.clone())
            got = expect_tensor(logits, expected, f"{what})")
            real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
            expect_equal(got[real], expected[real].detach(), what=f"{what}), logits of the real tokens", atol=0, rtol=0)
            if not padded:
                expected.logsumexp(-1).mean().backward()
                logits.logsumexp(-1).mean().backward()
                _expect_same_gradients(model, reference, f"{what})")
        return run

    cases = [case("gpt2", 3, 1, 4, 1), case("llama", 4, 2, 5, 2), case("llama", 3, 2, 6, 3, padded=True),
             case("gpt2", 2, 2, 4, 4, padded=True), case("gpt2", 4, 1, 3, 5, steps=3),
             case("llama", 2, 2, 4, 6, steps=2)]
    check("10.2", cases,
          hint="the prefix is what a KV cache would hold after P tokens: put every layer's prefix keys and values "
               "into the cache before the real tokens run, and only when that cache is new.",
          more="with no cache, make one with room for the prefix and the text; write the prefix only while the "
               "cache is empty (decoding steps find it there already); the attention mask covers the real tokens, "
               "so the model needs it extended by P visible positions in front. If only the padded cases fail, "
               "look at the mask; if only the decoding steps fail, at when the prefix is written.")


@exercise("10.3", "the soft prompt in front of the text", kind="build", component="soft_prompt",
          replaces="minillm.peft.prompt:PromptTuning.prepend_soft_prompt",
          hides=("PromptTuning.prepend_soft_prompt", "PromptTuning._soft_prompt_in_embeddings"))
def check_prepend_soft_prompt(prepend_soft_prompt) -> None:
    """Exercise 10.3 (build): `prepend_soft_prompt(self, token_embeddings)` of a `PromptTuning`: (B, T, C) token
    embeddings -> (B, P + T, C), bit for bit the `inputs_embeds` PEFT hands its HF model (caught there by a hook),
    in float32 and in bfloat16, with the soft prompt's gradient equal to PEFT's."""
    def case(arch, P, B, T, seed, dtype=torch.float32):
        def run():
            model, reference = _virtual_twins("prompt", arch, P, seed)
            model.model.to(dtype), reference.base_model.to(dtype)  # the soft prompts stay float32 on both sides
            seen = {}
            reference.base_model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs),
                                                           with_kwargs=True)
            ids = torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed))
            reference(ids)
            expected = seen["inputs_embeds"]  # (B, P + T, C)
            with torch.no_grad():
                token_embeddings = reference.base_model.get_input_embeddings()(ids)  # (B, T, C), model dtype
            what = f"prepend_soft_prompt(P={P}, B={B}, T={T}, {str(dtype).replace('torch.', '')})"
            got = expect_tensor(prepend_soft_prompt(model, token_embeddings.clone()), expected, what)
            expect_equal(got.float(), expected.detach().float(), what=what, atol=0, rtol=0)
            weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
            (expected * weights).sum().backward()
            (prepend_soft_prompt(model, token_embeddings) * weights).sum().backward()
            _expect_same_gradients(model, reference, what)
        return run

    cases = [case("gpt2", 3, 1, 4, 1), case("llama", 2, 2, 5, 2), case("gpt2", 4, 2, 1, 3),
             case("llama", 3, 2, 3, 4, dtype=torch.bfloat16)]
    check("10.3", cases,
          hint="the soft prompt is P vectors that come before the text's own embeddings, the same P for every "
               "row of the batch, in the dtype the model computes in.",
          more="self.embedding.weight is (P, C) and float32; the result has P + T rows per batch row; give every "
               "row of the batch the same prompt without copying it by hand, and cast the prompt, not the text. "
               "If only the bfloat16 gradient differs, think about which dtype the backward sums the batch's "
               "gradients in: that depends on whether you cast before or after sharing the prompt.")


def _end_to_end(kind: str, claim: str) -> bool:
    """Chapter 10's comparisons with whatever is plugged in: our `kind` ("prefix" or "prompt") tuning against
    PEFT's twin on the shipped GPT and on a Llama with grouped-query attention, for a padded batch of two
    (logits of the real tokens and every trainable gradient), then cached greedy decoding of 8 tokens by
    `minillm.generation.generate` against the manual cached loop over HF's model. Returns the verdict."""
    from minillm import finetune
    from minillm.generation import generate
    from minillm.pretrained import load_pretrained

    _, tokenizer = load_pretrained()
    prompt = torch.tensor([tokenizer.encode(finetune.task_pairs("val")[0].prompt)])  # (1, T)
    setups = [("shipped", 10, False), ("llama", 4, False)] + ([("shipped", 10, True)] if kind == "prefix" else [])
    for arch, P, projection in setups:
        model, reference = _virtual_twins(kind, arch, P, prefix_projection=projection)
        name = ("the shipped GPT" if arch == "shipped" else "a Llama with GQA") + (", prefix_projection" if projection else "")
        vocab = model.model.config.vocab_size
        ids, mask = _padded_batch(vocab, 2, 9, seed=P)
        real = mask.bool()
        expected = reference(ids, attention_mask=mask).logits[:, P if kind == "prompt" else 0:]  # (2, 9, V)
        try:
            got = model(ids, attention_mask=mask)
            generated = generate(model, prompt if arch == "shipped" else ids[1:, :6], 8)
        except NotImplementedError:
            raise  # an unwritten stub: use() prints "plug-in skipped"
        except Exception as crash:  # noqa: BLE001 - the learner's code broke the model: report it
            return verdict(False, claim, f"{name}: your code raised {type(crash).__name__}: {crash}")
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return verdict(False, claim, f"{name}: logits {getattr(got, 'shape', type(got).__name__)}, PEFT's "
                                         f"{tuple(expected.shape)}")
        if not torch.equal(got[real], expected[real]):
            return verdict(False, claim, f"{name}: logits of the real tokens differ from PEFT's by up to "
                                         f"{(got - expected)[real].abs().max().item():.3g}")
        expected[real].logsumexp(-1).mean().backward()
        got[real].logsumexp(-1).mean().backward()
        theirs = dict(reference.prompt_encoder.default.named_parameters())
        for param_name, p in _trainable(model).items():
            if p.grad is None or not torch.equal(p.grad, theirs[param_name].grad):
                return verdict(False, claim, f"{name}: the gradient of {param_name} differs from PEFT's")
        want, _ = _manual_hf_greedy(reference, kind, prompt if arch == "shipped" else ids[1:, :6], 8)
        if not torch.equal(generated, want):
            return verdict(False, claim, f"{name}: generate wrote {generated[0, -8:].tolist()}, the manual cached "
                                         f"HF loop {want[0, -8:].tolist()}")
    return verdict(True, claim)


def end_to_end_prefix() -> bool:
    """Chapter 10's prefix-tuning comparison with `PrefixTuning.forward` (the learner's inside
    `use(prefix_forward=...)`): logits and prefix gradients bit for bit equal to PEFT's, greedy ids equal to HF's."""
    return _end_to_end("prefix", "Prefix tuning with your forward (shipped GPT with and without prefix_projection, "
                                 "Llama with GQA, padded batch): logits and prefix gradients equal PEFT's bit for bit, "
                                 "and cached greedy decoding equals the manual cached HF loop")


def end_to_end_prompt() -> bool:
    """Chapter 10's prompt-tuning comparison with `PromptTuning.prepend_soft_prompt` (the learner's inside
    `use(soft_prompt=...)`): logits and soft-prompt gradients bit for bit equal to PEFT's, greedy ids equal to HF's."""
    return _end_to_end("prompt", "Prompt tuning with your soft prompt (shipped GPT, Llama with GQA, padded batch): "
                                 "logits and soft-prompt gradients equal PEFT's bit for bit, and cached greedy "
                                 "decoding equals the manual cached HF loop")


@exercise("10.4", "attention over a prefix")
def check_attention_with_prefix(attention_with_prefix) -> None:
    """Exercise 10.4: `attention_with_prefix(q, k, v, prefix_k, prefix_v)`: causal attention of T real queries
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
    check("10.4", cases,
          hint="the prefix keys and values go in front of the real ones; every query may see all of the prefix, "
               "and the real keys only up to its own position.",
          more="the mask has one row per real query and P + T columns; the causal triangle covers only the real "
               "part, and it must be aligned so that query t sees real key t (a triangle over all P + T columns "
               "starts in the wrong corner).")


@exercise("10.5", "count prefix-tuning parameters")
def check_prefix_num_params(prefix_num_params) -> None:
    """Exercise 10.5: `prefix_num_params(num_layers, num_heads, num_kv_heads, head_dim, num_virtual_tokens,
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
    check("10.5", cases,
          hint="count the table's numbers: P rows, each holding every layer's key and value; how wide is one "
               "layer's key when several query heads share a key/value head?",
          more="with grouped-query attention the width comes from the key/value heads, not the query heads; with "
               "a projection, count the short embedding and both linear layers of the MLP, biases included.")


@exercise("10.6", "cached greedy decoding with virtual tokens")
def check_greedy_generate(greedy_generate) -> None:
    """Exercise 10.6: `greedy_generate(model, input_ids, max_new_tokens)` runs the prompt once into a cache
    from `model.make_cache`, then feeds one token per step; for a PrefixTuning or PromptTuning model."""
    def case(kind, arch, P, B, T, n, seed):
        def run():
            model, reference = _virtual_twins(kind, arch, P, seed)
            ids = torch.randint(0, 31, (B, T), generator=torch.Generator().manual_seed(seed))
            expected, _ = _manual_hf_greedy(reference, kind, ids, n)
            calls = _record_calls(model)
            with torch.no_grad():
                got = greedy_generate(model, ids.clone(), n)
            what = f"greedy_generate({kind} tuning on {arch}, B={B}, T={T}, n={n})"
            expect_equal(got, expected, what=what, atol=0, rtol=0)
            _expect_cached_loop(calls, T, n, what)
        return run

    cases = [case("prefix", "gpt2", 4, 1, 3, 6, 1), case("prefix", "llama", 3, 2, 5, 8, 2),
             case("prompt", "gpt2", 5, 2, 4, 7, 3), case("prompt", "llama", 2, 1, 1, 5, 4)]
    check("10.6", cases,
          hint="one cache for the whole text: the prompt goes in once, then each step feeds only the token it just "
               "chose; the virtual tokens are already in that cache after the first call.",
          more="ask the model for a cache long enough for the prompt and every new token, pass that same cache to "
               "every call, and pick each new token as the argmax of the last position's logits.")


def _virtual_twins(kind: str, arch: str, P: int, seed: int = 0, prefix_projection: bool = False):
    """(our PrefixTuning or PromptTuning, PEFT's model of the same kind on the HF twin), with the same weights.

    arch "gpt2" and "llama" (grouped-query attention: 4 query heads, 2 key/value heads) are tiny models with
    vocabulary 31 built from HF; "shipped" is the course's trained GPT and its `to_hf()` twin.
    """
    from minillm.models import GPT, Llama
    from minillm.peft.prefix import PrefixTuning
    from minillm.peft.prompt import PromptTuning
    from minillm.pretrained import load_pretrained

    peft = _peft()
    if arch == "shipped":
        ours, _ = load_pretrained()
        hf = ours.to_hf()
    else:
        if arch == "gpt2":
            hf = _hf_model("gpt2", seed, vocab_size=31, n_positions=32, n_embd=12, n_layer=2, n_head=3)
        else:
            hf = _hf_model("llama", seed, **_llama_sizes(2, 4, 2, 4, vocab_size=31))
        ours = (GPT if arch == "gpt2" else Llama).from_hf(hf)
    if kind == "prefix":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                         prefix_projection=prefix_projection)
        model = PrefixTuning(ours, P, prefix_projection=prefix_projection)
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        model = PromptTuning(ours, P)
    torch.manual_seed(seed)  # PEFT draws its virtual tokens from the global generator
    reference = peft.get_peft_model(hf, config)
    theirs = dict(reference.prompt_encoder.default.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[name])
    return model, reference


def _manual_hf_greedy(reference, kind: str, ids: torch.Tensor, n: int):
    """Greedy decoding by hand over PEFT's HF base model: the virtual tokens go in once (the prefix as the
    initial cache, or the soft prompt in front of the prompt's embeddings), then one token per step into the
    same cache. Returns (ids (B, T + n), the logits of every call: (B, T, V) first, then (B, 1, V) each)."""
    base = reference.base_model
    with torch.no_grad():
        if kind == "prefix":  # the prefix is HF's initial cache
            cache = reference.get_prompt(ids.size(0))
            logits = base(ids, cache=cache).logits
        else:  # the soft prompt goes in front of the token embeddings, once
            embeds = torch.cat((reference.get_prompt(ids.size(0)), base.get_input_embeddings()(ids)), dim=1)
            out = base(inputs_embeds=embeds, use_cache=True)
            cache, logits = out.cache, out.logits[:, reference.peft_config["default"].num_virtual_tokens:]
        every_logits = [logits]
        for _ in range(n):
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            ids = torch.cat((ids, next_id), dim=1)
            logits = base(next_id, cache=cache).logits
            every_logits.append(logits)
    return ids, every_logits


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
