// L2 prefetch of a box of a row-major tensor: bytes [0, width) of rows [0, rows), rows `pitch`
// bytes apart. A hint only: nothing is written, no thread waits for the data, and the kernel
// ends once its requests are issued. Used inside decode graphs on a branch beside the small
// kernels between two projections, so the next projection's first weight lines are in L2
// when it starts (workers/weight_prefetch.py).
//
// MODE 0: cp.async.bulk.prefetch.L2 (sm_90 and later), one request per CHUNK bytes of a row.
// MODE 1: prefetch.global.L2::evict_last, one request per 128-byte line (sm_80 and later).
#include "common.cuh"

#ifndef MODE
#define MODE 0
#endif
#define CHUNK 16384

// Grid-stride over (row, chunk) pairs; width, pitch and the base address are multiples of 16.
extern "C" __global__ void prefetch_l2(const char* __restrict__ base, i64 rows, i64 pitch, i64 width) {
  const i64 chunks_per_row = (width + CHUNK - 1) / CHUNK;
  const i64 total = rows * chunks_per_row;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 row = i / chunks_per_row, off = (i % chunks_per_row) * CHUNK;
    const i64 left = width - off;
    const unsigned n = (unsigned)(left < CHUNK ? left : CHUNK);
    const char* p = base + row * pitch + off;
#if MODE == 0 && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");
#else
    for (unsigned b = 0; b < n; b += 128) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p + b));
#endif
  }
}
