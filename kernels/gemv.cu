// Skinny GEMM for decode: y[TOKENS, n] = x[TOKENS, k] · W[n, k]^T (+ bias[n]), TOKENS <= 8.
//
// At a handful of tokens the product is bound by reading W once from HBM, so the
// design is about keeping enough bytes in flight and nothing else in the way:
// - Each warp owns ROWS consecutive output rows and walks the whole k range for all
//   of them: no split-k, so no partial sums in memory and no second (reduce) kernel.
// - Lanes read W with 16-byte loads, 32 consecutive chunks per row per step (one
//   fully coalesced 512-byte segment), UNROLL steps at a time: each lane issues
//   ROWS * UNROLL independent 16-byte loads before it uses any of them.
// - x is read through the read-only (L1) path, not staged in shared memory: every
//   warp of every CTA on an SM reads the same few KB of x, which L1 serves after the
//   first touch; staging would copy x from L2 once per CTA (as many bytes as W itself
//   for the small projections), add a block-wide barrier before the first W byte is
//   used, and not fit at all for k = 14336 with 8 tokens.
// - LOAD picks the cache hint of the W loads (read once, so they should not evict x
//   from L1): 0 __ldg (read-only path), 1 __ldcs (evict-first), 2 __ldcg (L2 only).
// - fp32 accumulation; a warp-shuffle sum per output at the end; one store per output.
// - __launch_bounds__(.., 1): with no minimum of resident CTAs ptxas is free with registers;
//   under its default register target it sank most W loads down to their first use, leaving a
//   few in flight per lane (seen in the SASS), which is the opposite of what this kernel needs.
// Requires k % VEC == 0 (16-byte rows), 16-byte aligned W and x rows; n is arbitrary
// (tail rows of the last warp re-read row n-1 and skip the store).
#include "common.cuh"

#ifndef TOKENS
#define TOKENS 1
#endif
#ifndef ROWS
#define ROWS 2
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef LOAD
#define LOAD 0
#endif

constexpr int VEC = Vec16<scalar_t>::N;   // elements per 16-byte chunk
constexpr int STEP = 32 * UNROLL;         // chunks of one row a warp reads per loop step

__device__ __forceinline__ uint4 load_w(const uint4* p) {
#if LOAD == 1
  return __ldcs(p);
#elif LOAD == 2
  return __ldcg(p);
#else
  return __ldg(p);
#endif
}

// One loop step: chunks c0 + u*32 + lane (u < UNROLL) of every row. GUARD: the last,
// partial step, where chunks past the row end are neither loaded nor used.
template <bool GUARD>
__device__ __forceinline__ void step(float (&acc)[ROWS][TOKENS], const uint4* const (&wrow)[ROWS],
                                     const uint4* const (&xrow)[TOKENS], int c0, int chunks, int lane) {
  uint4 wv[UNROLL][ROWS];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * 32 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      wv[u][r] = (!GUARD || c < chunks) ? load_w(wrow[r] + c) : uint4{0u, 0u, 0u, 0u};
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * 32 + lane;
    if (GUARD && c >= chunks) continue;
    float wf[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) unpack16<scalar_t>(wv[u][r], wf[r]);
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      float xf[VEC];
      unpack16<scalar_t>(__ldg(xrow[t] + c), xf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r][t] = fmaf(wf[r][v], xf[v], acc[r][t]);
    }
  }
}

// out: dense [TOKENS, n]; x: [TOKENS, k] rows x_stride elements apart; w: dense [n, k];
// bias: [n] or null. Grid: ceil(ceil(n / ROWS) / WARPS) CTAs of WARPS warps.
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) skinny_gemm(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ bias, i64 x_stride, int n, int k) {
  const int lane = threadIdx.x & 31;
  const i64 row0 = ((i64)blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= n) return;  // a whole warp at once; there is no block-wide barrier below
  const int chunks = k / VEC;
  const uint4* wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const i64 row = row0 + r < n ? row0 + r : (i64)n - 1;  // tail rows: valid memory, result unused
    wrow[r] = reinterpret_cast<const uint4*>(w + row * k);
  }
  const uint4* xrow[TOKENS];
#pragma unroll
  for (int t = 0; t < TOKENS; ++t) xrow[t] = reinterpret_cast<const uint4*>(x + t * x_stride);

  float acc[ROWS][TOKENS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[r][t] = 0.f;

  const int full = chunks - chunks % STEP;
  for (int c0 = 0; c0 < full; c0 += STEP) step<false>(acc, wrow, xrow, c0, chunks, lane);
  if (full < chunks) step<true>(acc, wrow, xrow, full, chunks, lane);

  // Every lane ends up with every sum; lane (r * TOKENS + t) % 32 stores output (r, t).
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const i64 row = row0 + r;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      const float s = warp_sum(acc[r][t]);
      if (lane == ((r * TOKENS + t) & 31) && row < n)
        out[t * (i64)n + row] = from_float<scalar_t>(bias ? s + to_float(bias[row]) : s);
    }
  }
}
