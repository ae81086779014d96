// Rotary position embedding on the first rot_dim channels of every query and
// key head. NeoX pairs channel j with j + rot_dim/2; GPT-J (interleaved) pairs
// 2j with 2j+1. cos_sin [max_pos, rot_dim] holds cos in its first half and sin
// in its second. Out of place (q_out/k_out dense) or in place (outputs alias
// the inputs: each thread reads and then writes the same two channels).
#include "common.cuh"

#ifndef COS_T
#define COS_T float
#endif
typedef COS_T cos_t;

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
  pdl_enter();
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
    const float x1 = to_float(src[i1]), x2 = to_float(src[i2]);
    dst[i1] = from_float<scalar_t>(x1 * c - x2 * s);
    dst[i2] = from_float<scalar_t>(x2 * c + x1 * s);
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
