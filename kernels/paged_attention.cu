// Decode paged attention: one query token per sequence over its paged context.
//
// Cache layout [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_SIZE]: one block of
// one head is one contiguous run of BLOCK_SIZE rows. A CTA serves HPB query
// heads that share one KV head (GQA/MQA), so each K/V row it reads feeds HPB
// dot products, and (for split contexts) one partition of the context.
//
// Inside a warp, G lanes read one row (16 bytes each) and NG = 32/G rows are
// read side by side, so a warp's loads cover NG consecutive rows: contiguous
// memory. A warp takes TILE rows at a time, issuing all its K and V loads for
// the tile before using any (memory-level parallelism), and keeps a running
// softmax (max m, sum l, accumulator acc) that is rescaled once per tile.
// Scores are kept in log2 units so exp2f can be used.
//
// Split mode (part_out != null): each CTA writes its partition's normalised
// output, max and sum; paged_decode_reduce combines the partitions.
#include "common.cuh"

#ifndef HEAD_SIZE
#define HEAD_SIZE 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef HPB
#define HPB 4
#endif
#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
// CACHE_FP8 1: the cache holds e4m3 values (kv_cache_dtype="fp8"); a chunk is 16 of them, one
// 16-byte access as for a 16-bit cache (8-byte accesses left a lane half the bytes in flight: 70 %
// of the copy bandwidth at batch 1024, H100), widened in registers. The key scale is folded into
// `scale` by the launcher; the value scale multiplies the output once (v_scale).
#ifndef CACHE_FP8
#define CACHE_FP8 0
#endif
#if CACHE_FP8
typedef unsigned char cache_t;
#else
typedef scalar_t cache_t;
#endif
// FP8_HALF2 1 (an FP8 cache only): the products run in half2 on the widened e4m3 pairs, summed in
// float once per chunk (K) or once per tile (V). The float path spends 1.5 conversions and 8 FMAs a
// cached value at 4 query heads; this one issues ~27 % fewer instructions, and took batch 1024,
// context 384 from 350.9 to 335.0 µs (77 -> 81 % of the copy bandwidth, H100): instruction issue was
// part of what kept the FP8 cache below the bandwidth, not all of it. The query is held in half2 times
// QK_SHIFT (so that a small k_scale leaves it a normal number; the partial sums of 16 products stay
// far below 65504 for any score a softmax can tell apart), the tile's probabilities in half2
// (p <= 1; a tile's sum of p * raw e4m3 is at most TPG * 448). The float path stays the reference
// variant; the e4m3 rounding of the cache dominates either path's error.
#ifndef FP8_HALF2
#define FP8_HALF2 0
#endif
#define HALF2_MATH (CACHE_FP8 && FP8_HALF2)
constexpr float QK_SHIFT = 16.f;

constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

constexpr int D = HEAD_SIZE;
constexpr int BS = BLOCK_SIZE;
constexpr int QV = Vec16<scalar_t>::N;             // scalar_t elements per 16 bytes
constexpr int VEC = CACHE_FP8 ? 16 : QV;           // elements per 16-byte chunk of the cache
constexpr int NC = D / VEC;                        // chunks per row
constexpr int G = cmin(32, pow2_at_least(NC));     // lanes per row
constexpr int CPL = (NC + G - 1) / G;              // chunks per lane
constexpr int NG = 32 / G;                         // rows a warp reads side by side
// Rows per lane group per tile: bounded by the block, by the load registers
// (8 chunks of K and 8 of V per lane), by the score registers (TPG * HPB) and by TPG_MAX
// (fewer registers, more resident warps).
#ifndef TPG_MAX
#define TPG_MAX 32
#endif
constexpr int TPG = cmin(cmin(cmin(cmax(1, BS / NG), cmax(1, 8 / CPL)), cmax(1, 32 / HPB)), TPG_MAX);
constexpr int TILE = TPG * NG;
constexpr int NT = NUM_WARPS * 32;

