"""The kernel entry points the model layers call.

Each op runs the CUDA kernel when the tensors live on a CUDA device and
`pagedray.kernels.cuda_available()` (CuPy importable, a GPU present), and the
PyTorch reference otherwise (CPU, no CuPy, or a configuration the kernels do
not cover, e.g. float64 or a block size outside 8/16/32). Models never import
`reference` or the CUDA launchers directly.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from pagedray.kernels import cuda_available, reference
from pagedray.kernels.options import current as options

logger = logging.getLogger(__name__)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The switches (prefill backend, split mixed steps, skinny GEMM, fused rotary + cache) are
# `KernelOptions` fields: the engine config carries them to every worker (kernels/options.py).


def _cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _DTYPES and cuda_available()


def _cache_fits(query_or_key: torch.Tensor, cache: torch.Tensor) -> bool:
    """The CUDA cache and attention kernels read this cache: the model's dtype, or FP8 (e4m3,
    kv_cache_dtype="fp8") under 16-bit activations."""
    return cache.dtype == query_or_key.dtype or (cache.dtype == torch.float8_e4m3fn
                                                 and query_or_key.dtype in (torch.float16, torch.bfloat16))


@functools.cache
def triton_prefill():
    """The Triton prefill module, or None where Triton is not installed (warned once)."""
    try:
        from pagedray.kernels import prefill_triton
    except ImportError as exc:
        logger.warning("Triton is not installed (%s): prefill and mixed steps on the GPU run the slower "
                       "PyTorch reference attention; install it with `pip install triton` (the CUDA "
                       "builds of torch bring it along)", exc)
        return None
    return prefill_triton


def _prefill_launcher(key: torch.Tensor | None, value: torch.Tensor | None):
    """paged_prefill of the selected backend (KernelOptions.prefill_backend) as f(..., **kwargs), or None for
    the reference. The flash kernel also takes the step's K/V (its NEW_KV variant reads them)."""
    backend = options().prefill_backend
    if backend == "reference" or triton_prefill() is None:
        return None
    if backend == "triton_flash":
        from pagedray.kernels import prefill_flash

        def launch(query, *args, out=None, table_row0=0, **kwargs):
            rows = slice(table_row0, None)  # a mixed step's prompt rows follow its table_row0 decode rows
            return prefill_flash.paged_prefill(query, *args, out=out, table_row0=table_row0, **kwargs,
                                               variant_overrides=options().prefill_variant,
                                               key=None if key is None else key[rows],
                                               value=None if value is None else value[rows])
        return launch
    return triton_prefill().paged_prefill


_step_kv_answer: tuple[object, bool] = (None, False)   # (the options it was computed for, the answer)


def prefill_reads_step_kv(query: torch.Tensor) -> bool:
    """Whether prefill attention over this query reads the step's new K/V from the step's own tensors (the
    flash kernel's NEW_KV variant, on the GPU), so the attention layer should pass the rotated key (not only
    the cache). A CPU query runs the reference, which reads the cache, wherever CUDA exists.
    Asked by every layer of every prefill step: answered once per installed options."""
    global _step_kv_answer
    if not _cuda(query):
        return False
    opts = options()
    if _step_kv_answer[0] is not opts:
        reads = opts.prefill_backend == "triton_flash" and triton_prefill() is not None   # (_cuda: CUDA is there)
        if reads:
            from pagedray.kernels import prefill_flash
            reads = bool(prefill_flash.variant(opts.prefill_variant, 1 << 30)["NEW_KV"])
        _step_kv_answer = (opts, reads)
    return _step_kv_answer[1]


