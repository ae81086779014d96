// Rotary position embedding on the first rot_dim channels of every query and
// key head. NeoX pairs channel j with j + rot_dim/2; GPT-J (interleaved) pairs
// 2j with 2j+1. cos_sin [max_pos, rot_dim] holds cos in its first half and sin
// in its second. Out of place (q_out/k_out dense) or in place (outputs alias
// the inputs: each thread reads and then writes the same two channels).
// rotary_and_cache rotates and writes K/V straight into the paged cache.
#include "common.cuh"

#ifndef COS_T
#define COS_T float
#endif
typedef COS_T cos_t;

// Elements per access of rotary_and_cache (1, or 16 bytes' worth when the launcher found every
// row and base 16-byte aligned and the rotary half and head size multiples of it).
#ifndef PACK
#define PACK 1
#endif

// One pair: x1' = x1 c - x2 s, x2' = x2 c + x1 s. The _rn intrinsics are never contracted into
// FMAs, so each product and each sum rounds once in float32, as PyTorch's separate mul/sub/add
// kernels do: the reference's results, bit for bit.
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  *o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

__device__ __forceinline__ void head_ptrs(int hh, int t, int num_heads, int head_size,
                                          const scalar_t* query, const scalar_t* key,
                                          scalar_t* q_out, scalar_t* k_out, i64 q_stride,
                                          i64 k_stride, i64 qo_stride, i64 ko_stride,
                                          const scalar_t** src, scalar_t** dst) {
  if (hh < num_heads) {
    *src = query + t * q_stride + (i64)hh * head_size;
    *dst = q_out + t * qo_stride + (i64)hh * head_size;
  } else {
    *src = key + t * k_stride + (i64)(hh - num_heads) * head_size;
    *dst = k_out + t * ko_stride + (i64)(hh - num_heads) * head_size;
  }
}

// grid (T)
extern "C" __global__ void rotary_embedding(
    scalar_t* q_out, scalar_t* k_out, const scalar_t* query, const scalar_t* key,
    const i64* __restrict__ positions, const cos_t* __restrict__ cos_sin,
    i64 q_stride, i64 k_stride, i64 qo_stride, i64 ko_stride,
    int num_heads, int num_kv_heads, int head_size, int rot_dim, int is_neox, int copy_rest) {
  const int t = blockIdx.x;
  const int half = rot_dim / 2;
  const cos_t* cs = cos_sin + positions[t] * rot_dim;
  const int heads = num_heads + num_kv_heads;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int hh = i / half, j = i % half;
    const scalar_t* src;
    scalar_t* dst;
    head_ptrs(hh, t, num_heads, head_size, query, key, q_out, k_out, q_stride, k_stride,
              qo_stride, ko_stride, &src, &dst);
    const float c = to_float(cs[j]), s = to_float(cs[half + j]);
    const int i1 = is_neox ? j : 2 * j, i2 = is_neox ? j + half : 2 * j + 1;
    float o1, o2;
    rotate_pair(to_float(src[i1]), to_float(src[i2]), c, s, &o1, &o2);
    dst[i1] = from_float<scalar_t>(o1);
    dst[i2] = from_float<scalar_t>(o2);
  }
  if (!copy_rest) return;
  const int rest = head_size - rot_dim;
  for (int i = threadIdx.x; i < heads * rest; i += blockDim.x) {
    const int hh = i / rest, d = rot_dim + i % rest;
    const scalar_t* src;
    scalar_t* dst;
    head_ptrs(hh, t, num_heads, head_size, query, key, q_out, k_out, q_stride, k_stride,
              qo_stride, ko_stride, &src, &dst);
    dst[d] = src[d];
  }
}

// ---------------------------------------------------------------- rotary + cache write

// N elements moved as one aligned value: the compiler issues 16-byte accesses for N * sizeof(T)
// of 16 (two for 32), which the launcher's PACK guarantees are aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};
typedef Pack<scalar_t, PACK> pack_t;
typedef Pack<cos_t, PACK> cos_pack_t;

__device__ __forceinline__ pack_t ld_pack(const scalar_t* p) { return *reinterpret_cast<const pack_t*>(p); }
__device__ __forceinline__ void st_pack(scalar_t* p, const pack_t& v) { *reinterpret_cast<pack_t*>(p) = v; }