static_assert(D % VEC == 0, "head size must fill whole 16-byte chunks");
static_assert(BS % TILE == 0, "a tile must not straddle two blocks");

// Sum NV values over the G lanes of a lane group, leaving every lane with all NV sums.
constexpr int NV = TPG * HPB;
#ifndef SCORE_XPOSE
#define SCORE_XPOSE 0
#endif
// Transposed reduction (needs NV a power of two): at each of the log2(G) steps a lane keeps
// half of its values and sends the other half to its partner, so the steps cost NV/2, NV/4,
// ... shuffles instead of NV each; the sums, now spread over the group, are then gathered
// back (NV shuffles). About 2*NV shuffles in all against NV*log2(G) for the butterfly.
constexpr bool XPOSE = SCORE_XPOSE && (NV & (NV - 1)) == 0;

template <int O, int C>
__device__ __forceinline__ void halve(float* v, int gl) {
  if constexpr (O > 0) {
    if constexpr (C >= 2) {
      constexpr int H = C / 2;
      const bool upper = (gl & O) != 0;
#pragma unroll
      for (int j = 0; j < H; ++j) {
        const float keep = upper ? v[H + j] : v[j];
        const float give = upper ? v[j] : v[H + j];
        v[j] = keep + __shfl_xor_sync(0xffffffffu, give, O);
      }
      halve<O / 2, H>(v, gl);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
      halve<O / 2, 1>(v, gl);
    }
  }
}

__device__ __forceinline__ void group_sum(float* v, int g, int gl) {
  if constexpr (XPOSE) {
    halve<G / 2, NV>(v, gl);
    // Lane gl now holds sums [gl*PER, (gl+1)*PER) (NV >= G), or sum gl/(G/NV) (NV < G).
    constexpr int PER = NV >= G ? NV / G : 1;
    float r[NV];
#pragma unroll
    for (int idx = 0; idx < NV; ++idx) {
      const int src = NV >= G ? idx / PER : idx * (G / NV);
      r[idx] = __shfl_sync(0xffffffffu, v[NV >= G ? idx % PER : 0], g * G + src);
    }
#pragma unroll
    for (int idx = 0; idx < NV; ++idx) v[idx] = r[idx];
  } else {
#pragma unroll
    for (int idx = 0; idx < NV; ++idx)
#pragma unroll
      for (int o = G / 2; o > 0; o >>= 1) v[idx] += __shfl_xor_sync(0xffffffffu, v[idx], o);
  }
}

#ifndef PREFETCH
#define PREFETCH 0
#endif

// Pair i (elements 2i, 2i+1) of a 16-byte chunk of e4m3 values, widened exactly to half2.
__device__ __forceinline__ __half2 e4m3_pair(const uint4& u, int i) {
  unsigned int h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(reinterpret_cast<const unsigned short*>(&u)[i]));
  return *reinterpret_cast<const __half2*>(&h);
}

// One chunk (VEC elements, 16 bytes) of a cache row, in float.
__device__ __forceinline__ void unpack_chunk(const uint4& u, float* f) {
#if CACHE_FP8
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) {
    const float2 t = __half22float2(e4m3_pair(u, i));
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
#else
  unpack16<scalar_t>(u, f);
#endif
}

// Issue all of one tile's K and V loads (TPG rows per lane group, CPL chunks per lane).
__device__ __forceinline__ void load_tile(uint4 (&kr)[TPG][CPL], uint4 (&vr)[TPG][CPL],
                                          const cache_t* __restrict__ k_cache,
                                          const cache_t* __restrict__ v_cache, const int* table,
                                          int t0, int num_kv_heads, int kvh, int g, int gl) {
  const i64 row0 = ((i64)table[t0 / BS] * num_kv_heads + kvh) * BS + t0 % BS;
  const cache_t* kb = k_cache + row0 * D;
  const cache_t* vb = v_cache + row0 * D;
#pragma unroll
  for (int i = 0; i < TPG; ++i)
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = gl + G * j;
      if (c < NC) {
        kr[i][j] = ld16(kb + (g + NG * i) * D + c * VEC);
        vr[i][j] = ld16(vb + (g + NG * i) * D + c * VEC);
      }
    }
}

