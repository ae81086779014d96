// Skinny GEMM on tensor cores: y[TOKENS, n] = x[TOKENS, k] · W[n, k]^T (+ bias[n]), TOKENS <= 8,
// 16-bit types only (mma.sync m16n8k16, float32 accumulation; sm_80 and later).
//
// Same memory plan as gemv.cu (16-byte W loads, UNROLL steps in flight, x through L1), but the
// multiply-adds run as one mma per 16 rows x 16 k x 8 tokens, so at 8 tokens the CUDA cores'
// unpack + FMA work (several instructions per W byte) is gone, and so is the warp-shuffle
// reduction: the mma sums over k itself.
//
// A dot product does not care in which order k is visited, so k is relabelled to fit the
// fragments to plain 16-byte loads. Lane (g, t) = (lane / 4, lane % 4) loads, at chunk c
// (8 consecutive k), W rows g and g + 8 of the tile and x row (token) g. Two mmas use them:
//   mma 0: A = {W[g][c].x, W[g+8][c].x, W[g][c].y, W[g+8][c].y}, B = {x[g][c].x, x[g][c].y}
//   mma 1: the same with .z, .w
// which is the m16n8k16 fragment layout (A: a0a1 row g, a2a3 row g+8, a4..a7 the same rows 8
// logical k later; B: b0b1 and b2b3 at those logical k, column = token g) under the mapping
// "logical k 2t + i (+8) <-> element 4j + i (+2) of chunk c" shared by every row and token.
// Lanes with the same t share c, so the four chunks c = 4b + t of k-block b are 64 contiguous
// bytes per row. Lanes of tokens past TOKENS read token 0; their output columns are dropped.
//
// One CTA per 16 output rows; its WARPS warps split k (warp w takes k-blocks w*UNROLL.. of
// every WARPS*UNROLL), and sum their 16x8 partial tiles in shared memory at the end: no second
// kernel. LOAD: the W loads' cache hint, and __launch_bounds__(.., 1) keeps the loads of a
// step together, both as in gemv.cu.
#include "common.cuh"

#ifndef TOKENS
#define TOKENS 1
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef LOAD
#define LOAD 0
#endif

__device__ __forceinline__ uint4 load_w(const uint4* p) {
#if LOAD == 1
  return __ldcs(p);
#elif LOAD == 2
  return __ldcg(p);
#else
  return __ldg(p);
#endif
}

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

// One loop step: k-blocks b0 .. b0 + UNROLL - 1 (chunks 4b + t). GUARD: the last, partial
// steps, where chunks past the row end are neither loaded nor used.
template <bool GUARD>
__device__ __forceinline__ void step(float (&acc)[4], const uint4* w_lo, const uint4* w_hi, const uint4* xg,
                                     int b0, int chunks, int t) {
  const uint4 zero = uint4{0u, 0u, 0u, 0u};
  uint4 e[UNROLL], f[UNROLL], xv[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = (b0 + u) * 4 + t;
    const bool ok = !GUARD || c < chunks;
    e[u] = ok ? load_w(w_lo + c) : zero;
    f[u] = ok ? load_w(w_hi + c) : zero;
    xv[u] = ok ? __ldg(xg + c) : zero;
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    Mma<scalar_t>::run(acc, e[u].x, f[u].x, e[u].y, f[u].y, xv[u].x, xv[u].y);
    Mma<scalar_t>::run(acc, e[u].z, f[u].z, e[u].w, f[u].w, xv[u].z, xv[u].w);
  }
}

// out: dense [TOKENS, n]; x: [TOKENS, k] rows x_stride elements apart; w: dense [n, k];
// bias: [n] or null. Grid: ceil(n / 16) CTAs of WARPS warps.
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) skinny_gemm_mma(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ bias, i64 x_stride, int n, int k) {
  __shared__ float partial[WARPS][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const i64 tile = (i64)blockIdx.x * 16;
  // Rows past n re-read row n - 1 (valid memory); their results are not stored.
  const i64 lo = tile + g < n ? tile + g : (i64)n - 1;
  const i64 hi = tile + g + 8 < n ? tile + g + 8 : (i64)n - 1;
  const uint4* w_lo = reinterpret_cast<const uint4*>(w + lo * k);
  const uint4* w_hi = reinterpret_cast<const uint4*>(w + hi * k);
  // Lanes of tokens past TOKENS read token 0: B's column g only feeds output column g, dropped.
  const uint4* xg = reinterpret_cast<const uint4*>(x + (g < TOKENS ? g : 0) * x_stride);
  const int chunks = k / 8;
  const int blocks = (chunks + 3) / 4;
  const int full = chunks / 4;  // k-blocks whose four chunks all exist

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int b0 = warp * UNROLL;
  for (; b0 + UNROLL <= full; b0 += WARPS * UNROLL) step<false>(acc, w_lo, w_hi, xg, b0, chunks, t);
  if (b0 < blocks) step<true>(acc, w_lo, w_hi, xg, b0, chunks, t);

  if (WARPS > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = 0.f;
#pragma unroll
      for (int v = 0; v < WARPS; ++v) s += partial[v][lane][i];
      acc[i] = s;
    }
  }
  // Lane (g, t) holds rows tile + g (acc[0..1]) and tile + g + 8 (acc[2..3]), tokens 2t and 2t + 1.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const i64 row = tile + g + (i >= 2 ? 8 : 0);
    const int token = 2 * t + (i & 1);
    if (row < n && token < TOKENS)
      out[token * (i64)n + row] = from_float<scalar_t>(bias ? acc[i] + to_float(bias[row]) : acc[i]);
  }
}