// PACK pairs of one head: channels a[i] = head[lo + i] and b[i] = head[hi + i] hold them (NeoX:
// lo = u*PACK, hi = half + lo, pair i = (a[i], b[i]); GPT-J: lo = 2u*PACK, hi = lo + PACK, pairs
// interleaved across a ++ b). cos/sin of pair i are cs[u*PACK + i] and cs[half + u*PACK + i].
__device__ __forceinline__ void rotate_unit(const scalar_t* src, scalar_t* dst, const cos_t* cs, int u,
                                            int half, int is_neox) {
  const int lo = is_neox ? u * PACK : 2 * u * PACK, hi = is_neox ? half + lo : lo + PACK;
  const pack_t a = ld_pack(src + lo), b = ld_pack(src + hi);
  const cos_pack_t c = *reinterpret_cast<const cos_pack_t*>(cs + u * PACK);
  const cos_pack_t s = *reinterpret_cast<const cos_pack_t*>(cs + half + u * PACK);
  float x[2 * PACK];
#pragma unroll
  for (int i = 0; i < PACK; ++i) {
    x[i] = to_float(a.v[i]);
    x[PACK + i] = to_float(b.v[i]);
  }
  float y[2 * PACK];
#pragma unroll
  for (int i = 0; i < PACK; ++i) {
    // NeoX pair i is (x[i], x[PACK + i]); GPT-J pair i is (x[2i], x[2i + 1]) of a ++ b.
    const int i1 = is_neox ? i : 2 * i, i2 = is_neox ? PACK + i : 2 * i + 1;
    rotate_pair(x[i1], x[i2], to_float(c.v[i]), to_float(s.v[i]), &y[i1], &y[i2]);
  }
  pack_t oa, ob;
#pragma unroll
  for (int i = 0; i < PACK; ++i) {
    oa.v[i] = from_float<scalar_t>(y[i]);
    ob.v[i] = from_float<scalar_t>(y[PACK + i]);
  }
  st_pack(dst + lo, oa);
  st_pack(dst + hi, ob);
}

// Rotate query [T, H, D] into q_out (dense) and key [T, Hkv, D] into key_cache, copy value into
// value_cache; caches [num_blocks, Hkv, block_size, D], slot -1 writes no K/V (q still rotates).
// One thread per unit of PACK elements (pairs), no loop: the work of a decode step spreads over
// every thread at once instead of queuing behind one block's loads.
// Units of a token, in order: rotary units of the H + Hkv heads (half / PACK per head), rest
// units (channels past rot_dim, copied unrotated), value units. grid (T, ceil(units / blockDim)).
extern "C" __global__ void rotary_and_cache(
    scalar_t* __restrict__ q_out, scalar_t* __restrict__ key_cache, scalar_t* __restrict__ value_cache,
    const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
    const scalar_t* __restrict__ value, const i64* __restrict__ positions,
    const i64* __restrict__ slot_mapping, const cos_t* __restrict__ cos_sin,
    i64 q_stride, i64 k_stride, i64 v_stride, int num_heads, int num_kv_heads, int head_size,
    int rot_dim, int block_size, int is_neox) {
  const int t = blockIdx.x;
  int i = blockIdx.y * blockDim.x + threadIdx.x;
  const int heads = num_heads + num_kv_heads;
  const int half = rot_dim / 2;
  const int rot_units = half / PACK, rest_units = (head_size - rot_dim) / PACK;
  const int head_units = head_size / PACK;
  const int n_rot = heads * rot_units, n_rest = heads * rest_units;
  if (i >= n_rot + n_rest + num_kv_heads * head_units) return;
  // The head's position in the cache, or in q_out for query heads (q_out is [T, H, D]).
  const i64 slot = slot_mapping[t];
  const i64 q_row = (i64)t * num_heads * head_size;
  const i64 cache_row = slot < 0 ? 0
      : (((slot / block_size) * num_kv_heads) * block_size + slot % block_size) * head_size;
  const i64 cache_head = (i64)block_size * head_size;  // between heads of one block
  if (i >= n_rot + n_rest) {  // value
    if (slot < 0) return;
    i -= n_rot + n_rest;
    const int h = i / head_units, d = (i % head_units) * PACK;
    st_pack(value_cache + cache_row + h * cache_head + d,
            ld_pack(value + t * v_stride + (i64)h * head_size + d));
    return;
  }
  const bool rest = i >= n_rot;
  if (rest) i -= n_rot;
  const int per_head = rest ? rest_units : rot_units;
  const int hh = i / per_head, u = i % per_head;
  if (hh >= num_heads && slot < 0) return;
  const scalar_t* src = hh < num_heads ? query + t * q_stride + (i64)hh * head_size
                                       : key + t * k_stride + (i64)(hh - num_heads) * head_size;
  scalar_t* dst = hh < num_heads ? q_out + q_row + (i64)hh * head_size
                                 : key_cache + cache_row + (hh - num_heads) * cache_head;
  if (rest) {
    const int d = rot_dim + u * PACK;
    st_pack(dst + d, ld_pack(src + d));
  } else {
    rotate_unit(src, dst, cos_sin + positions[t] * rot_dim, u, half, is_neox);
  }
}
