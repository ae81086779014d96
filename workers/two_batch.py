"""Two-batch overlap of a decode step (KernelOptions.two_batch_overlap_min_batch).

At large batches a decode step is GEMMs (compute-bound) and attention over the KV cache
(bandwidth-bound), one after the other. Run as two half batches on two streams, one half's
attention can run beside the other half's projections (NanoFlow's nano-batches).

Two forms, both captured into one CUDA graph by DecodeGraphs:
  plain      the second half's attention in layer i waits for the first half's; nothing else
             orders the halves.
  pipelined  the halves take turns in both kinds of work, a two-stage pipeline: A's attention i,
             then B's attention i beside A's projections after it, then A's attention i+1 beside
             B's projections, ... (attention i+1 of A after attention i of B; the projections
             after B's attention i after A's projections up to attention i+1, and vice versa).
             A captured wait must name an event already recorded in the capture, so each half
             is issued from its own host thread and the hooks hand over between them.
gemm_sm_target lets the GEMMs leave SMs to the other half's attention (cuBLAS's kernels otherwise
take every SM). Measurements: docs/perf-notes/history.md, benchmarks/two_batch_overlap.py.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from pagedray.models.layers.attention import Attention, AttentionMetadata


@contextlib.contextmanager
def gemm_sm_target(cublaslt: bool, carveout: int = 0):
    """GEMMs issued in the body go through cuBLASLt (when `cublaslt`) and target `carveout` fewer
    SMs than the device has (torch's experimental carveout; 0: all), so that a kernel on another
    stream finds SMs free beside them. Process-wide while the body runs; a graph keeps what it captured."""
    if not cublaslt:
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout or None)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(previous)


def two_batch_forward(model: torch.nn.Module, kv_caches: list[torch.Tensor], input_ids: torch.Tensor,
                      positions: torch.Tensor, first: AttentionMetadata, second: AttentionMetadata,
                      side: torch.cuda.Stream | None = None, pipelined: bool = False) -> torch.Tensor:
    """The model over two half batches (rows [0, s) with `first`, [s, T) with `second`), the second
    on a side stream; the hidden states of all rows, in order. On a CPU the halves simply run one
    after the other."""
    split = first.num_seqs
    if input_ids.device.type != "cuda":
        return torch.cat([model(input_ids[:split], positions[:split], kv_caches, first),
                          model(input_ids[split:], positions[split:], kv_caches, second)])
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    main = torch.cuda.current_stream()
    side = side or torch.cuda.Stream(device=input_ids.device)
    side.wait_stream(main)   # the fork: both halves start from the step's inputs
    halves = ((input_ids[:split], positions[:split], first), (input_ids[split:], positions[split:], second))
    run = _pipelined if pipelined else _plain
    out_first, out_second = run(lambda ids, pos, meta: model(ids, pos, kv_caches, meta), layers, halves, side)
    main.wait_stream(side)   # the join
    out_second.record_stream(main)   # (read below on the main stream; allocated on the side one)
    return torch.cat([out_first, out_second])


def _plain(forward, layers, halves, side):
    index = {id(m): i for i, m in enumerate(layers)}
    done = [torch.cuda.Event() for _ in layers]

    def record(module, args, output) -> None:
        done[index[id(module)]].record()

    def wait(module, args) -> None:
        torch.cuda.current_stream().wait_event(done[index[id(module)]])

    with _hooks(layers, post=record):
        out_first = forward(*halves[0])
    with _hooks(layers, pre=wait), torch.cuda.stream(side):
        out_second = forward(*halves[1])
    return out_first, out_second


class _Marks:
    """Named points of the two halves: a CUDA event recorded on the half's stream, and a flag
    telling the other host thread that it has been recorded (so its captured wait can name it)."""

    def __init__(self, keys: list[tuple]) -> None:
        self.events = {k: (torch.cuda.Event(), threading.Event()) for k in keys}
        self.failed = False

    def record(self, key: tuple) -> None:
        event, flag = self.events[key]
        event.record()
        flag.set()

    def wait(self, key: tuple) -> None:
        event, flag = self.events[key]
        while not flag.wait(1.0):
            if self.failed:
                raise RuntimeError("two-batch overlap: the other half batch failed")
        torch.cuda.current_stream().wait_event(event)


def _pipelined(forward, layers, halves, side):
    n = len(layers)
    index = {id(m): i for i, m in enumerate(layers)}
    # ("attn", h, i): half h's attention i is done; ("proj", h, i): half h's work before attention
    # i is (the projections after attention i-1; ("proj", 0, n): after the last layer).
    marks = _Marks([(kind, h, i) for kind in ("attn", "proj") for h in (0, 1) for i in range(n + 1)])
    local = threading.local()

    def before_attention(module, args) -> None:
        i, h = index[id(module)], local.half
        marks.record(("proj", h, i))
        if h == 1:
            marks.wait(("attn", 0, i))
        elif i:
            marks.wait(("attn", 1, i - 1))

    def after_attention(module, args, output) -> None:
        i, h = index[id(module)], local.half
        marks.record(("attn", h, i))
        if h == 1:
            marks.wait(("proj", 0, i + 1))
        elif i:
            marks.wait(("proj", 1, i))

    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def second_half() -> None:
        try:
            torch.cuda.set_device(side.device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), torch.cuda.stream(side):
                local.half = 1
                outputs[1] = forward(*halves[1])
        except BaseException as e:   # re-raised by the first half's thread
            errors.append(e)
            marks.failed = True

    with _hooks(layers, pre=before_attention, post=after_attention):
        thread = threading.Thread(target=second_half, name="two-batch-second-half")
        thread.start()
        try:
            local.half = 0
            outputs[0] = forward(*halves[0])
            marks.record(("proj", 0, n))
        except BaseException:
            marks.failed = True
            raise
        finally:
            thread.join()
    if errors:
        raise errors[0]
    return outputs[0], outputs[1]


@contextlib.contextmanager
def _hooks(layers: list[torch.nn.Module], pre=None, post=None):
    handles = ([m.register_forward_pre_hook(pre) for m in layers] if pre else []) + \
              ([m.register_forward_hook(post) for m in layers] if post else [])
    try:
        yield
    finally:
        for h in handles:
            h.remove()
