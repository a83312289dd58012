"""minillm.generation against HF `generate`: greedy tokens per second on the same weights, one thread.

Chapter 07's `generate` and KV cache, timed against HF Transformers' `model.generate(do_sample=False)` on
GPT-2 and Llama (GQA) models of about 1M parameters (4 layers, d=128, vocabulary 512), built from configs
with random weights (std 0.2) and converted with `from_hf`, so both run the very same numbers. A second
table times minillm with and without its KV cache at 64, 256 and 512 new tokens: without a cache every step
reruns the whole text, so the time per token grows with the length (O(T²) in all), with it stays flat.

    python benchmarks/generation_vs_hf.py            # print the medians and the ratios
    python benchmarks/generation_vs_hf.py --write    # also write benchmarks/results/generation_vs_hf.md

Runs are interleaved in one process (ours, HF's, ours, ...), so a machine that gets busier or quieter during
the run affects both alike, and the tables report medians. Before timing, the script checks that both
produce the same ids; otherwise the comparison would be of different work.
"""

import argparse
import copy
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import transformers

from minillm.generation import generate
from minillm.models import GPT, Llama

RESULTS = Path(__file__).parent / "results" / "generation_vs_hf.md"
VOCAB, PROMPT, NEW_TOKENS = 512, 8, 100
CONFIGS = {  # name -> (HF config, HF model class, our class)
    "GPT-2": (transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=4, n_head=4, n_positions=1024,
                                     bos_token_id=0, eos_token_id=0),
              transformers.GPT2LMHeadModel, GPT),
    "Llama (GQA 4:2)": (transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=1024),
                        transformers.LlamaForCausalLM, Llama),
}


def build_pair(name: str, seed: int = 0):
    """An HF model (eager attention, eval mode) with random weights, and our model converted from it."""
    config, hf_class, our_class = CONFIGS[name]
    config = copy.deepcopy(config)  # models built from one config share it; keep CONFIGS untouched
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = hf_class(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # std 0.2: at HF's 0.02 a tiny random model repeats one token
        for p in hf.parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = p.dim() == 1 and bool((p == 1).all())  # HF initialises norm scales to ones
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    return hf, our_class.from_hf(hf).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_greedy(hf, ids, new_tokens):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def versus_hf(repeats: int) -> list[tuple]:
    """Rows (model, params, our ms, HF ms, our tok/s, HF tok/s, ratio) for NEW_TOKENS greedy tokens."""
    rows = []
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    for name in CONFIGS:
        hf, ours = build_pair(name)
        if not torch.equal(generate(ours, ids, NEW_TOKENS), hf_greedy(hf, ids, NEW_TOKENS)):
            raise SystemExit(f"{name}: minillm and HF generate different ids; fix that before timing")
        ours_s, hf_s = [], []
        for _ in range(repeats):
            ours_s.append(timed(lambda: generate(ours, ids, NEW_TOKENS)))
            hf_s.append(timed(lambda: hf_greedy(hf, ids, NEW_TOKENS)))
        ours_t, hf_t = statistics.median(ours_s), statistics.median(hf_s)
        rows.append((name, ours.num_parameters(), 1e3 * ours_t, 1e3 * hf_t, NEW_TOKENS / ours_t,
                     NEW_TOKENS / hf_t, hf_t / ours_t))
    return rows


def cache_versus_none(repeats: int, lengths=(64, 256, 512)) -> list[tuple]:
    """Rows (model, new tokens, cached s, uncached s, speed-up) for minillm's generate."""
    rows = []
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    for name in CONFIGS:
        _, ours = build_pair(name)
        for n in lengths:
            cached, uncached = [], []
            for _ in range(repeats):
                cached.append(timed(lambda: generate(ours, ids, n)))
                uncached.append(timed(lambda: generate(ours, ids, n, use_cache=False)))
            c, u = statistics.median(cached), statistics.median(uncached)
            rows.append((name, n, c, u, u / c))
    return rows


def markdown(vs_hf, cache_rows, repeats_hf, repeats_cache) -> str:
    lines = [
        "# Generation: minillm vs HF `generate`",
        "",
        f"Greedy decoding, prompt {PROMPT} tokens, batch 1, one thread, random weights (std 0.2), HF eager "
        f"attention; medians of {repeats_hf} interleaved runs. Produced by `benchmarks/generation_vs_hf.py "
        f"--write` on {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}. "
        "Both sides generate the same ids (checked before timing). The machine may be shared: ratios from "
        "separate runs vary.",
        "",
        f"## {NEW_TOKENS} new tokens, with the KV cache",
        "",
        "| model | params | minillm ms | HF ms | minillm tok/s | HF tok/s | minillm / HF speed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params, ours_ms, hf_ms, ours_tps, hf_tps, ratio in vs_hf:
        lines.append(f"| {name} | {params / 1e6:.2f}M | {ours_ms:.0f} | {hf_ms:.0f} | {ours_tps:.0f} | "
                     f"{hf_tps:.0f} | {ratio:.2f}× |")
    lines += ["", f"## minillm with and without its KV cache (medians of {repeats_cache})", "",
              "| model | new tokens | cache s | no cache s | speed-up |", "|---|---|---|---|---|"]
    for name, n, c, u, speedup in cache_rows:
        lines.append(f"| {name} | {n} | {c:.2f} | {u:.2f} | {speedup:.1f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/generation_vs_hf.md")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side against HF")
    parser.add_argument("--cache-repeats", type=int, default=3, help="timed runs per length, cache vs none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    vs_hf = versus_hf(args.repeats)
    cache_rows = cache_versus_none(args.cache_repeats)
    text = markdown(vs_hf, cache_rows, args.repeats, args.cache_repeats)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