def _decode_kernel_fits(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the CUDA decode kernel covers these shapes and this layout."""
    from pagedray.kernels import attention_cuda
    head_size = query.shape[-1]
    return (query.dim() == 3 and key_cache.dim() == 4 and key_cache.shape[2] in attention_cuda.BLOCK_SIZES
            and head_size <= attention_cuda.MAX_HEAD_SIZE
            and head_size % (16 // query.element_size()) == 0 and query.stride(-1) == 1
            and query.data_ptr() % 16 == 0 and (query.stride(0) * query.element_size()) % 16 == 0)


def _leading_decodes(query_lens: list[int]) -> int:
    """How many sequences at the head of the batch have one query token (the scheduler puts the
    running decodes before new and continuing prefills)."""
    n = 0
    while n < len(query_lens) and query_lens[n] == 1:
        n += 1
    return n


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                    scale: float, sliding_window: int | None = None,
                    alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None, *,
                    seq_lens_tensor: torch.Tensor | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0, key: torch.Tensor | None = None,
                    value: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.paged_attention`; seq_lens_tensor is the same lengths on the device (int32),
    which the CUDA decode kernel reads (built from `seq_lens` when not given). An FP8 cache
    (k_scale, v_scale: its per-tensor scales) runs the reference. key/value: this step's new K/V
    ([T, Hkv, D], rotated, row t the token of query row t; see `prefill_reads_step_kv`), or None."""
    if _cuda(query) and _cache_fits(query, key_cache):
        if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
            alibi_slopes = alibi_slopes.float()
        if block_tables.dtype != torch.int32 or not block_tables.is_contiguous():
            block_tables = block_tables.to(torch.int32).contiguous()
        if seq_lens_tensor is not None and seq_lens_tensor.dtype != torch.int32:
            seq_lens_tensor = seq_lens_tensor.to(torch.int32)
        extras = (sliding_window, alibi_slopes, logits_soft_cap, k_scale, v_scale)
        num_decodes = _leading_decodes(query_lens) if _decode_kernel_fits(query, key_cache) else 0
        if num_decodes and seq_lens_tensor is None:
            seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=query.device)
        if num_decodes == len(query_lens) == query.shape[0]:
            return _decode(query, key_cache, value_cache, block_tables, seq_lens_tensor, seq_lens, scale,
                           extras)
        prefill = _prefill_launcher(key, value)
        if prefill is not None:
            if not num_decodes or not options().split_mixed_steps:
                return prefill(query, key_cache, value_cache, block_tables, seq_lens, query_lens, scale,
                               *extras[:3], k_scale=k_scale, v_scale=v_scale)
            # A mixed batch: the decode rows through the decode kernel (one CTA per KV head serves
            # its whole query group), the rest through the prefill kernel, into one output.
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
            n = num_decodes
            _decode(query[:n], key_cache, value_cache, block_tables[:n], seq_lens_tensor[:n], seq_lens[:n],
                    scale, extras, out=out[:n])
            prefill(query[n:], key_cache, value_cache, block_tables, seq_lens[n:], query_lens[n:], scale,
                    *extras[:3], out=out[n:], table_row0=n, k_scale=k_scale, v_scale=v_scale)
            return out
    return reference.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_lens,
                                     scale, sliding_window, alibi_slopes, logits_soft_cap, k_scale, v_scale)


def _decode(query, key_cache, value_cache, block_tables, seq_lens_tensor, seq_lens, scale, extras,
            out=None) -> torch.Tensor:
    from pagedray.kernels import attention_cuda
    sliding_window, alibi_slopes, logits_soft_cap, k_scale, v_scale = extras
    return attention_cuda.paged_attention_decode(
        query, key_cache, value_cache, block_tables, seq_lens_tensor, scale,
        max_seq_len=max(seq_lens, default=0), sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, out=out, k_scale=k_scale, v_scale=v_scale)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    if _cuda(key) and _cache_fits(key, key_cache):
        from pagedray.kernels import cache_ops, fp8_cuda
        if slot_mapping.dtype != torch.int64:
            slot_mapping = slot_mapping.long()
        if key_cache.dtype != key.dtype:
            return fp8_cuda.reshape_and_cache_fp8(key, value, key_cache, value_cache, slot_mapping.contiguous(),
                                                  k_scale, v_scale)
        return cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping.contiguous())
    return reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _cuda(x) and weight.dtype in (x.dtype, torch.float32):
        from pagedray.kernels import elementwise
        return elementwise.rms_norm(x, weight.contiguous(), eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); inputs are left unchanged."""
    if _cuda(x) and residual.dtype == x.dtype and weight.dtype in (x.dtype, torch.float32):
        from pagedray.kernels import elementwise
        return elementwise.fused_add_rms_norm(x, residual, weight.contiguous(), eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns new rotated (query, key), like the reference; the inputs are left unchanged."""
    if _cuda(query) and key.dtype == query.dtype and cos_sin_cache.dtype in (torch.float32, query.dtype):
        from pagedray.kernels import elementwise
        if positions.dtype != torch.int64:
            positions = positions.long()
        return elementwise.rotary_embedding(positions.contiguous(), query, key, cos_sin_cache.contiguous(),
                                            is_neox)
    return reference.rotary_embedding(positions, query, key, cos_sin_cache, is_neox)