extern "C" __global__ void __launch_bounds__(NT) paged_decode(
    scalar_t* __restrict__ out,              // [S, H, D] (unsplit)
    float* __restrict__ part_out,            // [S, H, P, D] (split) or null
    float* __restrict__ part_m,              // [S, H, P]
    float* __restrict__ part_l,              // [S, H, P]
    const scalar_t* __restrict__ query,      // [S, H, D], row stride q_stride
    const cache_t* __restrict__ k_cache,
    const cache_t* __restrict__ v_cache,
    const int* __restrict__ block_tables,    // [S, bt_stride]
    const int* __restrict__ seq_lens,        // [S]
    const float* __restrict__ alibi,         // [H] or null
    int num_kv_heads, int qpk, i64 q_stride, int bt_stride, float scale, float soft_cap,
    int window, int partition_size, int max_parts, float v_scale) {
  const int head0 = blockIdx.x * HPB;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int num_heads = gridDim.x * HPB;
  const int kvh = head0 / qpk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane / G, gl = lane % G;
  const bool split = part_out != nullptr;

  const int seq_len = seq_lens[seq];
  int begin = split ? part * partition_size : 0;
  if (split && begin >= seq_len) return;  // past this sequence: the reduce reads nothing here
  const int end = split ? min(seq_len, begin + partition_size) : seq_len;
  const int win_lo = window > 0 ? max(0, seq_len - window) : 0;
  begin = max(begin, win_lo / TILE * TILE);

  float q[HPB][CPL][VEC];
#pragma unroll
  for (int h = 0; h < HPB; ++h)
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = gl + G * j;
      if (c < NC) {
#pragma unroll
        for (int k = 0; k < VEC / QV; ++k)
          unpack16<scalar_t>(ld16(query + seq * q_stride + (head0 + h) * D + c * VEC + k * QV), q[h][j] + k * QV);
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[h][j][v] *= scale;
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[h][j][v] = 0.f;
      }
    }
#if HALF2_MATH
  __half2 qh[HPB][CPL][VEC / 2];
#pragma unroll
  for (int h = 0; h < HPB; ++h)
#pragma unroll
    for (int j = 0; j < CPL; ++j)
#pragma unroll
      for (int v = 0; v < VEC / 2; ++v)
        qh[h][j][v] = __floats2half2_rn(q[h][j][2 * v] * QK_SHIFT, q[h][j][2 * v + 1] * QK_SHIFT);
#endif
  float slope[HPB];
