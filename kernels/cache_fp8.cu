// KV-cache write for an FP8 (e4m3) cache: cache[slot] = e4m3(x / scale), rounded to nearest even and
// saturated at ±448 (cvt.rn.satfinite, sm_89+), as reference.reshape_and_cache does with scales.
// One CTA per token; each thread converts VEC = 8 values of 16-bit K and V (one 16-byte load each)
// into 8 bytes. Rows [T, Hkv, D] may be strided (slices of a fused QKV); slot -1 writes nothing.
#include "common.cuh"

constexpr int VEC = 8;

__device__ __forceinline__ unsigned pack_e4m3x4(const float* f, float scale) {
  unsigned short lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(f[1] / scale), "f"(f[0] / scale));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(f[3] / scale), "f"(f[2] / scale));
  return (unsigned)lo | ((unsigned)hi << 16);
}

extern "C" __global__ void reshape_and_cache_fp8(
    const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
    unsigned char* __restrict__ key_cache, unsigned char* __restrict__ value_cache,
    const i64* __restrict__ slot_mapping, i64 key_stride, i64 value_stride, int num_kv_heads,
    int head_size, int block_size, float k_scale, float v_scale) {
  const int t = blockIdx.x;
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  const i64 block = slot / block_size;
  const int off = (int)(slot % block_size);
  const int row_chunks = head_size / VEC;
  const int n = num_kv_heads * row_chunks;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / row_chunks, c = i % row_chunks;
    const i64 dst = ((block * num_kv_heads + h) * block_size + off) * head_size + c * VEC;
    float f[VEC];
    unpack16<scalar_t>(ld16(key + t * key_stride + h * head_size + c * VEC), f);
    *reinterpret_cast<uint2*>(key_cache + dst) = uint2{pack_e4m3x4(f, k_scale), pack_e4m3x4(f + 4, k_scale)};
    unpack16<scalar_t>(ld16(value + t * value_stride + h * head_size + c * VEC), f);
    *reinterpret_cast<uint2*>(value_cache + dst) = uint2{pack_e4m3x4(f, v_scale), pack_e4m3x4(f + 4, v_scale)};
  }
}
