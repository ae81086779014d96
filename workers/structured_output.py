"""Constrained decoding with xgrammar: compiled grammars, per-request matchers, the step's token mask.

xgrammar is what vLLM and SGLang use by default. A grammar is compiled once per (kind, source) for
one tokenizer (`GrammarBackend`, shared by every engine in the process) on a small thread pool, so
neither the server's event loop nor the engine's step waits for it; the engine core holds a request
out of the scheduler until its grammar has compiled (cluster/core/grammar_gate.py).

Each step, `constrain_logits` (the sampler's hook) advances each constrained row's matcher by the
tokens it produced since the last step (the previous step's token may still be in flight under
overlapped steps: the runner fetches it for these rows, as for penalties), fills one host bitmask
for all constrained rows (xgrammar's batched fill), sends it to the device in one transfer and
masks the logits there; `logit_bias` is added in the same pass. The matcher lives on the request's
`SamplingRow`, so a request the workers drop (preempted, migrated, finished) loses it, and when it
comes back its matcher is rebuilt from the outputs it carries. A speculative verification masks each
of its k + 1 positions (`LogitsConstraints.speculative`: accept the proposals one by one, fill a mask
before each, roll them back).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from dataclasses import dataclass

import torch

from pagedray.common.sampling_params import StructuredOutputsParams
from pagedray.workers.sampler import to_device

logger = logging.getLogger(__name__)

_BACKENDS: dict[tuple, "GrammarBackend"] = {}
_BACKENDS_LOCK = threading.Lock()


def backend_for(tokenizer_path: str, vocab_size: int, compile_threads: int = 2) -> "GrammarBackend":
    """The process's backend for this tokenizer and vocabulary (an engine core and its local worker
    share it, so a grammar the core compiled is not compiled again by the worker)."""
    key = (tokenizer_path, vocab_size)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = GrammarBackend(tokenizer_path, vocab_size, compile_threads)
        return backend


def _choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly `choices` (JSON string escapes are xgrammar's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarBackend:
    """One tokenizer's xgrammar compiler, compiled grammars cached by (kind, source), compile threads."""

    def __init__(self, tokenizer_path: str, vocab_size: int, compile_threads: int = 2) -> None:
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size
        self._compiler = None
        self._init_lock = threading.Lock()
        self._cache: dict[tuple[str, str], concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar")

    def _get_compiler(self):
        with self._init_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compiled grammar of `spec` (a Future; cached by its kind and source text). A bad
        schema, regex or grammar fails the Future with a ValueError naming the field."""
        key = (spec.kind, spec.source)
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None
                                  and not isinstance(future.exception(), ValueError)):
                future = self._cache[key] = self._pool.submit(self._compile, *key)
            return future

    def compiled(self, spec: StructuredOutputsParams):
        """Blocking: the compiled grammar (a worker whose core did not compile it, e.g. over Ray)."""
        return self.submit(spec).result()

    def _compile(self, kind: str, source: str):
        compiler = self._get_compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(source, any_whitespace=False)
            if kind == "json_object":   # OpenAI's json_object: an object (xgrammar's builtin also takes arrays)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(source)
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(json.loads(source)))
            return compiler.compile_grammar(source)
        except (RuntimeError, ValueError, TypeError) as exc:   # xgrammar reports syntax errors so
            raise ValueError(f"structured_outputs.{kind}: cannot compile it: {_first_line(exc)}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its "[time] file.cc:line: " prefix, on one line."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)[:500]


@dataclass
class GrammarState:
    """One request's matcher and how many of its outputs it has accepted."""
    matcher: object
    accepted: int = 0
    failed: bool = False   # a token the grammar refused was produced (logged once; mask off)


def _state(row, backend: GrammarBackend) -> GrammarState:
    if row.grammar is None:
        import xgrammar as xgr
        params = row.params
        # The grammar may end with the request's own eos/stop ids (the engine stops on them).
        stops = [] if params.ignore_eos or params.eos_token_id is None else [params.eos_token_id]
        stops += [t for t in params.stop_token_ids if t not in stops]
        row.grammar = GrammarState(xgr.GrammarMatcher(backend.compiled(params.structured_outputs),
                                                      override_stop_tokens=stops or None))
    return row.grammar


def _advance(state: GrammarState, tokens: list[int]) -> None:
    """Accept the outputs the matcher has not seen (all of them for a rebuilt one)."""
    while state.accepted < len(tokens) and not state.failed:
        token = tokens[state.accepted]
        state.accepted += 1
        if state.matcher.is_terminated():
            continue   # tokens after the end (an overlapped step's extra token): dropped by the engine
        if not state.matcher.accept_token(token):
            state.failed = True
            logger.error("structured outputs: token %d was refused by the grammar; the request goes on "
                         "unconstrained", token)


def _fill_chain(state: GrammarState, outputs: list[int], drafts: list[int], bitmask: torch.Tensor,
                start: int, row0: int) -> list[int]:
    """Fill bitmask rows start, start + 1, ... for the positions of one request's verification (its
    next token, then after each proposal the grammar accepts); the logits rows they mask."""
    _advance(state, outputs)
    if state.failed:
        return []
    matcher, rows, accepted = state.matcher, [], 0
    for j in range(len(drafts) + 1):
        if matcher.is_terminated():
            break
        row = start + len(rows)
        matcher.fill_next_token_bitmask(bitmask, row)
        rows.append(row0 + j)
        if j == len(drafts) or not _allowed(bitmask, row, drafts[j]) or not matcher.accept_token(drafts[j]):
            break   # (the mask is asked first: xgrammar logs a warning for each special token it refuses)
        accepted += 1
    if accepted:
        matcher.rollback(accepted)
    return rows


def _allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    """Whether the filled mask row allows `token` (xgrammar's layout; ids past it are not allowed)."""
    word = token >> 5
    return 0 <= word < bitmask.shape[1] and bool((int(bitmask[row, word]) >> (token & 31)) & 1)


class LogitsConstraints:
    """The sampler's hook: grammar masks and logit biases of one step, applied on the device."""

    def __init__(self, backend: GrammarBackend | None) -> None:
        self.backend = backend
        self._batch = None   # xgrammar's BatchGrammarMatcher, made at the first batch of several

    def __call__(self, logits: torch.Tensor, rows: list) -> torch.Tensor:
        grammar_rows = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
        if grammar_rows:
            if self.backend is None:
                raise ValueError("structured_outputs: this engine has no tokenizer to compile grammars with")
            self._mask(logits, rows, grammar_rows)
        bias_rows = [i for i, r in enumerate(rows) if r.params.logit_bias]
        if bias_rows:
            _add_bias(logits, rows, bias_rows)
        return logits

    def _mask(self, logits: torch.Tensor, rows: list, indices: list[int]) -> None:
        import xgrammar as xgr
        vocab = logits.shape[-1]
        words = (vocab + 31) // 32
        states, masked = [], []
        for i in indices:
            state = _state(rows[i], self.backend)
            _advance(state, rows[i].outputs_for_penalties())
            if not state.failed and not state.matcher.is_terminated():
                states.append(state.matcher)
                masked.append(i)
        if not masked:
            return
        bitmask = self._buffer(len(masked), words, logits.device.type == "cuda")
        if len(states) == 1:
            states[0].fill_next_token_bitmask(bitmask, 0)
        else:   # xgrammar's threads fill the rows in parallel
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask(states, bitmask)
        apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True), masked)

    def speculative(self, logits: torch.Tensor, rows: list, groups: list) -> torch.Tensor:
        """A verification's masks (workers/spec_decode/rejection.py): `rows` has one row per logits
        row, `groups` (req_id, first logits row, proposals) per request. Row j of a request is masked
        by its grammar after its outputs and its first j proposals: the matcher accepts the
        proposals one by one, filling a mask before each, then rolls them back (the tokens the step
        keeps reach it next step as outputs). A proposal the grammar refuses has logit -inf, so it
        is rejected and the rows after it are never read: they stay unmasked, as are rows after
        the grammar has ended (the engine drops tokens after the stop). Logit biases apply to every row."""
        grammar_groups = [(rows[row0], row0, drafts) for _, row0, drafts in groups
                          if rows[row0].params.structured_outputs is not None]
        if grammar_groups:
            if self.backend is None:
                raise ValueError("structured_outputs: this engine has no tokenizer to compile grammars with")
            words = (logits.shape[-1] + 31) // 32
            bitmask = self._buffer(sum(len(d) + 1 for _, _, d in grammar_groups), words, logits.is_cuda)
            masked: list[int] = []
            for row, row0, drafts in grammar_groups:
                masked += _fill_chain(_state(row, self.backend), row.outputs_for_penalties(), drafts,
                                      bitmask, len(masked), row0)
            if masked:
                apply_token_bitmask(logits, bitmask[:len(masked)].to(logits.device, non_blocking=True), masked)
        bias_rows = [i for i, r in enumerate(rows) if r.params.logit_bias]
        if bias_rows:
            _add_bias(logits, rows, bias_rows)
        return logits

    @staticmethod
    def _buffer(rows: int, words: int, pinned: bool) -> torch.Tensor:
        # Fresh each step: PyTorch's pinned-memory cache does not hand a block out again before
        # the copy that reads it is done, so the previous step's transfer is never overwritten.
        return torch.full((rows, words), -1, dtype=torch.int32, pin_memory=pinned)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int]) -> None:
    """In place: logits[indices[k], t] = -inf where bit t of bitmask[k] is 0 (xgrammar's layout:
    int32 words, token t at bit t % 32 of word t // 32). Plain torch ops: no JIT at run time."""
    vocab = logits.shape[-1]
    device = logits.device
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]
    if len(indices) == logits.shape[0] and indices == list(range(len(indices))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = to_device(indices, torch.long, device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))


def _add_bias(logits: torch.Tensor, rows: list, indices: list[int]) -> None:
    row_idx, tok_idx, values = [], [], []
    vocab = logits.shape[-1]
    for i in indices:
        for token, bias in rows[i].params.logit_bias.items():
            if token < vocab:
                row_idx.append(i)
                tok_idx.append(token)
                values.append(bias)
    dev = logits.device
    r, t = to_device(row_idx, torch.long, dev), to_device(tok_idx, torch.long, dev)
    v = to_device(values, torch.float32, dev).to(logits.dtype)
    logits.index_put_((r, t), v, accumulate=True)