#pragma unroll
  for (int h = 0; h < HPB; ++h) slope[h] = alibi ? alibi[head0 + h] : 0.f;

  float m[HPB], l[HPB], acc[HPB][CPL][VEC];
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
    m[h] = NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < CPL; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[h][j][v] = 0.f;
  }

  const int* table = block_tables + (i64)seq * bt_stride;
  constexpr int STEP = NUM_WARPS * TILE;
  uint4 kr[TPG][CPL], vr[TPG][CPL];
  int t0 = begin + warp * TILE;
  if (PREFETCH && t0 < end) load_tile(kr, vr, k_cache, v_cache, table, t0, num_kv_heads, kvh, g, gl);
  for (; t0 < end; t0 += STEP) {
    uint4 kn[TPG][CPL], vn[TPG][CPL];
    if (!PREFETCH) {
      load_tile(kr, vr, k_cache, v_cache, table, t0, num_kv_heads, kvh, g, gl);
    } else if (t0 + STEP < end) {  // next tile's loads fly while this one is computed
      load_tile(kn, vn, k_cache, v_cache, table, t0 + STEP, num_kv_heads, kvh, g, gl);
    }

    float s[TPG][HPB];
#pragma unroll
    for (int i = 0; i < TPG; ++i) {
#pragma unroll
      for (int h = 0; h < HPB; ++h) s[i][h] = 0.f;
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        if (gl + G * j < NC) {
#if HALF2_MATH
          __half2 part[HPB];
#pragma unroll
          for (int h = 0; h < HPB; ++h) part[h] = __float2half2_rn(0.f);
#pragma unroll
          for (int v = 0; v < VEC / 2; ++v) {
            const __half2 k2 = e4m3_pair(kr[i][j], v);
#pragma unroll
            for (int h = 0; h < HPB; ++h) part[h] = __hfma2(qh[h][j][v], k2, part[h]);
          }
#pragma unroll
          for (int h = 0; h < HPB; ++h) {
            const float2 f = __half22float2(part[h]);
            s[i][h] = fmaf(f.x + f.y, 1.f / QK_SHIFT, s[i][h]);
          }
#else
          float kf[VEC];
          unpack_chunk(kr[i][j], kf);
#pragma unroll
          for (int h = 0; h < HPB; ++h)
#pragma unroll
            for (int v = 0; v < VEC; ++v) s[i][h] = fmaf(q[h][j][v], kf[v], s[i][h]);
#endif
        }
      }
    }
    group_sum(&s[0][0], g, gl);  // partial dot products -> full ones, in every lane of the group

    bool valid[TPG];
#pragma unroll
    for (int i = 0; i < TPG; ++i) {
      const int pos = t0 + g + NG * i;
      valid[i] = pos < end && pos >= win_lo;
#pragma unroll
      for (int h = 0; h < HPB; ++h) {
        float x = s[i][h];
        if (soft_cap > 0.f) x = soft_cap * tanhf(x / soft_cap);
        if (alibi) x += slope[h] * (float)(pos - (seq_len - 1));
        s[i][h] = valid[i] ? x * LOG2E : NEG_INF;
      }
    }

#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      float mt = s[0][h];
#pragma unroll
      for (int i = 1; i < TPG; ++i) mt = fmaxf(mt, s[i][h]);
#pragma unroll
      for (int o = 16; o >= G; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
      const float m_new = fmaxf(m[h], mt);  // warp-uniform
      const float corr = m_new == NEG_INF ? 1.f : exp2f(m[h] - m_new);
      m[h] = m_new;
      l[h] *= corr;
#pragma unroll
      for (int j = 0; j < CPL; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[h][j][v] *= corr;
#pragma unroll
      for (int i = 0; i < TPG; ++i) {
        s[i][h] = valid[i] ? exp2f(s[i][h] - m_new) : 0.f;  // s now holds p
        l[h] += s[i][h];
      }
    }

#if HALF2_MATH
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      if (gl + G * j >= NC) continue;
      __half2 t[HPB][VEC / 2];
#pragma unroll
      for (int h = 0; h < HPB; ++h)
#pragma unroll
        for (int v = 0; v < VEC / 2; ++v) t[h][v] = __float2half2_rn(0.f);
#pragma unroll
      for (int i = 0; i < TPG; ++i) {
        if (!valid[i]) continue;  // rows past the end may hold anything, NaN included
        __half2 p2[HPB];
#pragma unroll
        for (int h = 0; h < HPB; ++h) p2[h] = __float2half2_rn(s[i][h]);
#pragma unroll
        for (int v = 0; v < VEC / 2; ++v) {
          const __half2 v2 = e4m3_pair(vr[i][j], v);
#pragma unroll
          for (int h = 0; h < HPB; ++h) t[h][v] = __hfma2(p2[h], v2, t[h][v]);
        }
      }
#pragma unroll
      for (int h = 0; h < HPB; ++h)
#pragma unroll
        for (int v = 0; v < VEC / 2; ++v) {
          const float2 f = __half22float2(t[h][v]);
          acc[h][j][2 * v] += f.x;
          acc[h][j][2 * v + 1] += f.y;
        }
    }
