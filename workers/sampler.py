"""Batched sampling on the device: one pass over the step's logits.

Order (vLLM V1's): logprobs come from the raw logits (before any penalty or
temperature); then penalties, min_tokens masking, and, for random rows,
temperature, min-p, top-k, top-p and a draw. Greedy rows take the argmax.

Draws use the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) i.i.d. is
distributed as p. A row with a `seed` takes its E from a counter-based hash of
(seed, output position, token id), so its tokens depend on nothing else: not
on the rest of the batch, not on batch order, not on a preemption that
recomputes it, and not on the device (integer hashing is exact everywhere).
Unseeded rows share one generator seeded at start-up.

With the fused_sampling kernel option on (the default), a CUDA batch whose rows are all greedy or temperature-only (no logprobs,
penalties, active min_tokens, top-k, top-p or min-p) takes one pass over the logits instead
(kernels/sample.cu: the same race in the log domain, keyed by the generator for unseeded rows);
seeded rows still take the tokens of the passes above.

Nothing here waits for the device: the sampled ids stay on it (`DeviceSample`) until the caller
reads them, and small host lists travel from pinned memory without a stream sync, so the host can
go on to the next step while the GPU samples (overlapped steps).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from pagedray.kernels import cuda_available
from pagedray.kernels.options import current as kernel_options
from pagedray.kernels.reference import fmix32 as _fmix32
from pagedray.common.messages import Logprobs
from pagedray.common.sampling_params import SamplingParams

_MASK = float("-inf")
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """What the sampler needs of one request at this step.

    The runner keeps one row per request for its lifetime and appends to `output_token_ids`
    (the params never change once a request runs), so the flags below are computed once.
    """
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    has_penalty: bool = field(init=False)
    # True when the row's token is the plain argmax of its logits once min_tokens is reached:
    # greedy, no logprobs, no penalties.
    argmax_only: bool = field(init=False)
    # True when the one-pass race (`fused_sampler`) samples the row once min_tokens is reached: no
    # logprobs, no penalties, and greedy or temperature only (no top-k, top-p or min-p).
    race_only: bool = field(init=False)
    # The token ids that min_tokens forbids until then (stop ids, and eos unless ignored).
    min_tokens_banned: list[int] = field(init=False)
    # Outputs sampled by the previous step whose ids the host has not received (overlapped
    # steps): they count for positions and min_tokens; `pending_token_ids` holds their ids only
    # when penalties need them (the runner then waits for them).
    num_pending: int = 0
    pending_token_ids: list[int] = field(default_factory=list)
    # Constrained decoding: the request's grammar matcher (workers/structured_output.py), built
    # at its first constrained step from the outputs so far.
    grammar: object = field(default=None, repr=False)
    # Whether the row has a grammar or a logit bias (the sampler's hook then runs for the step).
    constrained: bool = field(init=False)
    # Whether min_tokens bans some tokens at some step (`masks_min_tokens` says whether at this one).
    has_min_tokens: bool = field(init=False)
    # A random draw keyed by the row's seed (the race samples such a row as greedy, then _general).
    seeded_draw: bool = field(init=False)
    # The row's temperature in the one-pass race (0: greedy, or seeded: drawn afterwards).
    race_temperature: float = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.has_penalty = (p.repetition_penalty != 1.0 or bool(p.frequency_penalty)
                            or bool(p.presence_penalty))
        self.argmax_only = p.greedy and p.logprobs is None and not self.has_penalty
        self.race_only = p.logprobs is None and not self.has_penalty and (
            p.greedy or (p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0))
        banned = list(p.stop_token_ids)
        if p.eos_token_id is not None and not p.ignore_eos:
            banned.append(p.eos_token_id)
        self.min_tokens_banned = banned
        self.constrained = p.constrains_logits
        self.has_min_tokens = bool(banned) and p.min_tokens > 0
        self.seeded_draw = p.seed is not None and not p.greedy
        self.race_temperature = 0.0 if p.greedy or p.seed is not None else p.temperature

    @property
    def num_outputs(self) -> int:
        """Outputs before this step's token (its position among the outputs)."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def masks_min_tokens(self) -> bool:
        """Whether min_tokens still bans some tokens at this step."""
        return bool(self.min_tokens_banned) and self.num_outputs < self.params.min_tokens

    def outputs_for_penalties(self) -> list[int]:
        return self.output_token_ids + self.pending_token_ids if self.pending_token_ids else self.output_token_ids


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