def _fused_rotary_cache_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             cos_sin_cache: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the fused kernel takes these tensors (else the two ops run, with the same results)."""
    return (options().fused_rotary_cache and _cuda(query) and key.dtype == value.dtype == key_cache.dtype == query.dtype
            and cos_sin_cache.dtype in (torch.float32, query.dtype) and key_cache.dim() == 4
            and key_cache.numel() > 0)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """`rotary_embedding` of query [T, H, D] and key [T, Hkv, D], then `reshape_and_cache` of the
    rotated key and value. Returns the rotated query only: the rotated key lives in key_cache, where
    the attention that follows reads it. The inputs are left unchanged."""
    if _fused_rotary_cache_fits(query, key, value, cos_sin_cache, key_cache):
        from pagedray.kernels import elementwise
        if positions.dtype != torch.int64:
            positions = positions.long()
        if slot_mapping.dtype != torch.int64:
            slot_mapping = slot_mapping.long()
        return elementwise.rotary_embedding_and_cache(positions.contiguous(), query, key, value,
                                                      cos_sin_cache.contiguous(), is_neox, key_cache,
                                                      value_cache, slot_mapping.contiguous())
    query, key = rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    return query


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _cuda(x):
        from pagedray.kernels import elementwise
        return elementwise.silu_and_mul(x)
    return reference.silu_and_mul(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if _cuda(x):
        from pagedray.kernels import elementwise
        return elementwise.gelu_and_mul(x, approximate)
    return reference.gelu_and_mul(x, approximate)


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
    if kv_caches and kv_caches[0].is_cuda and cuda_available():  # byte copies: any cache dtype, FP8 too
        from pagedray.kernels import cache_ops
        return cache_ops.copy_blocks(kv_caches, src_to_dst)
    return reference.copy_blocks(kv_caches, src_to_dst)


def _skinny_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x as [M, K] rows the skinny GEMM takes, or None where F.linear must run."""
    from pagedray.kernels import gemv_cuda
    k = x.shape[-1] if x.dim() else 0
    # The token count first: prefill-sized inputs (eager steps) leave here before the weight checks.
    if not _cuda(x) or k == 0 or not 0 < x.numel() // k <= min(options().skinny_gemm_max_m, gemv_cuda.MAX_M):
        return None
    if (weight.dtype != x.dtype or weight.device != x.device or weight.dim() != 2
            or weight.shape[1] != k or not weight.is_contiguous() or weight.data_ptr() % 16
            or k % (16 // x.element_size())):
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device or not bias.is_contiguous()
                             or bias.shape != weight.shape[:1]):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None  # the kernel has no backward
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 and gemv_cuda.rows_aligned(x2) else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); with the skinny_gemm option, CUDA inputs of at most skinny_gemm_max_m
    tokens (x of any leading shape, flattened) run the skinny GEMM kernel. CPU inputs always F.linear."""
    if options().skinny_gemm:
        x2 = _skinny_rows(x, weight, bias)
        if x2 is not None:
            from pagedray.kernels import gemv_cuda
            return gemv_cuda.skinny_gemm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
