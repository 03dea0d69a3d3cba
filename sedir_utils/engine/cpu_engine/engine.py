"""A continuous-batching sampler for transformers causal LMs on the CPU: no decoding past the end of a turn.

``model.generate`` decodes a fixed batch until its longest row ends: rows that closed their turn keep
occupying the batch, and its growing cache is copied on every step. Here each of ``batch_size`` slots
holds one prompt; a finished row frees its slot at once and the next prompts are prefilled into free
slots. The key/value cache (``SlotCache``) is in the model's dtype, one row per slot with the row's tokens
from column 0, kept contiguous and just wider than the longest live row: a decode step writes each row's
new key at that row's own length, and attention (``kernels.decode_attention``, a compiled CPU kernel,
where it can be built) reads each row only up to its length. The model's linear layers run from weights
pre-packed for oneDNN while sampling (``scoped.packed_linears``).

Sampling draws from one ``torch.Generator`` per prompt, seeded from ``seed`` and the prompt's index, so a
prompt's sample does not depend on which prompts share its batch (up to floating-point differences in
the forward pass, which batch composition can change in low-precision dtypes).

Nothing here changes the process at import: the attention function is registered with transformers, and
the denormal mode, malloc tuning and packed weights set, only inside ``stream``, and undone after. Nor does
importing it load torch or transformers (~5 s; the CLI, the runner and the sampling registry import this module):
they are imported where used, and the cache's classes, which extend transformers' own, are made at first use
(``slot_cache_type``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sedir_utils.engine.cpu_engine.kernels import decode_attention
from sedir_utils.engine.cpu_engine.scoped import flush_denormals, malloc_kept, packed_linears

if TYPE_CHECKING:
    import torch
    from transformers.cache_utils import Cache

ATTENTION = "sedir_slots"


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one decoded token against the slot cache, with grouped heads (no repeated keys).

    Prefill and anything with more than one query go to transformers' SDPA. For one query: the compiled
    kernel where it is built, else torch's matmuls on the slot cache's (contiguous) tensors.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # The engine's masks are prefixes (columns 0..length): the compiled kernel reads only those.
        out = decode_attention(query, key, value, attention_mask.reshape(batch, -1).sum(-1), scale)
        if out is not None:
            return out.transpose(1, 2), None
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).to(key.dtype)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scale)
    if attention_mask is not None:  # [batch, 1, 1, kv] booleans: True where the row may attend
        scores.masked_fill_(~attention_mask, float("-inf"))
    weights = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(weights, value).reshape(batch, heads, 1, dim).to(query.dtype)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def slot_attention_on(model):
    """Register ``slot_attention`` with transformers and switch ``model`` to it for the duration; after,
    the model's own attention again. The registration is counted: the first sampling call to start saves
    whatever was registered under the name (normally nothing) and the last to end puts it back, so a call
    made while another is under way (a generator consumed inside another's loop) leaves it to the outer one.
    Interleaving two calls' steps in one thread is not supported: each holds ``torch.inference_mode``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if _REGISTRATION.users == 0:
        registries = [(AttentionInterface, slot_attention), (AttentionMaskInterface, sdpa_mask)]
        _REGISTRATION.saved = {registry: registry._global_mapping.get(ATTENTION) for registry, _ in registries}
        for registry, function in registries:
            registry.register(ATTENTION, function)
    _REGISTRATION.users += 1
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION)
        yield
    finally:
        model.set_attn_implementation(before)
        _REGISTRATION.users -= 1
        if _REGISTRATION.users == 0:
            for registry, saved in _REGISTRATION.saved.items():
                if saved is None:
                    registry._global_mapping.pop(ATTENTION, None)
                else:
                    registry._global_mapping[ATTENTION] = saved


@dataclass
class _Registration:
    users: int = 0  # sampling calls running
    saved: dict = field(default_factory=dict)  # each registry's entry under ATTENTION before the first


_REGISTRATION = _Registration()


