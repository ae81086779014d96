// One-pass sampling: each row's token is the argmax over its vocabulary of a per-token key,
//   greedy rows (temperature <= 0 or NaN): key = logit (as torch.argmax: ties -> lowest index, NaN wins);
//   random rows: key = logit * (1/T) - log(E), E = -log1p(-W), W = min((h + 0.5) 2^-32, 1 - 2^-24),
//                h = fmix32(fmix32(token ^ k0) ^ k1)   (k0, k1: the row's two 32-bit keys).
// That is the exponential race argmax_i p_i / E_i (E_i ~ Exp(1) i.i.d., distributed as softmax(l/T)) in
// the log domain, where the softmax normalisation cancels: no max or sum pass. W is a uniform computed
// from its distance to 0 and E from log1p, so the winners' end (E -> 0, W -> 0) keeps its precision; a
// finite logit's key is finite, so a -inf logit never beats it. kernels/reference.py: race_sample is the
// same function in PyTorch.
//
// Grid (splits, rows), 256 threads. Each CTA scans a contiguous slice of one row's 16-byte vectors (the
// tail past the last whole vector goes to the row's last CTA) and keeps, per thread, the best key and its
// index (visited in increasing order, so a strict > keeps the lowest index). A (key, index) pair packs
// into one uint64 whose max is the winner: order-preserving key bits above, ~index below.
// Why split rows: a random row costs ~tens of ALU operations per token (hash, two logs), so a batch of
// 256 x 128k is compute-bound, and a batch of 1 or 32 rows on one CTA each would leave 100+ of the 132
// SMs idle. The launcher gives each row `splits` CTAs so that rows x splits fills about one wave of 4
// CTAs per SM (never more than one vector per thread per CTA); each CTA writes its partial winner, and
// the row's last CTA to finish (a ticket counter, reset to 0 by that CTA for the next launch) reduces
// the partials: one launch, no second pass.
#include "common.cuh"

#ifndef VEC
#define VEC 8
#endif
#ifndef KEY_T
#define KEY_T i64
#endif
typedef KEY_T rowkey_t;
typedef unsigned long long u64;
constexpr int THREADS = 256;
constexpr int UNROLL = 4;  // independent 16-byte loads in flight per thread

static_assert(VEC == 1 || VEC == Vec16<scalar_t>::N, "VEC is 1 or one 16-byte vector");

#if VEC > 1
typedef uint4 chunk_t;
__device__ __forceinline__ void unpack(const chunk_t& c, float* f) { unpack16<scalar_t>(c, f); }
#else
typedef scalar_t chunk_t;
__device__ __forceinline__ void unpack(const chunk_t& c, float* f) { f[0] = to_float(c); }
#endif

