"""Batched generation engine over a causal LM fed with prompt *embeddings* (text + image tokens).

What it guarantees, and what captioning and serving build on:
- batched prefill of left-padded prompts (position ids from the mask), then a KV-cached decode loop;
- per-request parameters in one batch (max/min new tokens, temperature, top-p/top-k, repetition
  penalty, stop strings); greedy rows and sampled rows can share a batch;
- per-sample stopping: EOS or any stop string ends *that* sample (MiniGPT-4's batched path only
  stopped when every row had stopped), and a finished sample leaves the batch and its KV cache at once;
- streaming: `stream()` yields text deltas per step, holding back bytes of an incomplete UTF-8
  character and any tail that could still become a stop string;
- beam search with length penalty (HF semantics), greedy == HF `generate` token for token.

Two decode paths, with the same tokens:
- static (the default): a slot table over a KV cache allocated once and reused across calls
  (`SlotCache`). Prompts are prefilled into free slots; one decode step then runs over the slots
  with fixed shapes (mask and positions come from per-slot lengths, nothing grows per token), so on
  CUDA it is compiled and replayed as a CUDA graph. Its attention reads the shortest cache prefix that
  holds every row (`attention_span`), not the whole capacity: a batch of short captions in a cache
  sized for long ones reads the KV bytes of its own lengths. A finished sample frees its slot, and `add()`
  + `step()` let new prompts join a running batch between steps (continuous batching, serving.py).
  `warmup()` allocates the cache and compiles/captures the step at every batch width and prefix up front (a
  serving replica does it before it takes requests).
- simple (`static=False`): a transformers DynamicCache grown with torch.cat every token, rows
  removed as they finish; the baseline of bench/caption.py, and the path beam search always takes.

Logit processing follows transformers' order and semantics for prompts given as embeddings: the
repetition penalty covers generated tokens only; min_new_tokens masks EOS; then temperature, top-k, top-p.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

log = logging.getLogger(__name__)

CAPACITY_STEP = 64
"""Slot capacity (prompt + new tokens) grows in multiples of this: few distinct cache shapes to compile for."""


def slot_capacity(length: int) -> int:
    """The positions a slot of `length` positions (prompt + new tokens) gets: `length` in CAPACITY_STEPs."""
    return -(-length // CAPACITY_STEP) * CAPACITY_STEP


SPANS = 8
"""The decode step attends over a prefix of the cache, the shortest of about this many per capacity
(`attention_spans`) that holds every row: each one is a CUDA graph per batch width."""


def attention_spans(capacity: int) -> list[int]:
    """The cache prefixes a decode step may attend over: multiples of CAPACITY_STEP (more of them for a
    large capacity, SPANS at most), the capacity last."""
    step = CAPACITY_STEP * max(1, capacity // (SPANS * CAPACITY_STEP))
    return [*range(step, capacity, step), capacity]


def attention_span(positions: int, capacity: int) -> int:
    """The prefix a decode step attends over when its longest row holds `positions` (new token included)."""
    spans = attention_spans(capacity)
    return spans[bisect.bisect_left(spans, positions)]


COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=True)
"""torch.compile options of the static decode step: Inductor kernels replayed as CUDA graphs."""

DYNAMIC_SOURCES = "L['decode_width'],L['decode_span']"
"""The decode step's int arguments, dynamic from its first compile (`torch.compiler.config.dynamic_sources`)."""


def _compiler_settings(shapes: int) -> None:
    """Process-wide torch.compile settings the decode step needs, added to the process's own: its width
    and prefix are dynamic from the first compile, so two compiles (width 1, then every other width and
    prefix; each a long compile at 7B) cover every shape, not one more per int that turns out to vary; and
    Inductor's warning past 8 CUDA graphs of a function stays quiet up to the step's `shapes`, one graph
    each by design."""
    import torch._inductor.config as inductor

    config = torch.compiler.config
    if DYNAMIC_SOURCES not in config.dynamic_sources:
        config.dynamic_sources = ",".join(filter(None, [config.dynamic_sources, DYNAMIC_SOURCES]))
    if (inductor.triton.cudagraph_dynamic_shape_warn_limit or shapes) < shapes:
        inductor.triton.cudagraph_dynamic_shape_warn_limit = shapes


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request."""

    max_new_tokens: int = 300
    min_new_tokens: int = 0
    """EOS is masked until this many tokens exist (MiniGPT-4's min_length=1 has no effect on embeddings prompts)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    """Stop strings: generation of a sample ends when its text contains one; the text is cut before it."""
    max_length: int = 2000
    """Context + new tokens; longer contexts are left-truncated (as MiniGPT-4's chat does)."""
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.temperature > 0, "temperature must be > 0 (use do_sample=False for greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.max_length > self.max_new_tokens, "max_length must exceed max_new_tokens"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (got {self})")

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