@functools.cache
def slot_cache_type() -> type:
    """``SlotCache``, a transformers ``Cache`` of ``SlotLayer``s: each behaviour class below, with transformers'
    ``Cache`` (``CacheLayerMixin``) as its base, made once, when sampling first needs it."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    layer = type("SlotLayer", (SlotLayer, CacheLayerMixin), {"__module__": __name__})
    return type("SlotCache", (SlotCache, Cache), {"__module__": __name__, "layer_type": layer})


class SlotLayer:
    """One layer's keys and values, ``[slots, heads, columns, head_dim]``; row ``r`` holds its tokens from
    column 0. The tensors are always contiguous and exactly ``columns`` wide (see ``SlotCache.fit``). Its behaviour:
    the class sampling uses is made by ``slot_cache_type``, with transformers' ``CacheLayerMixin`` as a base."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        import torch

        _, heads, _, dim = key_states.shape
        shape = (self.owner.slots, heads, self.owner.columns, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def resize(self, columns: int) -> None:
        """Re-lay the tensors out ``columns`` wide, keeping the first ``min(old, new)`` columns of every row."""
        keep = min(columns, self.keys.shape[2])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], columns, old.shape[3])
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        """Write each row's one new key/value at that row's length; return the whole (contiguous) tensors."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, at = self.owner.rows, self.owner.lengths
        self.keys[rows, :, at] = key_states[:, :, 0]
        self.values[rows, :, at] = value_states[:, :, 0]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.columns, 0

    def get_seq_length(self) -> int:
        return self.owner.columns - 1

    def get_max_length(self) -> int:
        return self.owner.columns


class SlotCache:
    """Preallocated cache of ``slots`` rows. ``lengths[r]`` is how many tokens row ``r`` holds (its next
    token's column and position). A decode step attends to all ``columns`` (a mask hides each row's unused
    ones); ``fit`` keeps ``columns`` just above the longest row. Its behaviour: the class sampling uses is made by
    ``slot_cache_type``, with transformers' ``Cache`` as a base.

    Why not one wide buffer read through a narrower view: a view ``[:, :, :width]`` of a wider tensor is
    strided, and CPU bf16 batched matmuls copy strided operands first (a large share of a decode step;
    profiled with ``benchmarks/generation.py``). Re-laying the cache out every ``step`` columns costs one copy per
    ``step`` decode steps instead of one per step.
    """

    layer_type: type = SlotLayer  # with CacheLayerMixin, in the class slot_cache_type makes

    def __init__(self, num_layers: int, slots: int, device, step: int = 32):
        import torch

        self.slots, self.step, self.columns = slots, step, step
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = torch.arange(slots, device=device)
        super().__init__(layers=[self.layer_type(self) for _ in range(num_layers)])

    def fit(self, needed: int) -> None:
        """Make ``columns`` the smallest multiple of ``step`` holding ``needed`` columns, when it grows, or
        shrinks by more than one ``step`` (so a row finishing does not re-lay the cache out at once)."""
        target = -(-needed // self.step) * self.step
        if target > self.columns or target + self.step < self.columns:
            self.columns = target
            for layer in self.layers:
                if layer.is_initialized:
                    layer.resize(target)

    def place(self, rows: list[int], prefill: Cache, valid: torch.Tensor, sources: list[int]) -> None:
        """Copy rows of a left-padded prefilled cache to columns 0.. of slots ``rows``: slot ``rows[j]`` gets
        prefill row ``sources[j]`` (one prefill row may fill several slots); ``valid`` marks real columns."""
        import torch

        device = self.lengths.device
        sources_t = torch.tensor(sources)
        picked = valid[sources_t]
        counts = picked.sum(-1)
        self.lengths[torch.tensor(rows, device=device)] = counts.to(device)
        self.fit(int(self.lengths.max()) + 1)
        src_row = torch.repeat_interleave(sources_t, counts)
        src_col = picked.nonzero()[:, 1]  # each row's real columns, in order
        dst_row = torch.repeat_interleave(torch.tensor(rows), counts)
        dst_col = torch.cat([torch.arange(int(c)) for c in counts])
        src_row, src_col, dst_row, dst_col = (t.to(device) for t in (src_row, src_col, dst_row, dst_col))
        for layer, source in zip(self.layers, prefill.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(source.keys, source.values)
            layer.keys[dst_row, :, dst_col] = source.keys[src_row, :, src_col].to(layer.keys.dtype)
            layer.values[dst_row, :, dst_col] = source.values[src_row, :, src_col].to(layer.values.dtype)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (shrinks the batch once the queue is empty and most slots are idle)."""
        import torch

        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device))
        self.slots = len(rows)
        self.rows = torch.arange(self.slots, device=self.lengths.device)