@dataclass
class DeviceSample:
    """One step's draws, still on the device; `to_host` waits for them."""
    token_ids: torch.Tensor                  # [rows] int64
    raw_logprobs: torch.Tensor | None        # [rows, vocab] when some row asked for logprobs
    want_logprobs: list[int | None]

    def logprobs(self) -> list[Logprobs | None]:
        if self.raw_logprobs is None:
            return [None] * len(self.want_logprobs)
        return logprob_entries(self.raw_logprobs, self.token_ids, self.want_logprobs)

    def to_host(self) -> SamplerOutput:
        return SamplerOutput(self.token_ids.tolist(), self.logprobs())


# Row fields read with map() over a step's rows: the loop runs in C (a decode step at batch ~1000 is
# bound by the host's per-row work).
_WANT_LOGPROBS = attrgetter("params.logprobs")
_CONSTRAINED = attrgetter("constrained")
_ARGMAX_ONLY = attrgetter("argmax_only")
_RACE_ONLY = attrgetter("race_only")
_HAS_MIN_TOKENS = attrgetter("has_min_tokens")
_SEEDED_DRAW = attrgetter("seeded_draw")
_RACE_TEMPERATURE = attrgetter("race_temperature")


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without synchronising the stream (a plain
    `torch.tensor(..., device=cuda)` waits for every queued kernel)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# One-pass sampling on CUDA (kernels/sample.cu) for batches of greedy and temperature-only rows: the
