// The softmax of the IP-Adapter's term computed by cuBLAS (mod.rs): rows of
// f32 scores, already scaled by 1/sqrt(D), into probabilities in the
// activations' dtype (bf16/f16), one rounding per output, as a fused
// attention rounds its probabilities before the product with V.
//
// One warp per row: the row's maximum and the sum of exp(x - max) by warp
// shuffles, then each probability written once. Rows of any length (the
// IP-Adapter's are 128 image tokens: 4 elements a lane); the row is read
// three times, from L1/L2 after the first. Written for this project.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ T to_out(float x);
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half to_out<__half>(float x) { return __float2half(x); }

// s [rows, n] f32 -> p [rows, n]; blockDim.x a multiple of 32.
template <typename T>
__device__ void softmax_rows(const float* __restrict__ s, T* __restrict__ p, long long rows, int n) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;   // uniform per warp: whole warps leave
    const int lane = threadIdx.x % 32;
    const float* x = s + row * n;
    float m = -INFINITY;
    for (int c = lane; c < n; c += 32) m = fmaxf(m, x[c]);
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int c = lane; c < n; c += 32) sum += expf(x[c] - m);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.f / sum;
    T* y = p + row * n;
    for (int c = lane; c < n; c += 32) y[c] = to_out<T>(expf(x[c] - m) * inv);
}

extern "C" __global__ void ipaflux_softmax_rows_bf16(const float* s, __nv_bfloat16* p, long long rows, int n) {
    softmax_rows(s, p, rows, n);
}
extern "C" __global__ void ipaflux_softmax_rows_f16(const float* s, __half* p, long long rows, int n) {
    softmax_rows(s, p, rows, n);
}