// MurmurHash3's 32-bit finalizer, as workers/sampler.py's _fmix32.
__device__ __forceinline__ unsigned fmix32(unsigned x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// log(E) for the token with hash h. Explicit _rn operations: no contraction into FMAs, so W is
// bit-identical to the reference's.
__device__ __forceinline__ float log_race_noise(unsigned h) {
  const float w = fminf(__fmul_rn(__fadd_rn(__uint2float_rn(h), 0.5f), 2.3283064365386963e-10f),
                        __int_as_float(0x3f7fffff));  // 1 - 2^-24: E stays > 0
  const float e = -log1pf(-w);                          // in [1.1e-10, 16.7]
  return __logf(e);
}

// Float -> uint32 with the same order; -0 == +0, NaN above +inf (torch.argmax picks the first NaN).
__device__ __forceinline__ unsigned ordered(float v) {
  if (v != v) return 0xFFFFFFFFu;
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? 0x80000000u - (u & 0x7FFFFFFFu) : (u | 0x80000000u);
}

template <bool GREEDY>
__device__ __forceinline__ void consider(float l, int idx, float inv_t, unsigned k0, unsigned k1,
                                         unsigned& best, int& best_i) {
  float key = l;
  if constexpr (!GREEDY) key = __fsub_rn(__fmul_rn(l, inv_t), log_race_noise(fmix32(fmix32((unsigned)idx ^ k0) ^ k1)));
  const unsigned o = ordered(key);
  if (o > best) {  // every real key orders above the initial 0
    best = o;
    best_i = idx;
  }
}

// Vectors [begin, end) of the row, then (when `tail`) the elements past the last whole vector.
template <bool GREEDY>
__device__ __forceinline__ void scan(const scalar_t* __restrict__ row, int vocab, int begin, int end,
                                     bool tail, float inv_t, unsigned k0, unsigned k1, unsigned& best,
                                     int& best_i) {
  const chunk_t* vecs = reinterpret_cast<const chunk_t*>(row);
  for (int i = begin + (int)threadIdx.x; i < end; i += UNROLL * THREADS) {
    chunk_t c[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (i + u * THREADS < end) c[u] = vecs[i + u * THREADS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int j = i + u * THREADS;
      if (j < end) {
        float f[VEC];
        unpack(c[u], f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) consider<GREEDY>(f[e], j * VEC + e, inv_t, k0, k1, best, best_i);
      }
    }
  }
  if (tail) {
    const int t = (vocab / VEC) * VEC + (int)threadIdx.x;  // fewer than VEC <= THREADS elements
    if (t < vocab) consider<GREEDY>(to_float(row[t]), t, inv_t, k0, k1, best, best_i);
  }
}

__device__ __forceinline__ u64 max64(u64 a, u64 b) { return a > b ? a : b; }

// Max over the block; every thread gets it.
__device__ __forceinline__ u64 block_max64(u64 v, u64* scratch /* [32] shared */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max64(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? scratch[lane] : 0ull;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max64(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// out [R] int64; logits [R, V] with row stride `row_stride` elements (16-byte aligned rows when
// VEC > 1); temps [R] float32; keys [R, 2]; partial [R * splits] and counters [R] (zero before the
// first launch; left zero) are scratch.
extern "C" __global__ void __launch_bounds__(THREADS, 4) race_sample(
    i64* __restrict__ out, const scalar_t* __restrict__ logits, const float* __restrict__ temps,
    const rowkey_t* __restrict__ keys, u64* __restrict__ partial, unsigned* __restrict__ counters,
    i64 row_stride, int vocab) {
  __shared__ u64 scratch[32];
  __shared__ bool last;
  const int row = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const scalar_t* p = logits + (i64)row * row_stride;
  const int nvec = vocab / VEC;
  const int per = (nvec + splits - 1) / splits;
  const int begin = min(nvec, split * per), end = min(nvec, begin + per);
  const bool tail = split == splits - 1;
  const float t = temps[row];
  unsigned best = 0;
  int best_i = 0;
  if (t > 0.f) {
    const unsigned k0 = (unsigned)keys[2 * row], k1 = (unsigned)keys[2 * row + 1];
    scan<false>(p, vocab, begin, end, tail, 1.0f / t, k0, k1, best, best_i);  // IEEE division
  } else {
    scan<true>(p, vocab, begin, end, tail, 0.f, 0u, 0u, best, best_i);
  }
  u64 packed = block_max64(((u64)best << 32) | (unsigned)~best_i, scratch);
  if (splits == 1) {
    if (threadIdx.x == 0) out[row] = (i64)(~(unsigned)packed);
    return;
  }
  if (threadIdx.x == 0) {
    partial[(i64)row * splits + split] = packed;
    __threadfence();  // the partial is visible before the ticket is
    last = atomicAdd(&counters[row], 1u) == (unsigned)(splits - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const volatile u64* part = partial + (i64)row * splits;  // volatile: not from this SM's L1
  packed = 0ull;
  for (int s = threadIdx.x; s < splits; s += THREADS) packed = max64(packed, part[s]);
  packed = block_max64(packed, scratch);
  if (threadIdx.x == 0) {
    out[row] = (i64)(~(unsigned)packed);
    counters[row] = 0u;
  }
}
