"""The KV cache: every layer's keys and values of the positions seen so far, kept for the next step.

Chapter 07 teaches this. Without a cache, generating token t means running the model over all t positions
again, although the keys and values of positions 0..t-1 are the same as last step: O(T²) work for T tokens.
With it, a decoding step runs the model over the one new position and attends to the stored keys: O(T).

The one cache type of minillm: the models (chapter 06), `minillm.generation` and prefix tuning (chapter 10)
all use it. It plays the part of HF Transformers' `DynamicCache` (layers of `DynamicLayer`, or
`DynamicSlidingWindowLayer` for Mistral's window), with the buffers allocated once up front instead of grown
by `torch.cat` at every step.

    cache = model.make_cache(batch_size=1, max_len=64)
    logits = model(prompt_ids, cache=cache)          # prefill: the whole prompt at once
    logits = model(next_id[:, None], cache=cache)    # decode: one position, positions continue after the prompt

Shapes: B batch, nkv key/value heads, hd head dim, L = max_len (or window - 1 with a sliding window).
"""

import torch


class KVCache:
    """Preallocated key/value buffers (B, nkv, L, hd) for each of `num_layers` layers.

    `length` counts the positions seen so far: a model reads it as the position of its first new token
    (the RoPE angle or the row of GPT-2's position table). `update` raises a clear error when `max_len`, the
    context length, would be exceeded.

    With `sliding_window=W` (Mistral) a query only ever sees the last W positions, itself included, so the
    cache keeps only the last W - 1 keys, as HF's `DynamicSlidingWindowLayer` does: memory stays (B, nkv, W-1,
    hd) however long the text grows. `num_kept()` says how many keys a layer holds, which is what a model
    needs to build its mask.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 sliding_window: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):
            _check_int(name, value, minimum=1)
        if sliding_window is not None:
            _check_int("sliding_window", sliding_window, minimum=1)
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.sliding_window = sliding_window
        # With a window, the buffer holds the W - 1 keys before the newest query; otherwise every position.
        capacity = max_len if sliding_window is None else min(max_len, sliding_window - 1)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # One count per layer: layer 0 has already stored a step's keys while layer 1 has not yet.
        self._seen = [0] * num_layers

    @property
    def length(self) -> int:
        """Positions seen so far (0 for a fresh cache): the position the next token will have."""
        return self._seen[0]

    def num_kept(self) -> int:
        """How many past keys each layer holds right now: `length`, or at most W - 1 with a sliding window."""
        return min(self.length, self.keys[0].size(2))

    def reset(self) -> None:
        """Forget everything, to start a new text. The buffers are kept and simply overwritten."""
        self._seen = [0] * self.num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new keys and values k, v (B, nkv, T, hd); return all it may attend to.

        Returns (B, nkv, num_kept + T, hd) keys and values in position order: the kept past ones, then the
        T new ones (`update_layer` does the work on this layer's buffers).
        """
        self._check_update(layer, k, v)
        seen = self._seen[layer]
        self._seen[layer] = seen + k.size(2)
        return update_layer(self.keys[layer], self.values[layer], seen, k, v)

    def _check_update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"KVCache.update: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        expected = (self.batch_size, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.size(0), t.size(1), t.size(3)) != expected:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"KVCache.update: {name} must have shape (B={self.batch_size}, "
                                 f"num_kv_heads={self.num_kv_heads}, T, head_dim={self.head_dim}), got {got}")
            if t.dtype != self.keys[layer].dtype:
                raise TypeError(f"KVCache.update: {name} has dtype {t.dtype} but the cache holds "
                                f"{self.keys[layer].dtype}; make the cache with the model's dtype")
        if k.shape != v.shape:
            raise ValueError(f"KVCache.update: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
        if self._seen[layer] + k.size(2) > self.max_len:
            raise ValueError(f"KVCache: the context length would be exceeded: {self._seen[layer]} positions are "
                             f"cached and {k.size(2)} more would make {self._seen[layer] + k.size(2)} > "
                             f"max_len={self.max_len}; make a larger cache (up to the model's max_seq_len) or "
                             "call reset() to start over")

    def __repr__(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""
        return (f"KVCache(num_layers={self.num_layers}, batch_size={self.batch_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, max_len={self.max_len}{window}, "
                f"length={self.length})")


def update_layer(K: torch.Tensor, V: torch.Tensor, seen: int, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cache update: store the new keys and values k, v (B, nkv, T, hd) in the buffers K, V
    (B, nkv, L, hd) after the `seen` positions stored so far, and return what the layer may attend to.

    While the new positions fit (seen + T <= L) they are written after the stored ones and the result is a
    view of the buffers, no copy. Past that point the cache has a sliding window (L = W - 1; without one,
    `KVCache` refuses to overflow): the buffer holds the newest L positions, oldest first, so the result is
    those kept ones followed by the new ones, and the buffer then rolls on to the newest L of them, as HF's
    `DynamicSlidingWindowLayer` does. Chapter 07's build exercise 7.1; `KVCache.update` calls it.
    """
    T, L = k.size(2), K.size(2)
    if seen + T <= L:  # room left: append in place
        K[:, :, seen:seen + T].copy_(k)
        V[:, :, seen:seen + T].copy_(v)
        return K[:, :, :seen + T], V[:, :, :seen + T]  # (B, nkv, seen + T, hd), views of the buffers
    kept = min(seen, L)
    k_all = torch.cat((K[:, :, :kept], k), dim=2)  # (B, nkv, kept + T, hd), kept + T > L
    v_all = torch.cat((V[:, :, :kept], v), dim=2)
    # Roll the window: the newest L positions stay for the next step, oldest first.
    K.copy_(k_all[:, :, k_all.size(2) - L:])
    V.copy_(v_all[:, :, v_all.size(2) - L:])
    return k_all, v_all


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"KVCache: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"KVCache: {name} must be >= {minimum}, got {value}")