#else
#pragma unroll
    for (int i = 0; i < TPG; ++i) {
      if (!valid[i]) continue;  // rows past the end may hold anything, NaN included
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        if (gl + G * j < NC) {
          float vf[VEC];
          unpack_chunk(vr[i][j], vf);
#pragma unroll
          for (int h = 0; h < HPB; ++h)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[h][j][v] = fmaf(s[i][h], vf[v], acc[h][j][v]);
        }
      }
    }
#endif
    if (PREFETCH) {
#pragma unroll
      for (int i = 0; i < TPG; ++i)
#pragma unroll
        for (int j = 0; j < CPL; ++j) { kr[i][j] = kn[i][j]; vr[i][j] = vn[i][j]; }
    }
  }

  // Lane groups of a warp share m; add their sums and accumulators.
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
#pragma unroll
    for (int o = 16; o >= G; o >>= 1) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);
#pragma unroll
      for (int j = 0; j < CPL; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[h][j][v] += __shfl_xor_sync(0xffffffffu, acc[h][j][v], o);
    }
  }

  __shared__ float sm_m[NUM_WARPS][HPB], sm_l[NUM_WARPS][HPB];
  __shared__ float sm_acc[NUM_WARPS][HPB][D];
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) { sm_m[warp][h] = m[h]; sm_l[warp][h] = l[h]; }
  }
  if (g == 0) {
#pragma unroll
    for (int h = 0; h < HPB; ++h)
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int c = gl + G * j;
        if (c < NC) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) sm_acc[warp][h][c * VEC + v] = acc[h][j][v];
        }
      }
  }
  __syncthreads();

  // Across warps: rescale each warp's partial to the common max and add.
  for (int idx = threadIdx.x; idx < HPB * D; idx += NT) {
    const int h = idx / D, d = idx % D;
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, sm_m[w][h]);
    float L = 0.f, O = 0.f;
    if (M != NEG_INF) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float wt = exp2f(sm_m[w][h] - M);
        L = fmaf(wt, sm_l[w][h], L);
        O = fmaf(wt, sm_acc[w][h][d], O);
      }
    }
    const float o = L > 0.f ? O / L * v_scale : 0.f;  // v_scale 1 unless the cache is FP8
    const i64 sh = (i64)seq * num_heads + head0 + h;
    if (split) {
      const i64 slot = sh * max_parts + part;
      part_out[slot * D + d] = o;
      if (d == 0) { part_m[slot] = M; part_l[slot] = L; }
    } else {
      out[sh * D + d] = from_float<scalar_t>(o);
    }
  }
}

// Combine the partitions of split mode. grid (H, S); dynamic shared memory
// holds one weight per partition.
extern "C" __global__ void paged_decode_reduce(
    scalar_t* __restrict__ out, const float* __restrict__ part_out,
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const int* __restrict__ seq_lens, int partition_size, int max_parts) {
  extern __shared__ float wts[];
  __shared__ float scratch[32];
  const int head = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
  const int nparts = min(max_parts, (seq_lens[seq] + partition_size - 1) / partition_size);
  const i64 base = ((i64)seq * num_heads + head) * max_parts;

  float M = NEG_INF;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x)
    if (part_l[base + p] > 0.f) M = fmaxf(M, part_m[base + p]);
  M = block_max(M, scratch);
  float L = 0.f;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) {
    const float lp = part_l[base + p];
    // Empty partitions (all masked) have l == 0 and an unwritten output row.
    const float w = lp > 0.f ? exp2f(part_m[base + p] - M) * lp : 0.f;
    wts[p] = w;
    L += w;
  }
  L = block_sum(L, scratch);  // also orders the wts writes before the reads below
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float O = 0.f;
    for (int p = 0; p < nparts; ++p)
      if (wts[p] > 0.f) O = fmaf(wts[p], part_out[(base + p) * D + d], O);
    out[((i64)seq * num_heads + head) * D + d] = from_float<scalar_t>(L > 0.f ? O / L : 0.f);
  }
}
