"""Batched generation engine over a causal LM fed with prompt *embeddings* (text + image tokens).

What it guarantees, and what captioning and serving build on:
- batched prefill of left-padded prompts (position ids from the mask), then a KV-cached decode loop;
- per-request parameters in one batch (max/min new tokens, temperature, top-p/top-k, repetition
  penalty, stop strings); greedy rows and sampled rows can share a batch;
- per-sample stopping: EOS or any stop string ends *that* sample (MiniGPT-4's batched path only
  stopped when every row had stopped), and finished rows leave the batch and its KV cache;
- streaming: `stream()` yields text deltas per step, holding back bytes of an incomplete UTF-8
  character and any tail that could still become a stop string;
- beam search with length penalty (HF semantics), greedy == HF `generate` token for token.

Logit processing follows transformers' order and semantics for prompts given as embeddings: the
repetition penalty covers generated tokens only; min_new_tokens masks EOS; then temperature, top-k, top-p.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


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


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class GenerationEngine:
    """Generation over `llm` (a transformers causal LM) from per-request prompt embeddings (L_i, H)."""

    def __init__(self, llm, tokenizer):
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        # transformers 5.2x renamed `past_key_values` to `cache` (old name removed in 5.40); 5.17 knows only the old
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    # -- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        plist = self._param_list(prompts, params)
        if any(p.num_beams > 1 for p in plist):
            if len({(p.num_beams, p.max_new_tokens, p.length_penalty, p.do_sample) for p in plist}) != 1:
                raise ValueError("beam search needs the same num_beams/max_new_tokens/length_penalty for the whole batch")
            return self._beam_search(prompts, plist)
        out: list[Completion | None] = [None] * len(prompts)
        for events in self._decode_loop(prompts, plist):
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
        yield from self._decode_loop(prompts, plist)

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _param_list(prompts, params) -> list[SamplingParams]:
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        return list(params)

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

    @staticmethod
    def _penalize(logits: torch.Tensor, generated: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """transformers' RepetitionPenaltyLogitsProcessor, one penalty per row, over generated ids."""
        if generated.shape[1] == 0 or bool((penalty == 1).all()):
            return logits
        score = logits.gather(1, generated)
        score = torch.where(score < 0, score * penalty, score / penalty)
        return logits.scatter(1, generated, score)

    def _process(self, logits, generated, rows: list[_Seq]) -> torch.Tensor:
        dev = logits.device
        penalty = torch.tensor([[s.params.repetition_penalty] for s in rows], device=dev, dtype=logits.dtype)
        logits = self._penalize(logits, generated, penalty)
        t = generated.shape[1]
        block_eos = torch.tensor([t < s.params.min_new_tokens for s in rows], device=dev)
        if self.eos_id is not None and bool(block_eos.any()):
            logits[block_eos, self.eos_id] = -float("inf")
        return logits

    @staticmethod
    def _warp(logits: torch.Tensor, rows: list[_Seq]) -> torch.Tensor:
        """Temperature, top-k, top-p (transformers' warpers), per row."""
        dev = logits.device
        temp = torch.tensor([[s.params.temperature] for s in rows], device=dev, dtype=logits.dtype)
        logits = logits / temp
        top_k = [s.params.top_k for s in rows]
        if any(top_k):
            kth = torch.stack([logits[i].topk(min(k, logits.shape[1])).values[-1] if k else logits.new_tensor(-float("inf"))
                               for i, k in enumerate(top_k)])
            logits = logits.masked_fill(logits < kth[:, None], -float("inf"))
        top_p = torch.tensor([[s.params.top_p] for s in rows], device=dev, dtype=logits.dtype)
        if bool((top_p < 1).any()):
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - top_p)
            remove[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
        return logits

    def _choose(self, logits: torch.Tensor, rows: list[_Seq], gen: torch.Generator | None) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        sample_rows = [i for i, s in enumerate(rows) if s.params.do_sample]
        if not sample_rows:
            return greedy
        idx = torch.tensor(sample_rows, device=logits.device)
        probs = self._warp(logits[idx], [rows[i] for i in sample_rows]).softmax(dim=-1)
        picked = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return greedy.index_copy(0, idx, picked)

    def _finish_check(self, seq: _Seq, token: int) -> TokenEvent:
        """Append a token, decide whether the sample ended, and compute the text to emit now."""
        seq.ids.append(token)
        reason = None
        if token == self.eos_id:
            reason = "stop"
        text = self.tokenizer.decode(seq.ids, skip_special_tokens=True)
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

    def _decode_loop(self, prompts, plist: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        seed = next((p.seed for p in plist if p.seed is not None), None)
        logits, cache, mask, positions, lengths = self._prefill(prompts, plist)
        dev = logits.device
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        rows = [_Seq(i, p, n) for i, (p, n) in enumerate(zip(plist, lengths))]
        generated = torch.zeros(len(rows), 0, dtype=torch.long, device=dev)
        while rows:
            logits = self._process(logits, generated, rows)
            tokens = self._choose(logits, rows, gen)
            events = [self._finish_check(s, t) for s, t in zip(rows, tokens.tolist())]
            yield events
            keep = [i for i, s in enumerate(rows) if s.done is None]
            if not keep:
                return
            if len(keep) < len(rows):  # finished samples leave the batch and the KV cache
                k = torch.tensor(keep, device=dev)
                cache.batch_select_indices(k)
                tokens, mask, positions, generated = tokens[k], mask[k], positions[k], generated[k]
                rows = [rows[i] for i in keep]
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = self._step(tokens, cache, mask, positions)
            positions = positions + 1

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
            logp = self._process(logits.log_softmax(dim=-1), seqs, rows)  # processors act on log-probs, as HF
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
                            bool(p0.stop) and any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in p0.stop))
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
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in p0.stop:
                text = text.split(stop)[0]
            out.append(Completion(ids, text, reason, lengths[r]))
        return out
