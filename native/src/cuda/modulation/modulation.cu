// Fused elementwise kernels of a Flux block's modulated sub-layers, for
// bf16/f16 activations with f32 arithmetic and one rounding per output:
//
// - ln_modulate: y = LayerNorm(x) * (1 + scale) + shift, LayerNorm without
//   affine over each row of H (two-pass mean and variance in f32), scale and
//   shift one row per batch item. Replaces candle's LayerNorm, the `1 + scale`,
//   a broadcast multiply and a broadcast add (four kernels, three full passes
//   over the activations) with one pass.
// - gated_add: out = x + y * gate, gate one row per batch item. Replaces a
//   broadcast multiply and an add (two passes, one intermediate tensor).
//
// x, y, out [B, L, H] and scale, shift, gate [B, H], all contiguous.
// Written for this project; no code copied.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <typename T> __device__ __forceinline__ T cvt(float x);
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half cvt<__half>(float x) { return __float2half(x); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();   // red may still be read by an earlier call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < warps ? red[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// One block per row.
template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, const T* __restrict__ scale, const T* __restrict__ shift,
                            T* __restrict__ out, int H, int rows_per_item, float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const size_t item = row / rows_per_item;
    const T* xr = x + row * H;
    const T* sc = scale + item * H;
    const T* sh = shift + item * H;
    T* orow = out + row * H;
    float s = 0.f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) s += ld(xr + c);
    const float mean = block_sum(s, red) / H;
    float v = 0.f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        const float d = ld(xr + c) - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, red) / H + eps);
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        const float y = (ld(xr + c) - mean) * rstd;
        orow[c] = cvt<T>(y * (1.f + ld(sc + c)) + ld(sh + c));
    }
}

// Grid-stride over all n = B * L * H elements.
template <typename T>
__device__ void gated_add(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                          T* __restrict__ out, size_t n, int H, size_t per_item) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t item = i / per_item;
        const int c = (int)(i % H);
        out[i] = cvt<T>(ld(x + i) + ld(y + i) * ld(gate + item * H + c));
    }
}

extern "C" __global__ void ipaflux_ln_modulate_bf16(const __nv_bfloat16* x, const __nv_bfloat16* scale,
        const __nv_bfloat16* shift, __nv_bfloat16* out, int H, int rows_per_item, float eps) {
    ln_modulate(x, scale, shift, out, H, rows_per_item, eps);
}
extern "C" __global__ void ipaflux_ln_modulate_f16(const __half* x, const __half* scale, const __half* shift,
        __half* out, int H, int rows_per_item, float eps) {
    ln_modulate(x, scale, shift, out, H, rows_per_item, eps);
}
extern "C" __global__ void ipaflux_gated_add_bf16(const __nv_bfloat16* x, const __nv_bfloat16* y,
        const __nv_bfloat16* gate, __nv_bfloat16* out, size_t n, int H, size_t per_item) {
    gated_add(x, y, gate, out, n, H, per_item);
}
extern "C" __global__ void ipaflux_gated_add_f16(const __half* x, const __half* y, const __half* gate, __half* out,
        size_t n, int H, size_t per_item) {
    gated_add(x, y, gate, out, n, H, per_item);
}

// GELU, tanh approximation as PyTorch's `gelu(approximate="tanh")`, of x + bias
// in f32, rounded once: x is R rows of W with row stride S (a narrow of a wider
// tensor: the single blocks' MLP half), bias [W] when has_bias, out [R, W]
// contiguous. Replaces a bias add, two casts and an f32 GELU (four passes).
template <typename T>
__device__ void gelu_tanh(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, size_t rows,
                          int W, size_t S, int has_bias) {
    const size_t n = rows * W;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / W;
        const int c = (int)(i - r * W);
        float v = ld(x + r * S + c);
        if (has_bias) v += ld(bias + c);
        const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);   // sqrt(2/pi) (v + 0.044715 v^3)
        out[i] = cvt<T>(0.5f * v * (1.f + tanhf(u)));
    }
}

extern "C" __global__ void ipaflux_gelu_tanh_bf16(const __nv_bfloat16* x, const __nv_bfloat16* bias,
        __nv_bfloat16* out, size_t rows, int W, size_t S, int has_bias) {
    gelu_tanh(x, bias, out, rows, W, S, has_bias);
}
extern "C" __global__ void ipaflux_gelu_tanh_f16(const __half* x, const __half* bias, __half* out, size_t rows,
        int W, size_t S, int has_bias) {
    gelu_tanh(x, bias, out, rows, W, S, has_bias);
}