# MiniGPT-4 demo defaults (demo.py / Chat.answer).
CHAT_DEFAULTS = SamplingParams(max_new_tokens=300, num_beams=1, min_new_tokens=0, top_p=0.9, repetition_penalty=1.05,
                               length_penalty=1.0, temperature=1.0, do_sample=True, max_length=2000)


@dataclass
class Completion:
    token_ids: list[int]
    """Generated ids, including a final EOS or the tokens of a stop string."""
    text: str
    """Decoded text without special tokens, cut before the first stop string."""
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length'."""
    prompt_tokens: int
    """Context length actually used (after left truncation)."""


@dataclass
class TokenEvent:
    index: int
    """Request index in the batch."""
    token_id: int
    text: str
    """Text that became final with this token ('' while held back)."""
    completion: Completion | None = None
    """Set on the last event of a request."""


@dataclass
class _Seq:
    index: int
    params: SamplingParams
    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: Completion | None = None
    generator: torch.Generator | None = None
    """Random source of a sampled row (None: torch's global one); rows sharing one draw together."""
    slot: int = -1
    """Its slot in the static engine's cache."""
    text: str = ""
    """Incremental detokenization (`GenerationEngine._text`): the text of ids[:read], complete characters."""
    prefix: int = 0
    read: int = 0


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class SlotCache:
    """The static engine's KV cache and slot table, allocated once and reused across calls.

    Per layer, keys and values of shape (slots, kv_heads, capacity + 1 spare, head_dim). Slot s holds one
    sequence at cache indices 0..lengths[s]-1, so a cache index is the token's position id whatever
    the padding of the prefill it came from. The per-slot state the decode step reads and advances
    sits beside it on the device at fixed addresses, so the step can be replayed as a CUDA graph:
    `lengths`, `active` (rows that advance), `next_tokens` (the step's input) and `seen` (each
    row's generated tokens, for the repetition penalty). The LLM gets this object as its `cache`:
    `update` follows transformers' Cache.update contract for the decode step, returning the first
    `span` positions (set by the step) of the slots it decodes.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, vocab: int,
                 dtype: torch.dtype, device: torch.device):
        # one spare position: no prefix view is then the whole (contiguous) tensor, a case Dynamo would
        # compile apart from the others
        shape = (slots, kv_heads, capacity + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.span = capacity

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] - 1

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.lengths, self.active, self.next_tokens, self.seen]

    def grown(self, slots: int, capacity: int) -> "SlotCache":
        """A larger cache with this one's contents at the same slots and indices."""
        k = self.keys[0]
        new = SlotCache(len(self.keys), slots, k.shape[1], capacity, k.shape[3], self.seen.shape[1], k.dtype, k.device)
        for old, fresh in zip(self.tensors(), new.tensors()):
            fresh[tuple(slice(0, n) for n in old.shape)] = old
        return new

    def load(self, slots: torch.Tensor, prefill, mask: torch.Tensor) -> None:
        """Copy a left-padded prefill (a DynamicCache over rows `mask` (n, L)) into `slots`, each
        sequence shifted to start at index 0; the rows join the decode once their first token is chosen."""
        width = mask.shape[1]
        lengths = mask.sum(1)
        src = (torch.arange(width, device=mask.device) + (width - lengths)[:, None]).clamp(max=width - 1)  # (n, L)
        for layer, keys, values in zip(prefill.layers, self.keys, self.values):
            at = src[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            keys[slots, :, :width] = layer.keys.gather(2, at)
            values[slots, :, :width] = layer.values.gather(2, at)
        self.lengths[slots] = lengths
        self.active[slots] = 0
        self.seen[slots] = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Decode: write each of the first W slots' new key/value (W, kv_heads, 1, head_dim) at the
        slot's own length; return those slots' first `span` positions (views: the mask hides what a
        row does not hold)."""
        w = key_states.shape[0]
        at = self.lengths[:w].view(w, 1, 1, 1).expand_as(key_states)
        keys, values = self.keys[layer_idx][:w], self.values[layer_idx][:w]
        keys.scatter_(2, at, key_states)
        values.scatter_(2, at, value_states)
        return keys[:, :, :self.span], values[:, :, :self.span]


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _widths(slots: int) -> list[int]:
    """The batch widths a decode step over `slots` slots runs at: powers of two, then `slots`."""
    return sorted({min(slots, 1 << i) for i in range(slots.bit_length() + 1)})


def _to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the GPU: a plain
    torch.tensor(..., device="cuda") synchronizes the stream, which would stall the host behind the
    decode step launched ahead; a copy from pinned memory is queued instead."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _start_copy_to_host(t: torch.Tensor):
    """Start copying `t` to the host; the returned function waits for that copy only, not for GPU
    work queued after it (a plain .tolist() would wait for the decode launched next)."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()
    return wait


class GenerationEngine:
    """Generation over `llm` (a transformers causal LM) from per-request prompt embeddings (L_i, H).

    static: the slot engine over a reused static KV cache (default); False gives the simple
    DynamicCache path. max_slots: sequences decoding at once in the static engine (more prompts
    queue for free slots). compile: compile the static decode step with `COMPILE_OPTIONS`
    (default: on for a CUDA LLM that bitsandbytes did not quantize, int8wo included; off on CPU, where
    there are no CUDA graphs).
    """

    def __init__(self, llm, tokenizer, static: bool = True, max_slots: int = 256, compile: bool | None = None):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.static, self.max_slots, self.compile = static, max_slots, compile
        # Every row's text is decoded every step; transformers' decode() spends longer converting the
        # id list than its Rust tokenizer takes to decode it, so call that directly where they agree.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._windows = backend is not None and not tokenizer.clean_up_tokenization_spaces
        decode = backend.decode if self._windows else tokenizer.decode
        self._detokenize = functools.partial(decode, skip_special_tokens=True)
        # and each step decodes only the newest tokens (`_text`), unless transformers' clean-up rewrites
        # text by its context (then the whole sequence, as before)
        # transformers 5.2x renamed `past_key_values` to `cache` (old name removed in 5.40); 5.17 knows only the old
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._additive_mask = getattr(base.config, "_attn_implementation", None) == "eager"
        self._quantized = getattr(base, "hf_quantizer", None) is not None
        # the static engine's state: cache, running rows by slot, rows added since the last step
        self._cache: SlotCache | None = None
        self._compiled = None
        self._running: dict[int, _Seq] = {}
        self._joining: list[tuple[list[_Seq], torch.Tensor]] = []  # (rows, their prefill logits (n, V))
        self._launched: torch.Tensor | None = None  # logits of the decode step launched ahead
        self._free = list(range(max_slots))  # sorted: the lowest free slot first keeps the decode narrow
        self._next_id = 0

    # -- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        plist = self._param_list(prompts, params)
        if any(p.num_beams > 1 for p in plist):
            if len({(p.num_beams, p.max_new_tokens, p.length_penalty, p.do_sample) for p in plist}) != 1:
                raise ValueError("beam search needs the same num_beams/max_new_tokens/length_penalty for the whole batch")
            return self._beam_search(prompts, plist)
        out: list[Completion | None] = [None] * len(prompts)
        for events in self._loop(prompts, plist):
            for ev in events:
                if ev.completion is not None:
                    out[ev.index] = ev.completion
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def stream(self, prompts: Sequence[torch.Tensor], params: SamplingParams | Sequence[SamplingParams]) -> Iterator[list[TokenEvent]]:
        """Yield, per decode step, the events of the requests that produced a token."""
        plist = self._param_list(prompts, params)
        if any(p.num_beams > 1 for p in plist):  # beams are only known at the end: one event per request
            comps = self.generate(prompts, plist)
            yield [TokenEvent(i, c.token_ids[-1] if c.token_ids else -1, c.text, c) for i, c in enumerate(comps)]
            return
        yield from self._loop(prompts, plist)

    # -- continuous batching (static engine) -------------------------------------------------------
    @torch.no_grad()
    def warmup(self, slots: int | None = None, tokens: int = CAPACITY_STEP) -> dict:
        """Allocate the KV cache for `slots` sequences (default: max_slots) of `tokens` positions each
        (prompt + new tokens), then run the decode step once at every width a batch of up to that many
        sequences decodes at and every cache prefix it attends over, so that compiling the step and
        capturing its CUDA graphs happen now, not while requests wait: a decode step at a shape not seen
        before compiles (tens of seconds at 7B) or records a graph, and stalls every running sequence.
        Later calls that fit decode without compiling; a longer request grows the cache (and compiles
        once more). The slots stay inactive: nothing is decoded into them and the engine's state is
        unchanged.

        Returns {"slots", "capacity", "widths", "spans", "cache_gib", "compiled", "seconds"}."""
        if not self.static:
            raise ValueError("warmup() is for the static engine")
        if self.busy:
            raise RuntimeError("warmup() needs an idle engine")
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        t = time.perf_counter()
        embedding = self.llm.get_input_embeddings().weight
        prompt = torch.zeros(1, embedding.shape[1], dtype=embedding.dtype, device=embedding.device)
        logits, prefill, *_ = self._prefill([prompt], [SamplingParams(max_new_tokens=1)])
        self._reserve(min(slots or self.max_slots, self.max_slots), tokens, prefill, logits)
        c = self._cache
        c.active.zero_()  # every slot computes, none advances
        widths, spans = _widths(c.slots), attention_spans(c.capacity)
        for width in widths:  # compiled: CUDA graph trees run a new shape eagerly once, then record its graph
            for span in spans:
                for _ in range(2 if self._compiled is not None else 1):
                    self._decode(width, span)
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        return {"slots": c.slots, "capacity": c.capacity, "widths": widths, "spans": spans,
                "cache_gib": sum(x.numel() * x.element_size() for x in c.tensors()) / 2**30,
                "compiled": self._compiled is not None, "seconds": time.perf_counter() - t}

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def busy(self) -> bool:
        """Whether sequences are running or waiting for their first token."""
        return bool(self._running or self._joining)

    @torch.no_grad()
    def add(self, prompts: Sequence[torch.Tensor], params: SamplingParams | Sequence[SamplingParams],
            generators: Sequence[torch.Generator | None] | None = None) -> list[int]:
        """Prefill `prompts` (one batched forward) into free slots; they produce their first token at
        the next `step()`, alongside the sequences already running. Returns their ids (TokenEvent.index).

        generators: one per prompt, the random source of sampled rows (None: torch's global one).
        """
        if not prompts:
            return []
        plist = self._param_list(prompts, params)
        if not self.static or any(p.num_beams > 1 for p in plist):
            raise ValueError("add() needs the static engine and num_beams=1 (beam search runs in generate())")
        if len(prompts) > len(self._free):
            raise ValueError(f"{len(prompts)} prompts but {len(self._free)} free slots")
        logits, prefill, mask, _, lengths = self._prefill(prompts, plist)
        slots = self._free[:len(prompts)]
        self._reserve(slots[-1] + 1, max(n + p.max_new_tokens for n, p in zip(lengths, plist)), prefill, logits)
        del self._free[:len(prompts)]
        self._cache.load(_to_device(slots, logits.device), prefill, mask)
        rows = [_Seq(self._next_id + i, p, n, generator=g, slot=s)
                for i, (p, n, g, s) in enumerate(zip(plist, lengths, generators or [None] * len(plist), slots))]
        self._next_id += len(rows)
        self._joining.append((rows, logits))
        return [r.index for r in rows]

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One token for every running and newly added sequence; a sequence that finishes frees its
        slot at once. The decode of the following token is launched before this token's text is
        checked, so on CUDA the GPU computes while the host detokenizes (a sequence that turns out
        to have stopped wasted one slot of that decode)."""
        rows, parts = [], []
        if self._running:
            slots = sorted(self._running)
            logits = self._launched
            if logits is None:  # each row's newest token is not in the cache yet
                logits = self._decode_rows(slots[-1], max(s.prompt_tokens + len(s.ids) for s in self._running.values()))
            parts.append(logits[_to_device(slots, logits.device)])
            rows += [self._running[s] for s in slots]
        for joining, logits in self._joining:
            parts.append(logits)
            rows += joining
        self._joining, self._launched = [], None
        if not rows:
            return []
        c = self._cache
        at = _to_device([s.slot for s in rows], c.lengths.device)
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        tokens = self._choose(self._process(logits, c.seen[at], rows, [len(s.ids) for s in rows]), rows)
        c.next_tokens[at] = tokens
        c.seen[at, tokens] = True
        going = [len(s.ids) + 1 < s.params.max_new_tokens for s in rows]  # unless EOS or a stop string ends it
        c.active[at] = _to_device(going, at.device, torch.long)
        host_tokens = _start_copy_to_host(tokens)
        if any(going):  # the tokens chosen now go in at index prompt + generated so far
            ahead = [s for s, go in zip(rows, going) if go]
            self._launched = self._decode_rows(max(s.slot for s in ahead),
                                               max(s.prompt_tokens + len(s.ids) + 1 for s in ahead))
        events = [self._finish_check(s, t) for s, t in zip(rows, host_tokens())]
        stopped = [s.slot for s, go in zip(rows, going) if go and s.done is not None]
        if stopped:
            c.active[_to_device(stopped, at.device)] = 0
        for s in rows:
            if s.done is None:
                self._running[s.slot] = s
            else:
                self._running.pop(s.slot, None)
                bisect.insort(self._free, s.slot)
        return events

    def abort(self) -> None:
        """Drop every running and waiting sequence (their slots become free)."""
        self._running.clear()
        self._joining.clear()
        self._launched = None
        self._free = list(range(self.max_slots))
        if self._cache is not None:
            self._cache.active.zero_()

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _param_list(prompts, params) -> list[SamplingParams]:
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        return list(params)

    @staticmethod
    def _generator(plist: list[SamplingParams], device) -> torch.Generator | None:
        """One random source per call, seeded by the first request that has a seed."""
        seed = next((p.seed for p in plist if p.seed is not None), None)
        return torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def _loop(self, prompts, plist: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        return self._static_loop(prompts, plist) if self.static else self._simple_loop(prompts, plist)

    def _prefill(self, prompts: Sequence[torch.Tensor], plist: list[SamplingParams]):
        """Left-truncate, left-pad and run the prompts; returns (last logits (B, V), cache, mask, next positions, lengths)."""
        from transformers import DynamicCache

        trimmed = []
        for emb, p in zip(prompts, plist):
            if emb.dim() != 2:
                raise ValueError(f"each prompt must be (L, H) embeddings, got shape {tuple(emb.shape)}")
            begin = max(0, emb.shape[0] + p.max_new_tokens - p.max_length)  # MiniGPT-4 Chat: keep the newest context
            trimmed.append(emb[begin:])
        lengths = [e.shape[0] for e in trimmed]
        b, lmax, h = len(trimmed), max(lengths), trimmed[0].shape[1]
        dev, dtype = trimmed[0].device, trimmed[0].dtype
        embeds = torch.zeros(b, lmax, h, dtype=dtype, device=dev)
        mask = torch.zeros(b, lmax, dtype=torch.long, device=dev)
        for i, e in enumerate(trimmed):
            embeds[i, lmax - e.shape[0]:] = e
            mask[i, lmax - e.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.llm.config)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float(), cache, mask, positions[:, -1] + 1, lengths

    def _step(self, tokens: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.llm(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                       use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()

    def _process(self, logits: torch.Tensor, seen: torch.Tensor, rows: list[_Seq], counts: list[int]) -> torch.Tensor:
        """transformers' repetition penalty (one per row, over the row's generated tokens `seen`, (B, V)
        bool), then EOS masked for rows with fewer than min_new_tokens (`counts`) generated."""
        dev = logits.device
        penalties = [s.params.repetition_penalty for s in rows]
        if any(p != 1 for p in penalties):
            penalty = _to_device(penalties, dev, logits.dtype)[:, None]
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        block_eos = [n < s.params.min_new_tokens for s, n in zip(rows, counts)]
        if self.eos_id is not None and any(block_eos):  # masked_fill: a boolean index would sync with the GPU
            logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(_to_device(block_eos, dev), -float("inf"))
        return logits

    @staticmethod
    def _warp(logits: torch.Tensor, rows: list[_Seq]) -> torch.Tensor:
        """Temperature, top-k, top-p (transformers' warpers), per row."""
        dev = logits.device
        temp = _to_device([[s.params.temperature] for s in rows], dev, logits.dtype)
        logits = logits / temp
        top_k = [s.params.top_k for s in rows]
        if any(top_k):
            kth = torch.stack([logits[i].topk(min(k, logits.shape[1])).values[-1] if k else logits.new_tensor(-float("inf"))
                               for i, k in enumerate(top_k)])
            logits = logits.masked_fill(logits < kth[:, None], -float("inf"))
        if any(s.params.top_p < 1 for s in rows):  # decided on the host: no device sync
            top_p = _to_device([[s.params.top_p] for s in rows], dev, logits.dtype)
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - top_p)
            remove[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
        return logits

    def _choose(self, logits: torch.Tensor, rows: list[_Seq]) -> torch.Tensor:
        """Argmax for greedy rows; sampled rows draw from their warped distribution, one draw per
        random source over its rows in order (rows with their own source, like serving's requests,
        never consume another's randomness)."""
        tokens = logits.argmax(dim=-1)
        groups: list[tuple[torch.Generator | None, list[int]]] = []
        for i, s in enumerate(rows):
            if s.params.do_sample:
                group = next((g for g in groups if g[0] is s.generator), None)
                if group is None:
                    groups.append(group := (s.generator, []))
                group[1].append(i)
        for gen, idx in groups:
            at = _to_device(idx, logits.device)
            probs = self._warp(logits[at], [rows[i] for i in idx]).softmax(dim=-1)
            tokens[at] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return tokens

    def _finish_check(self, seq: _Seq, token: int) -> TokenEvent:
        """Append a token, decide whether the sample ended, and compute the text to emit now."""
        seq.ids.append(token)
        reason = None
        if token == self.eos_id:
            reason = "stop"
        text = self._text(seq)
        stops = seq.params.stop
        if stops:
            cut = min((i for i in (text.find(s, max(0, seq.sent - len(s))) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and len(seq.ids) >= seq.params.max_new_tokens:
            reason = "length"
        if reason is None:
            final_len = len(text) - _hold_back(text, stops)
            if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next byte
                final_len = min(final_len, len(text.rstrip("\ufffd")))
        else:
            final_len = len(text)
        delta = text[seq.sent:final_len] if final_len > seq.sent else ""
        seq.sent = max(seq.sent, final_len)
        if reason is not None:
            seq.done = Completion(list(seq.ids), text, reason, seq.prompt_tokens)
        return TokenEvent(seq.index, token, delta, seq.done)

    def _text(self, seq: _Seq) -> str:
        """The text of all of `seq.ids`, as one decode of them gives it, decoding only the tokens since
        the last complete character plus a context window before them: O(1) per token instead of the
        whole sequence every step. The context matters because a decode strips the leading space of
        its first piece and needs every byte of a split character; so the offsets move on only when
        the text ends in a complete character, and the context only past text that is more than
        spaces (a lone space or a special token decodes to nothing alone, and would let the strip
        take the new text's space). A window that does not extend its context's text is decoded whole."""
        if not self._windows:
            return self._detokenize(seq.ids)
        context = self._detokenize(seq.ids[seq.prefix:seq.read]) if seq.read > seq.prefix else ""
        window = self._detokenize(seq.ids[seq.prefix:])
        if not window.startswith(context) or (not context and seq.prefix > 0):
            text = self._detokenize(seq.ids)
            if not text.endswith("\ufffd"):
                seq.text, seq.prefix, seq.read = text, 0, len(seq.ids)
            return text
        new = window[len(context):]
        text = seq.text + new
        if not text.endswith("\ufffd"):
            if new.strip(" "):
                seq.prefix = seq.read
            seq.text, seq.read = text, len(seq.ids)
        return text

    def _simple_loop(self, prompts, plist: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        logits, cache, mask, positions, lengths = self._prefill(prompts, plist)
        dev = logits.device
        gen = self._generator(plist, dev)
        rows = [_Seq(i, p, n, generator=gen) for i, (p, n) in enumerate(zip(plist, lengths))]
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
        while rows:
            logits = self._process(logits, seen, rows, [len(s.ids) for s in rows])
            tokens = self._choose(logits, rows)
            events = [self._finish_check(s, t) for s, t in zip(rows, tokens.tolist())]
            yield events
            keep = [i for i, s in enumerate(rows) if s.done is None]
            if not keep:
                return
            if len(keep) < len(rows):  # finished samples leave the batch and the KV cache
                k = torch.tensor(keep, device=dev)
                cache.batch_select_indices(k)
                tokens, mask, positions, seen = tokens[k], mask[k], positions[k], seen[k]
                rows = [rows[i] for i in keep]
            seen.scatter_(1, tokens[:, None], True)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = self._step(tokens, cache, mask, positions)
            positions = positions + 1

    def _static_loop(self, prompts, plist: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        """All prompts through the slots: as many as fit start together, the rest take slots as they free up."""
        if self.busy:
            raise RuntimeError("generate()/stream() need an idle engine; this one is running add()ed sequences")
        gen = self._generator(plist, prompts[0].device) if prompts else None
        order: dict[int, int] = {}  # engine id -> prompt index
        waiting = list(range(len(prompts)))
        try:
            while waiting or self.busy:
                if waiting and self._free:
                    take, waiting = waiting[:len(self._free)], waiting[len(self._free):]
                    ids = self.add([prompts[i] for i in take], [plist[i] for i in take], [gen] * len(take))
                    order.update(zip(ids, take))
                events = self.step()
                for ev in events:
                    ev.index = order[ev.index]
                yield events
        finally:  # also when a consumer stops iterating early: the slots come back
            self.abort()

    def _reserve(self, slots: int, length: int, prefill, logits: torch.Tensor) -> None:
        """Make the cache hold `slots` slots of `length` positions: allocated on first use, grown
        (contents kept) when a request needs more; slots in powers of two, positions in CAPACITY_STEPs."""
        c, k = self._cache, prefill.layers[0].keys
        if c is not None and (c.keys[0].device, c.keys[0].dtype) != (k.device, k.dtype):  # the model moved or was cast
            c = self._cache = None
        if c is not None and c.slots >= slots and c.capacity >= length:
            return
        slots = max(min(self.max_slots, _pow2_at_least(slots)), c.slots if c else 0)
        capacity = max(slot_capacity(length), c.capacity if c else 0)
        if c is None:
            self._cache = SlotCache(len(prefill.layers), slots, k.shape[1], capacity, k.shape[3], logits.shape[-1],
                                    k.dtype, k.device)
        else:
            self._cache = c.grown(slots, capacity)
        if self.compiles(logits.device):
            for t in self._cache.tensors():  # mutated inside the CUDA graph: keep their addresses
                torch._dynamo.mark_static_address(t)
            self._compiled = self._compiled or torch.compile(self._decode_step, **COMPILE_OPTIONS)
            _compiler_settings(len(_widths(slots)) * len(attention_spans(capacity)))

    def _decode_rows(self, last_slot: int, positions: int) -> torch.Tensor:
        """The decode step over slots 0..last_slot, whose longest row holds `positions` once its new token is in:
        widths in powers of two and prefixes in `attention_spans` (few shapes to compile and capture)."""
        c = self._cache
        return self._decode(min(c.slots, _pow2_at_least(last_slot + 1)), attention_span(positions, c.capacity))

    def compiles(self, device: torch.device) -> bool:
        """Whether the static decode step runs compiled on `device` (by default: on CUDA, unless the LLM is
        bitsandbytes-quantized); decided once, at the first use."""
        if self.compile is None:  # bitsandbytes layers do not compile: their LLMs run the step eagerly
            self.compile = device.type == "cuda" and not self._quantized
        return self.compile

    def _decode(self, width: int, span: int) -> torch.Tensor:
        if self._compiled is None:
            return self._decode_step(width, span)
        try:
            torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(width, span).clone()  # the graph's output buffer is reused by the next replay
        except torch._dynamo.exc.TorchDynamoException:  # raised before the step ran: costs speed, not requests
            log.warning("compiling the decode step failed; decoding eagerly from now on", exc_info=True)
            self._compiled, self.compile = None, False
            return self._decode_step(width, span)

    def _decode_step(self, decode_width: int, decode_span: int) -> torch.Tensor:
        """One token for the first `decode_width` slots (inactive ones compute and are ignored), attending
        over the first `decode_span` cache positions: fixed shapes, no host sync, the slots' lengths
        advanced in place. Returns logits (width, V). (Distinct names: `DYNAMIC_SOURCES` picks them out.)"""
        c, width, span = self._cache, decode_width, decode_span
        c.span = span
        positions = c.lengths[:width]
        visible = torch.arange(span, device=positions.device) <= positions[:, None]  # (W, S): prefix + new token
        mask = visible[:, None, None, :]  # (W, 1, 1, S); a 4-D mask goes to the attention as it is
        if self._additive_mask:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=c.keys[0].dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(c.keys[0].dtype).min)
        out = self.llm(input_ids=c.next_tokens[:width, None], attention_mask=mask, position_ids=positions[:, None],
                       use_cache=True, **{self._cache_kw: c})
        c.lengths[:width] += c.active[:width]
        return out.logits[:, -1, :].float()

    def _beam_search(self, prompts, plist: list[SamplingParams]) -> list[Completion]:
        """Beam search (or beam sampling with do_sample) with transformers' scoring: hypotheses scored
        sum(logprobs) / generated_len ** length_penalty; a request is done when it holds num_beams
        hypotheses and no running beam can beat the worst (early_stopping=False)."""
        p0 = plist[0]
        k = p0.num_beams
        logits, cache, mask, positions, lengths = self._prefill(prompts, plist)
        b, vocab = logits.shape
        dev = logits.device
        gen = torch.Generator(device=dev).manual_seed(p0.seed) if p0.seed is not None else None
        cache.batch_repeat_interleave(k)
        logits = logits.repeat_interleave(k, 0)
        mask, positions = mask.repeat_interleave(k, 0), positions.repeat_interleave(k, 0)
        beam_scores = torch.zeros(b, k, device=dev)
        beam_scores[:, 1:] = -1e9  # all beams start identical: only the first may expand at step 0
        seqs = torch.zeros(b * k, 0, dtype=torch.long, device=dev)
        rows = [_Seq(i // k, plist[i // k], lengths[i // k]) for i in range(b * k)]
        hyps: list[list[tuple[float, list[int], str]]] = [[] for _ in range(b)]
        done = [False] * b

        def add_hyp(req: int, score: float, ids: list[int], scored_len: int, reason: str):
            hyps[req].append((score / max(scored_len, 1) ** p0.length_penalty, ids, reason))
            hyps[req].sort(key=lambda h: -h[0])
            del hyps[req][k:]

        for t in range(p0.max_new_tokens):
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev).scatter_(1, seqs, True)
            logp = self._process(logits.log_softmax(dim=-1), seen, rows, [t] * len(rows))  # on log-probs, as HF
            scores = logp + beam_scores.view(-1, 1)
            if p0.do_sample:
                probs = self._warp(scores, rows).softmax(-1).view(b, k * vocab)
                top_idx = torch.multinomial(probs, 2 * k, generator=gen)
                top_scores = scores.view(b, k * vocab).gather(1, top_idx)
                top_scores, order = top_scores.sort(dim=1, descending=True)
                top_idx = top_idx.gather(1, order)
            else:
                top_scores, top_idx = scores.view(b, k * vocab).topk(2 * k, dim=1)
            src_beam, tok = top_idx // vocab, top_idx % vocab
            top_scores_l, src_l, tok_l = top_scores.tolist(), src_beam.tolist(), tok.tolist()
            seq_l = seqs.tolist()
            next_src, next_tok, next_score = [], [], []
            last = t == p0.max_new_tokens - 1
            for r in range(b):
                chosen = []
                if not done[r]:
                    for rank in range(2 * k):
                        src = r * k + src_l[r][rank]
                        token, score = tok_l[r][rank], top_scores_l[r][rank]
                        ids = seq_l[src] + [token]
                        ended = token == self.eos_id or (
                            bool(p0.stop) and any(s in self._detokenize(ids) for s in p0.stop))
                        if ended or last:
                            # only candidates ranked among the best num_beams may become hypotheses;
                            # the score is normalised by the generated length, EOS included (as transformers 5)
                            if rank < k:
                                add_hyp(r, score, ids, len(ids), "stop" if ended else "length")
                            if ended:
                                continue
                        if len(chosen) < k:
                            chosen.append((src, token, score))
                        if len(chosen) == k and (rank >= k - 1 or not last):
                            break
                    # transformers' early_stopping=False heuristic: done when every hypothesis slot is
                    # filled and the best running beam, at its current length, cannot beat the worst one
                    if chosen and len(hyps[r]) == k and hyps[r][-1][0] >= chosen[0][2] / (t + 1) ** p0.length_penalty:
                        done[r] = True
                if last:
                    done[r] = True
                if done[r] or len(chosen) < k:  # finished requests keep k dummy beams
                    chosen = [(r * k, self.eos_id or 0, -1e9)] * k
                for src, token, score in chosen:
                    next_src.append(src)
                    next_tok.append(token)
                    next_score.append(score)
            if all(done):
                break
            src_t = torch.tensor(next_src, device=dev)
            tok_t = torch.tensor(next_tok, device=dev)
            seqs = torch.cat([seqs[src_t], tok_t[:, None]], dim=1)
            beam_scores = torch.tensor(next_score, device=dev).view(b, k)
            cache.reorder_cache(src_t)
            mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
            logits = self._step(tok_t, cache, mask, positions)
            positions = positions + 1
        out = []
        for r in range(b):
            _, ids, reason = hyps[r][0]
            text = self._detokenize(ids)
            for stop in p0.stop:
                text = text.split(stop)[0]
            out.append(Completion(ids, text, reason, lengths[r]))
        return out