@dataclass
class Decoding:
    """How to pick the next token from logits; ``temperature`` 0 is greedy."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def choose(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        import torch

        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k > 0 and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), 0.0)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        cdf = probs.cumsum(-1)
        draws = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device)
        targets = (draws * cdf[:, -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


@dataclass
class Finished:
    index: int  # position of the prompt in the caller's list
    tokens: list[int]  # new tokens, without the end-of-turn token
    finished: bool  # False: stopped at max_new_tokens


def stream(
    model,
    prompts: list[list[int]],
    decoding: Decoding,
    max_new_tokens: int,
    stop_ids: list[int],
    batch_size: int,
    seed: int,
    prefill_batch: int = 16,
    pad_id: int = 0,
    first_index: int = 0,
):
    """Yield a ``Finished`` per prompt (lists of token ids), in the order they complete.

    Prompt ``i`` samples from a generator seeded with ``seed`` and ``first_index + i`` (so a list split
    into chunks samples as the whole list would). Prompts are admitted longest first (identical prompts
    together, and prefilled once), ``prefill_batch`` at a time, whenever that many slots are free (or the
    rest of the queue fits), so prefills pad little and the batch stays full.
    """
    if not prompts:
        return
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    import torch

    with slot_attention_on(model), flush_denormals(), malloc_kept(), torch.inference_mode(), packed_linears(model):
        yield from _stream(
            model, prompts, decoding, max_new_tokens, stop_ids, batch_size, seed, prefill_batch, pad_id, first_index
        )


def _stream(model, prompts, decoding, max_new_tokens, stop_ids, batch_size, seed, prefill_batch, pad_id, first_index):
    import torch

    device = next(model.parameters()).device
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    queue = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), prompts[i], i))
    slots = min(batch_size, len(prompts))
    cache = slot_cache_type()(model.config.num_hidden_layers, slots, device)
    owner: list[int | None] = [None] * slots  # prompt index each row holds
    generated: list[list[int]] = [[] for _ in range(slots)]
    generators: list[torch.Generator | None] = [None] * slots
    next_token = torch.zeros(slots, dtype=torch.long, device=device)
    fresh = [False] * slots  # next_token holds a token not yet recorded

    def admit(free: list[int]) -> None:
        group = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
        rows = free[: len(group)]
        # Identical prompts (n answers to one question) are prefilled once and copied into their slots.
        unique: dict[tuple[int, ...], int] = {}
        sources = [unique.setdefault(tuple(prompts[i]), len(unique)) for i in group]
        texts = list(unique)
        width = max(map(len, texts))
        ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(texts), width), dtype=torch.long)
        for r, text in enumerate(texts):
            ids[r, width - len(text) :] = torch.tensor(text)
            valid[r, width - len(text) :] = 1
        prefill = _new_dynamic_cache(model)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=valid.to(device),
            position_ids=(valid.cumsum(-1) - 1).clamp(min=0).to(device),
            past_key_values=prefill,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if not all(getattr(layer, "is_initialized", False) for layer in prefill.layers):
            raise RuntimeError(
                f"{type(model).__name__}'s forward did not fill the key/value cache it was given (its forward was "
                "replaced in this process, as importing unsloth does); sample in a process without those patches"
            )
        cache.place(rows, prefill, valid, sources)
        for r, i in zip(rows, group):
            owner[r], generated[r], fresh[r] = i, [], True
            generators[r] = torch.Generator().manual_seed(seed * 1_000_003 + first_index + i)
        next_token[torch.tensor(rows, device=device)] = decoding.choose(
            logits[torch.tensor(sources, device=device)], [generators[r] for r in rows]
        )

    admit(list(range(slots)))
    while True:
        # Record the tokens just chosen; retire rows that closed their turn or used their budget.
        chosen, ended = next_token.tolist(), torch.isin(next_token, stop).tolist()
        for r in range(cache.slots):
            if not fresh[r]:
                continue
            fresh[r] = False
            if not ended[r]:
                generated[r].append(chosen[r])
            if ended[r] or len(generated[r]) >= max_new_tokens:
                yield Finished(owner[r], generated[r], bool(ended[r]))
                owner[r], generators[r] = None, None
                cache.lengths[r] = 0
        free = [r for r in range(cache.slots) if owner[r] is None]
        if queue and free and (len(free) >= min(prefill_batch, len(queue)) or len(free) == cache.slots):
            admit(free)
            continue
        busy = [r for r in range(cache.slots) if owner[r] is not None]
        if not busy:
            return
        if not queue and len(busy) <= cache.slots // 2:
            # Nothing left to admit: shrink the batch to the rows still decoding.
            keep = torch.tensor(busy, device=device)
            cache.select(keep)
            next_token = next_token[keep]
            owner, generated = [owner[r] for r in busy], [generated[r] for r in busy]
            generators = [generators[r] for r in busy]
            fresh = [False] * len(busy)
            busy = list(range(len(busy)))
        # One decode step for every row; an idle row (length 0) runs a dummy token at column 0, ignored.
        cache.fit(int(cache.lengths.max()) + 1)
        attend = torch.arange(cache.columns, device=device) <= cache.lengths.unsqueeze(-1)
        logits = model(
            input_ids=next_token.unsqueeze(-1),
            attention_mask=attend[:, None, None, :],
            position_ids=cache.lengths.unsqueeze(-1),
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        index = torch.tensor(busy, device=device)
        cache.lengths[index] += 1
        next_token[index] = decoding.choose(logits[index], [generators[r] for r in busy])
        for r in busy:
            fresh[r] = True


def _new_dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