# fused_sampling option, on since measured on the H200 (benchmarks/sampling.py). Off, unseeded rows
# draw other (equally distributed) tokens; greedy and seeded rows draw the same tokens either way.
# race(logits [R, V], temperatures [R] float32 (<= 0: greedy), keys [R, 2] int64) -> token ids [R]
RaceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused_sampler(logits: torch.Tensor) -> RaceFn | None:
    """The one-pass race for these logits (kernels/sample_cuda.race_sample), or None where it is off
    or cannot run: not CUDA, no CuPy, a dtype or layout the kernel does not take."""
    if not (kernel_options().fused_sampling and logits.is_cuda and logits.dim() == 2 and logits.shape[-1] > 0
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (logits.shape[-1] == 1 or logits.stride(-1) == 1) and cuda_available()):
        return None
    from pagedray.kernels.sample_cuda import MAX_ROWS, race_sample
    return race_sample if logits.shape[0] <= MAX_ROWS else None


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # The last per-row temperatures of the fused path on the device: batches keep them for many steps.
        self._temps: tuple[tuple, torch.Tensor] | None = None
        self._greedy: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # Grammar masks and logit biases (workers/structured_output.LogitsConstraints), applied to a
        # step's logits before anything else reads them; set by the Worker.
        self.constraints: Callable[[torch.Tensor, list[SamplingRow]], torch.Tensor] | None = None

    def _global_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, rows).to_host()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> DeviceSample:
        want_logprobs = list(map(_WANT_LOGPROBS, rows))
        if self.constraints is not None and any(map(_CONSTRAINED, rows)):
            # A mask sets -inf, which the penalties below keep: masking first equals masking after them.
            logits = self.constraints(logits, rows)
        masking = any(map(_HAS_MIN_TOKENS, rows)) and any(r.masks_min_tokens for r in rows)
        if not masking and all(map(_ARGMAX_ONLY, rows)):
            # The common greedy batch: one vocab-wide pass, the race kernel's greedy scan where it
            # runs (torch.argmax's single-block reduction is the slower pass on CUDA).
            # (argmax of bf16/fp16 logits equals that of their exact float32 conversion.)
            race = fused_sampler(logits)
            if race is not None:
                return DeviceSample(race(logits, *self._greedy_args(len(rows), logits.device)), None,
                                    want_logprobs)
            return DeviceSample(logits.argmax(dim=-1), None, want_logprobs)
        race = fused_sampler(logits) if not masking and all(map(_RACE_ONLY, rows)) else None
        if race is not None:
            return DeviceSample(self._race(race, logits, rows), None, want_logprobs)
        return DeviceSample(*self._general(logits, rows), want_logprobs)

    def _general(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids and (when some row wants logprobs) the raw log-softmax, by vocab-wide passes."""
        want_logprobs = [r.params.logprobs for r in rows]
        logits = logits.float()
        raw_logprobs = None
        if any(w is not None for w in want_logprobs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(r.has_penalty or r.masks_min_tokens for r in rows):
            # Penalties and masks write in place: never into the caller's (or the log-softmax's) logits.
            logits = mask_min_tokens(apply_penalties(logits.clone(), rows), rows)
        greedy = [r.params.greedy for r in rows]
        token_ids = logits.argmax(dim=-1) if any(greedy) else None
        if not all(greedy):
            probs = filtered_probs(logits, rows)
            drawn = (probs / self._noise(probs, rows)).argmax(dim=-1)
            token_ids = drawn if token_ids is None else torch.where(
                to_device(greedy, torch.bool, logits.device), token_ids, drawn)
        return token_ids, raw_logprobs

    def _race(self, race: RaceFn, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Greedy and temperature-only rows in one pass (`race`: sample_cuda or reference race_sample).

        Unseeded rows race with keys from the sampler's generator, drawn on the device. Seeded rows keep
        the tokens of `_general` (which the CPU computes too): it samples just those rows afterwards (the
        race treats them as greedy meanwhile, the cheaper scan); their tokens depend on nothing else.
        """
        dev = logits.device
        seeded = [i for i, r in enumerate(rows) if r.seeded_draw] if any(map(_SEEDED_DRAW, rows)) else []
        if len(seeded) == len(rows):
            return self._general(logits, rows)[0]
        temps = list(map(_RACE_TEMPERATURE, rows))
        keys = torch.randint(0, 1 << 32, (len(rows), 2), generator=self._global_generator(dev), device=dev)
        tokens = race(logits, self._device_temps(temps, dev), keys)
        if seeded:
            index = to_device(seeded, torch.int64, dev)
            tokens[index] = self._general(logits[index], [rows[i] for i in seeded])[0]
        return tokens

    def _greedy_args(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperatures 0 (greedy: the race reads no key) and keys for `rows` rows, kept per size."""
        key = (device, rows)
        if key not in self._greedy:
            self._greedy[key] = (torch.zeros(rows, dtype=torch.float32, device=device),
                                 torch.zeros(rows, 2, dtype=torch.int64, device=device))
        return self._greedy[key]

    def _device_temps(self, temps: list[float], device: torch.device) -> torch.Tensor:
        """`temps` on the device, reusing the last step's tensor when they are the same (it is only read)."""
        key = (device, tuple(temps))
        if self._temps is None or self._temps[0] != key:
            self._temps = (key, to_device(temps, torch.float32, device))
        return self._temps[1]

    def _noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exp(1) noise per (row, token): seeded rows from the hash, the others from the generator."""
        noise = torch.empty_like(probs).exponential_(generator=self._global_generator(probs.device))
        seeded = [i for i, r in enumerate(rows) if r.params.seed is not None and not r.params.greedy]
        if seeded:
            keys = [_row_keys(rows[i].params.seed, rows[i].num_outputs) for i in seeded]
            uniform = seeded_uniform(to_device(keys, torch.int64, probs.device), probs.shape[-1])
            index = to_device(seeded, torch.int64, probs.device)
            noise[index] = (-torch.log(uniform)).to(noise.dtype)
        # exponential_ may return exactly 0, and p / 0 would win even where p == 0.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


# -- counter-based random numbers ------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _row_keys(seed: int, position: int) -> list[int]:
    """Four 32-bit keys for one (seed, output position): two hash rounds for each of two words."""
    state = _splitmix64(_splitmix64(seed & _M64) ^ position)
    return [_splitmix64(state + i) & _M32 for i in range(4)]


def seeded_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), float64 with 53 random bits, for keys [R, 4] (int64) and tokens 0..vocab-1."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    k = keys[:, :, None]
    high = _fmix32(_fmix32(tokens ^ k[:, 0]) ^ k[:, 1])
    low = _fmix32(_fmix32(tokens ^ k[:, 2]) ^ k[:, 3]) >> 11
    return ((high << 21) + low).double().add_(0.5).mul_(2.0 ** -53)


# -- logits processing -----------------------------------------------------------------------------
def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return to_device([x + [pad] * (width - len(x)) for x in lists], torch.long, device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM's definitions, in place: repetition divides positive and multiplies negative logits
    of tokens seen in the prompt or the output; frequency subtracts penalty * count and presence
    subtracts penalty once, for tokens of the output only."""
    rep = [r.params.repetition_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    has_rep = any(p != 1.0 for p in rep)
    if not has_rep and not any(freq) and not any(pres):
        return logits
    batch, vocab = logits.shape
    dev = logits.device
    # Column `vocab` of the scratch tensors absorbs the padding and is dropped.
    outputs = _padded([r.outputs_for_penalties() for r in rows], vocab, dev)
    counts = torch.zeros(batch, vocab + 1, device=dev).scatter_add_(
        1, outputs, torch.ones_like(outputs, dtype=torch.float32))[:, :vocab]
    if has_rep:
        prompts = _padded([r.prompt_token_ids for r in rows], vocab, dev)
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, prompts, True)
        seen = seen[:, :vocab] | (counts > 0)
        penalty = torch.where(seen, to_device(rep, torch.float32, dev)[:, None], 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits -= to_device(freq, torch.float32, dev)[:, None] * counts
    logits -= to_device(pres, torch.float32, dev)[:, None] * (counts > 0).float()
    return logits


def mask_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Until a row has min_tokens outputs, its eos and stop token ids cannot be sampled."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if not row.masks_min_tokens:
            continue
        banned = [t for t in row.min_tokens_banned if t < logits.shape[-1]]
        row_idx += [i] * len(banned)
        tok_idx += banned
    if row_idx:
        logits[to_device(row_idx, torch.long, logits.device), to_device(tok_idx, torch.long, logits.device)] = _MASK
    return logits


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p (vLLM V1's order), as probabilities per row.

    Greedy rows get temperature 1 here; their draw is discarded.
    """
    dev = logits.device
    temps = to_device([1.0 if r.params.greedy else r.params.temperature for r in rows], torch.float32, dev)
    logits = logits / temps[:, None]
    min_p = [r.params.min_p for r in rows]
    if any(m > 0 for m in min_p):
        probs = torch.softmax(logits, dim=-1)
        # Keep tokens at least min_p times as likely as the most likely one.
        threshold = probs.max(dim=-1, keepdim=True).values * to_device(min_p, torch.float32, dev)[:, None]
        logits = logits.masked_fill(probs < threshold, _MASK)
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = to_device([kk if kk > 0 else vocab for kk in top_k], torch.long, dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], _MASK)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before
    # it already reaches p (so the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    p = to_device(top_p, torch.float32, dev)
    sorted_logits = sorted_logits.masked_fill(mass_before >= p[:, None], _MASK)
    return torch.full_like(logits, _MASK).scatter(-1, order, sorted_logits)


# -- logprobs --------------------------------------------------------------------------------------
def logprob_entries(logprobs: torch.Tensor, chosen_ids: torch.Tensor,
                    nums: list[int | None]) -> list[Logprobs | None]:
    """Per row: [(chosen id, logprob, rank), then the top-N as (id, logprob, rank)], or None.

    `logprobs` [R, V] are log-softmaxed; rank is 1 + the number of tokens strictly more likely.
    """
    if all(n is None for n in nums):
        return [None] * len(nums)
    vocab = logprobs.shape[-1]
    chosen = logprobs.gather(-1, chosen_ids[:, None]).squeeze(-1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    max_n = min(vocab, max(n or 0 for n in nums))
    top_vals, top_ids = logprobs.topk(max_n, dim=-1) if max_n else (None, None)
    chosen_l, ranks_l, ids_l = chosen.tolist(), ranks.tolist(), chosen_ids.tolist()
    top_vals_l = top_vals.tolist() if max_n else None
    top_ids_l = top_ids.tolist() if max_n else None
    out: list[Logprobs | None] = []
    for i, n in enumerate(nums):
        if n is None:
            out.append(None)
            continue
        entry = [(ids_l[i], chosen_l[i], ranks_l[i])]
        n = min(n, vocab)
        if n:
            entry += [(t, v, r + 1) for r, (t, v) in enumerate(zip(top_ids_l[i][:n], top_vals_l[i][:n]))]
        out.append(entry)
    return out
