// Gated activations: out = act(x[..., :d]) * x[..., d:] with float math.
// ACT 0: SiLU; 1: GELU (erf); 2: GELU (tanh approximation).
#include "common.cuh"

#ifndef VEC
#define VEC 8
#endif
#ifndef ACT
#define ACT 0
#endif

template <int N> struct __align__(sizeof(scalar_t) * N) Pack { scalar_t e[N]; };
typedef Pack<VEC> pack_t;

__device__ __forceinline__ float act(float x) {
#if ACT == 0
  return x / (1.f + expf(-x));
#elif ACT == 1
  return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
#else
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
#endif
}

// grid (rows, ceil(d / VEC / blockDim.x)); x has row stride x_stride, out is dense [rows, d].
extern "C" __global__ void act_and_mul(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                       i64 x_stride, int d) {
  const i64 row = blockIdx.x;
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= d) return;
  const pack_t gate = *reinterpret_cast<const pack_t*>(x + row * x_stride + i);
  const pack_t up = *reinterpret_cast<const pack_t*>(x + row * x_stride + d + i);
  pack_t o;
#pragma unroll
  for (int v = 0; v < VEC; ++v) o.e[v] = from_float<scalar_t>(act(to_float(gate.e[v])) * to_float(up.e[v]));
  *reinterpret_cast<pack_t*>(out + row * d + i) = o;
}
