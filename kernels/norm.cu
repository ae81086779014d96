// RMSNorm, optionally fused with the residual add that precedes it.
// One CTA per row; each thread handles VEC-element chunks (VEC = 16 bytes of
// scalar_t when the rows are 16-byte aligned, else 1). Rows of up to
// blockDim * MAXC chunks stay in registers between the two passes, and so does
// their slice of the norm weight, loaded before the reduction so that its
// latency (a DRAM trip at decode: the step's weight stream evicts it from L2)
// overlaps the reduction instead of following it. Longer rows are read a second
// time (from cache). MAXC 2 covers hidden sizes up to 2 * 1024 * VEC (16,384 at
// 16-bit types) with the launcher's two chunks per thread, inside the 64
// registers a 1024-thread CTA allows.
#include "common.cuh"

#ifndef WEIGHT_T
#define WEIGHT_T scalar_t
#endif
#ifndef VEC
#define VEC 8
#endif
typedef WEIGHT_T weight_t;
constexpr int MAXC = 2;

template <int N> struct __align__(sizeof(scalar_t) * N) Pack { scalar_t e[N]; };
typedef Pack<VEC> pack_t;

// x (+ residual, rounded to scalar_t as PyTorch would) as floats; stores the sum.
__device__ __forceinline__ void load_row_chunk(float* f, const scalar_t* x, const scalar_t* residual,
                                               scalar_t* residual_out, i64 row_x, i64 row_r,
                                               i64 row_o, int i) {
  const pack_t a = *reinterpret_cast<const pack_t*>(x + row_x + (i64)i * VEC);
  if (residual) {
    const pack_t b = *reinterpret_cast<const pack_t*>(residual + row_r + (i64)i * VEC);
    pack_t s;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      s.e[v] = from_float<scalar_t>(to_float(a.e[v]) + to_float(b.e[v]));
      f[v] = to_float(s.e[v]);
    }
    *reinterpret_cast<pack_t*>(residual_out + row_o + (i64)i * VEC) = s;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) f[v] = to_float(a.e[v]);
  }
}

__device__ __forceinline__ void load_weight_chunk(float* w, const weight_t* weight, int i) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) w[v] = to_float(weight[i * VEC + v]);
}

__device__ __forceinline__ void store_row_chunk(scalar_t* out, const float* w, const float* f,
                                                float inv, i64 row_o, int i) {
  pack_t o;
#pragma unroll
  for (int v = 0; v < VEC; ++v) o.e[v] = from_float<scalar_t>(f[v] * inv * w[v]);
  *reinterpret_cast<pack_t*>(out + row_o + (i64)i * VEC) = o;
}

// out = rms_norm(x [+ residual]) * weight; with residual, residual_out = x + residual.
// out and residual_out are dense [N, hidden]; x and residual have row strides.
extern "C" __global__ void __launch_bounds__(1024) rms_norm(
    scalar_t* __restrict__ out, scalar_t* __restrict__ residual_out,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
    const weight_t* __restrict__ weight, i64 x_stride, i64 res_stride, int hidden, float eps) {
  __shared__ float scratch[32];
  const i64 row = blockIdx.x;
  const i64 rx = row * x_stride, rr = row * res_stride, ro = row * hidden;
  const int nchunks = hidden / VEC;
  float ss = 0.f;
  if (nchunks <= (int)blockDim.x * MAXC) {
    float f[MAXC][VEC], w[MAXC][VEC];
#pragma unroll
    for (int k = 0; k < MAXC; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nchunks) {
        load_weight_chunk(w[k], weight, i);
        load_row_chunk(f[k], x, residual, residual_out, rx, rr, ro, i);
#pragma unroll
        for (int v = 0; v < VEC; ++v) ss = fmaf(f[k][v], f[k][v], ss);
      }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
#pragma unroll
    for (int k = 0; k < MAXC; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nchunks) store_row_chunk(out, w[k], f[k], inv, ro, i);
    }
    return;
  }
  // Long rows: first pass writes the residual sum and accumulates squares.
  for (int i = threadIdx.x; i < nchunks; i += blockDim.x) {
    float f[VEC];
    load_row_chunk(f, x, residual, residual_out, rx, rr, ro, i);
#pragma unroll
    for (int v = 0; v < VEC; ++v) ss = fmaf(f[v], f[v], ss);
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
  // Second pass reads back what this same thread read (or wrote) above.
  const scalar_t* src = residual ? residual_out : x;
  const i64 rs = residual ? ro : rx;
  for (int i = threadIdx.x; i < nchunks; i += blockDim.x) {
    float f[VEC], w[VEC];
    load_weight_chunk(w, weight, i);
    load_row_chunk(f, src, nullptr, nullptr, rs, 0, 0, i);
    store_row_chunk(out, w, f, inv, ro, i);
  }
}
