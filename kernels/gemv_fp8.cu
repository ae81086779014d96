// FP8-weight skinny GEMM for decode: y[TOKENS, n] = x[TOKENS, k] · dequant(Wq[n, k])^T (+ bias[n]).
//
// Wq is float8 e4m3 with float32 scales, per output row (SCALE_COLS 1) or per (row, k-block)
// (SCALE_COLS = ceil(k / BLOCK_K), the block-wise format with its rows expanded). x stays 16-bit:
// weight-only dequantization, so the product is bound by reading Wq (half bf16's bytes) once.
// Same memory plan as gemv.cu: a warp owns ROWS consecutive rows and walks all of k; each lane
// issues ROWS * UNROLL independent 16-byte Wq loads (16 weights each) before using any; x comes
// through the read-only path (L1 serves every warp after the first touch).
// Dequantization: e4m3 pairs -> half2 with one cvt (sm_89+), then float FMAs; the row (or
// block) scale multiplies the partial sum once, never per weight.
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
#ifndef BLOCK_K
#define BLOCK_K 0   // 0: one scale per row; else the k-block size of the scales (a multiple of 16)
#endif

constexpr int WVEC = 16;                 // e4m3 weights per 16-byte chunk
constexpr int STEP = 32 * UNROLL;        // chunks of one row a warp reads per loop step
constexpr int XVEC = Vec16<scalar_t>::N; // x elements per 16-byte load

__device__ __forceinline__ float2 e4m3x2_to_float2(unsigned short v) {
  unsigned int h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(v));
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

// Dot product of 16 weights (one chunk) with 16 x values.
__device__ __forceinline__ float dot16(const uint4& w, const float (&xf)[WVEC]) {
  const unsigned short* p = reinterpret_cast<const unsigned short*>(&w);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = e4m3x2_to_float2(p[i]);
    s = fmaf(f.x, xf[2 * i], s);
    s = fmaf(f.y, xf[2 * i + 1], s);
  }
  return s;
}

template <bool GUARD>
__device__ __forceinline__ void step(float (&acc)[ROWS][TOKENS], const uint4* const (&wrow)[ROWS],
                                     const float* const (&srow)[ROWS], const uint4* const (&xrow)[TOKENS],
                                     int c0, int chunks, int lane) {
  uint4 wv[UNROLL][ROWS];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * 32 + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      wv[u][r] = (!GUARD || c < chunks) ? __ldcs(wrow[r] + c) : uint4{0u, 0u, 0u, 0u};
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = c0 + u * 32 + lane;
    if (GUARD && c >= chunks) continue;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      float xf[WVEC];
#pragma unroll
      for (int h = 0; h < WVEC / XVEC; ++h) unpack16<scalar_t>(__ldg(xrow[t] + c * (WVEC / XVEC) + h), xf + h * XVEC);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float d = dot16(wv[u][r], xf);
#if BLOCK_K
        acc[r][t] = fmaf(__ldg(srow[r] + (c * WVEC) / BLOCK_K), d, acc[r][t]);
#else
        acc[r][t] += d;
#endif
      }
    }
  }
}

// out: dense [TOKENS, n]; x: dense [TOKENS, k]; w: dense [n, k] e4m3; scale: [n, scale_cols] float32;
// bias: [n] or null. Grid: ceil(ceil(n / ROWS) / WARPS) CTAs of WARPS warps.
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) skinny_gemm_fp8(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const unsigned char* __restrict__ w,
    const float* __restrict__ scale, const scalar_t* __restrict__ bias, int n, int k, int scale_cols) {
  const int lane = threadIdx.x & 31;
  const i64 row0 = ((i64)blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= n) return;
  const int chunks = k / WVEC;
  const uint4* wrow[ROWS];
  const float* srow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const i64 row = row0 + r < n ? row0 + r : (i64)n - 1;  // tail rows: valid memory, result unused
    wrow[r] = reinterpret_cast<const uint4*>(w + row * k);
    srow[r] = scale + row * scale_cols;
  }
  const uint4* xrow[TOKENS];
#pragma unroll
  for (int t = 0; t < TOKENS; ++t) xrow[t] = reinterpret_cast<const uint4*>(x + (i64)t * k);

  float acc[ROWS][TOKENS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[r][t] = 0.f;

  const int full = chunks - chunks % STEP;
  for (int c0 = 0; c0 < full; c0 += STEP) step<false>(acc, wrow, srow, xrow, c0, chunks, lane);
  if (full < chunks) step<true>(acc, wrow, srow, xrow, full, chunks, lane);

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const i64 row = row0 + r;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      float s = warp_sum(acc[r][t]);
      if (lane == ((r * TOKENS + t) & 31) && row < n) {
#if !BLOCK_K
        s *= scale[row];
#endif
        out[t * (i64)n + row] = from_float<scalar_t>(bias ? s + to_float(bias[row]) : s);
      }
    }
  }
}
