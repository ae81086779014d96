// KV-cache writes and block copies. These move bytes without arithmetic, so
// they work in chunk_t units (CHUNK_BYTES) (16 bytes when alignment allows) whatever the
// element type; sizes and strides below are in chunks.
#include "common.cuh"

#ifndef CHUNK_BYTES
#define CHUNK_BYTES 16
#endif
#if CHUNK_BYTES == 16
typedef uint4 chunk_t;
#elif CHUNK_BYTES == 8
typedef uint2 chunk_t;
#elif CHUNK_BYTES == 4
typedef unsigned int chunk_t;
#elif CHUNK_BYTES == 2
typedef unsigned short chunk_t;
#else
typedef unsigned char chunk_t;
#endif

// Scatter this step's K/V rows [T, Hkv, D] into [num_blocks, Hkv, block_size, D].
// grid (T); slot -1 (CUDA-graph padding) writes nothing.
extern "C" __global__ void reshape_and_cache(
    const chunk_t* __restrict__ key, const chunk_t* __restrict__ value,
    chunk_t* __restrict__ key_cache, chunk_t* __restrict__ value_cache,
    const i64* __restrict__ slot_mapping, i64 key_stride, i64 value_stride,
    int num_kv_heads, int row_chunks, int block_size) {
  const int t = blockIdx.x;
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  const i64 block = slot / block_size;
  const int off = (int)(slot % block_size);
  const int n = num_kv_heads * row_chunks;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / row_chunks, c = i % row_chunks;
    const i64 dst = ((block * num_kv_heads + h) * block_size + off) * row_chunks + c;
    key_cache[dst] = key[t * key_stride + i];
    value_cache[dst] = value[t * value_stride + i];
  }
}

// Copy-on-write: for each (src, dst) pair and each layer's [2, NB, ...] cache,
// copy block src to block dst in both the K and the V half. grid (pairs, layers).
extern "C" __global__ void copy_blocks(
    const i64* __restrict__ layer_ptrs, const i64* __restrict__ pairs,
    i64 half_chunks, int block_chunks) {
  chunk_t* base = reinterpret_cast<chunk_t*>(layer_ptrs[blockIdx.y]);
  const i64 src = pairs[2 * blockIdx.x] * block_chunks;
  const i64 dst = pairs[2 * blockIdx.x + 1] * block_chunks;
  for (int i = threadIdx.x; i < block_chunks; i += blockDim.x) {
    base[dst + i] = base[src + i];
    base[half_chunks + dst + i] = base[half_chunks + src + i];
  }
}
