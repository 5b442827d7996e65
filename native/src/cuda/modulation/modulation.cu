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
// x, y, out [B, L, H] and scale, shift, gate [B, H], all contiguous. Each
// kernel has a 16-byte path for widths that are multiples of 8 (below).
// Also: bias + GELU-tanh, and the attention inputs from a QKV projection
// (qkv_rope, below). Written for this project; no code copied.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../store16.cuh"

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <typename T> __device__ __forceinline__ T cvt(float x);
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half cvt<__half>(float x) { return __float2half(x); }
// x rounded to T and back (where the reference rounds between two ops).
template <typename T> __device__ __forceinline__ float rnd(float x) {
    const T v = cvt<T>(x);
    return ld(&v);
}

// The 16-byte paths (session 14). The scalar loops load and store 2 bytes an
// element and, in gated_add and gelu_tanh, divide 64-bit indices per element:
// session 11's ncu put these kernels at 0.2-0.4 ms per Flux block pair, 3-4x
// their bytes at the H200's bandwidth. Where widths are multiples of 8 and
// pointers 16-byte aligned (every Flux shape), each thread moves 8 elements
// with one 16-byte access and one 32-bit division; the arithmetic per element
// is unchanged (gated_add and gelu_tanh give the same bits; ln_modulate sums in
// another order). Other shapes take the scalar loops.
__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

// Eight T at p (16-byte aligned) as floats.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[8];
    memcpy(e, &raw, sizeof raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = ld(e + i);
}

// f rounded to T, stored as one 16-byte store at p (16-byte aligned).
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = cvt<T>(f[i]);
    uint4 v;
    memcpy(&v, e, sizeof v);
    store16(p, v);
}

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

// Vectors of 8 a thread keeps in registers in ln_modulate's 16-byte path:
// rows up to 8 * LN_VECS * blockDim.x (8192 at 256 threads).
#define LN_VECS 4

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
    // Uniform over the block (block_sum needs every thread).
    if (H % 8 == 0 && H / 8 <= LN_VECS * (int)blockDim.x && aligned16(xr) && aligned16(sc) && aligned16(sh) &&
        aligned16(orow)) {
        const int hv = H / 8;
        float xs[LN_VECS][8];
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < LN_VECS; ++j) {
            const int v = threadIdx.x + j * blockDim.x;
            if (v >= hv) continue;
            load8(xr + 8 * v, xs[j]);
#pragma unroll
            for (int i = 0; i < 8; ++i) s += xs[j][i];
        }
        const float mean = block_sum(s, red) / H;
        float q = 0.f;
#pragma unroll
        for (int j = 0; j < LN_VECS; ++j) {
            if ((int)threadIdx.x + j * (int)blockDim.x >= hv) continue;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float d = xs[j][i] - mean;
                q += d * d;
            }
        }
        const float rstd = rsqrtf(block_sum(q, red) / H + eps);
#pragma unroll
        for (int j = 0; j < LN_VECS; ++j) {
            const int v = threadIdx.x + j * blockDim.x;
            if (v >= hv) continue;
            float a[8], b[8], y[8];
            load8(sc + 8 * v, a);
            load8(sh + 8 * v, b);
#pragma unroll
            for (int i = 0; i < 8; ++i) y[i] = (xs[j][i] - mean) * rstd * (1.f + a[i]) + b[i];
            store8(orow + 8 * v, y);
        }
        return;
    }
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

// Grid-stride over all n = B * L * H elements; bias [H] read when has_bias
// (the bias of the linear layer that made y: out = x + (y + bias) * gate,
// replacing candle's broadcast bias add, one more pass).
template <typename T>
__device__ void gated_add(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ bias,
                          const T* __restrict__ gate, T* __restrict__ out, size_t n, int H, size_t per_item,
                          int has_bias) {
    if (H % 8 == 0 && n / 8 < (1u << 31) && aligned16(x) && aligned16(y) && aligned16(gate) && aligned16(out) &&
        (!has_bias || aligned16(bias))) {
        const unsigned nv = (unsigned)(n / 8), hv = (unsigned)H / 8, pv = (unsigned)(per_item / 8);
        for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < nv; v += gridDim.x * blockDim.x) {
            const unsigned item = v / pv, c = (v % hv) * 8;
            float a[8], b[8], g[8], bb[8], o[8];
            load8(x + 8 * (size_t)v, a);
            load8(y + 8 * (size_t)v, b);
            load8(gate + (size_t)item * H + c, g);
            if (has_bias) load8(bias + c, bb);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = a[i] + (has_bias ? b[i] + bb[i] : b[i]) * g[i];
            store8(out + 8 * (size_t)v, o);
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t item = i / per_item;
        const int c = (int)(i % H);
        const float yb = has_bias ? ld(y + i) + ld(bias + c) : ld(y + i);
        out[i] = cvt<T>(ld(x + i) + yb * ld(gate + item * H + c));
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
        const __nv_bfloat16* bias, const __nv_bfloat16* gate, __nv_bfloat16* out, size_t n, int H, size_t per_item,
        int has_bias) {
    gated_add(x, y, bias, gate, out, n, H, per_item, has_bias);
}
extern "C" __global__ void ipaflux_gated_add_f16(const __half* x, const __half* y, const __half* bias,
        const __half* gate, __half* out, size_t n, int H, size_t per_item, int has_bias) {
    gated_add(x, y, bias, gate, out, n, H, per_item, has_bias);
}

// GELU, tanh approximation as PyTorch's `gelu(approximate="tanh")`, of x + bias
// in f32, rounded once: x is R rows of W with row stride S (a narrow of a wider
// tensor: the single blocks' MLP half), bias [W] when has_bias. out [R, A + W]
// contiguous: with A > 0 each output row starts with the A values of `head`'s
// row (head [R, A] contiguous; the single blocks' attention output, so `out`
// is linear2's input without a concatenation pass), then the GELU's W. Replaces
// a bias add, two casts and an f32 GELU (four passes), and the concatenation.
__device__ __forceinline__ float gelu_tanh_of(float v) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);   // sqrt(2/pi) (v + 0.044715 v^3)
    return 0.5f * v * (1.f + tanhf(u));
}

template <typename T>
__device__ void gelu_tanh(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, size_t rows,
                          int W, size_t S, int has_bias, const T* __restrict__ head, int A) {
    const int OW = A + W;
    const size_t n = rows * OW;
    if (W % 8 == 0 && A % 8 == 0 && S % 8 == 0 && n / 8 < (1u << 31) && aligned16(x) && aligned16(out) &&
        (!has_bias || aligned16(bias)) && (A == 0 || aligned16(head))) {
        const unsigned nv = (unsigned)(n / 8), owv = (unsigned)OW / 8;
        for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < nv; v += gridDim.x * blockDim.x) {
            const unsigned r = v / owv, c = (v - r * owv) * 8;
            float a[8], b[8];
            if (c < (unsigned)A) {
                load8(head + (size_t)r * A + c, a);
            } else {
                load8(x + (size_t)r * S + (c - A), a);
                if (has_bias) load8(bias + (c - A), b);
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] = gelu_tanh_of(has_bias ? a[i] + b[i] : a[i]);
            }
            store8(out + 8 * (size_t)v, a);
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / OW;
        const int c = (int)(i - r * OW);
        if (c < A) {
            out[i] = head[r * A + c];
            continue;
        }
        float v = ld(x + r * S + (c - A));
        if (has_bias) v += ld(bias + (c - A));
        out[i] = cvt<T>(gelu_tanh_of(v));
    }
}

extern "C" __global__ void ipaflux_gelu_tanh_bf16(const __nv_bfloat16* x, const __nv_bfloat16* bias,
        __nv_bfloat16* out, size_t rows, int W, size_t S, int has_bias, const __nv_bfloat16* head, int A) {
    gelu_tanh(x, bias, out, rows, W, S, has_bias, head, A);
}
extern "C" __global__ void ipaflux_gelu_tanh_f16(const __half* x, const __half* bias, __half* out, size_t rows,
        int W, size_t S, int has_bias, const __half* head, int A) {
    gelu_tanh(x, bias, out, rows, W, S, has_bias, head, A);
}

// Attention inputs of one token stream from its QKV projection made without
// the bias, in one pass instead of candle's bias add, three strided copies
// (the split), two RMSNorms, a concatenation with the other stream and two
// RoPE kernels:
//   x = qkv + bias (rounded to T, as the reference's bias add);
//   q, k: RMSNorm over each head's D values with scale [D] (rounded to T),
//         then RoPE on consecutive pairs by the token's angles (f32);
//   v: x.
// qkv: R = B * L rows of 3 * H * D, row r at qkv + r * row_stride (a narrow
// of a wider row: the single blocks' linear1); bias [3 * H * D] when
// has_bias; cos, sin f32 [L_total, D / 2]; out [P, B, H, L_total, D] with
// P = 3 (q, k, v), or 4 with keep_q (slot 3: q normed, before RoPE, for the
// attention hooks). This stream's tokens are rows offset .. offset + L of the
// concatenation. One warp per (row, head); lane i holds pairs i, i + 32, ...
// (D even, D <= 256). Written for this project; no code copied.
#define QKV_MAX_PAIRS_PER_LANE 4

// A pair of consecutive T at p as floats: one 4-byte access when `word`
// (p 4-byte aligned), else two 2-byte ones. Same values either way.
template <typename T> __device__ __forceinline__ void ld_pair(const T* p, bool word, float& a, float& b) {
    if (word) {
        const unsigned w = *reinterpret_cast<const unsigned*>(p);
        T e[2];
        memcpy(e, &w, sizeof w);
        a = ld(e);
        b = ld(e + 1);
    } else {
        a = ld(p);
        b = ld(p + 1);
    }
}

template <typename T> __device__ __forceinline__ void st_pair(T* p, bool word, float a, float b) {
    if (word) {
        T e[2] = {cvt<T>(a), cvt<T>(b)};
        unsigned w;
        memcpy(&w, e, sizeof w);
        *reinterpret_cast<unsigned*>(p) = w;
    } else {
        p[0] = cvt<T>(a);
        p[1] = cvt<T>(b);
    }
}

__device__ __forceinline__ bool aligned4(const void* p) { return ((size_t)p & 3) == 0; }

template <typename T>
__device__ void qkv_rope(const T* __restrict__ qkv, const T* __restrict__ bias, const T* __restrict__ q_scale,
                         const T* __restrict__ k_scale, const float* __restrict__ cos_t,
                         const float* __restrict__ sin_t, T* __restrict__ out, int R, int L, int H, int D,
                         size_t row_stride, int has_bias, int offset, int L_total, int B, int keep_q, float eps) {
    const long long task = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (task >= (long long)R * H) return;   // uniform per warp: whole warps leave
    const int lane = threadIdx.x % 32;
    const int r = (int)(task / H), h = (int)(task % H);
    const int b = r / L, t = offset + r % L;
    const int half = D / 2;
    const T* src = qkv + (size_t)r * row_stride;
    const size_t plane = (size_t)B * H * L_total * D;
    const size_t dst = (((size_t)b * H + h) * L_total + t) * D;
    // Pairs start at even elements (D even): one 4-byte access each where
    // rows and pointers allow (every Flux shape; session 14), else 2-byte ones.
    const bool word = row_stride % 2 == 0 && aligned4(qkv) && (!has_bias || aligned4(bias)) && aligned4(q_scale) &&
                      aligned4(k_scale) && aligned4(out);
    for (int part = 0; part < 3; ++part) {
        const int base = (part * H + h) * D;
        float x[2 * QKV_MAX_PAIRS_PER_LANE];
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < QKV_MAX_PAIRS_PER_LANE; ++i) {
            const int c = 2 * (lane + 32 * i);
            x[2 * i] = x[2 * i + 1] = 0.f;
            if (c < D) {
                float a, e;
                ld_pair(src + base + c, word, a, e);
                if (has_bias) {
                    float ba, be;
                    ld_pair(bias + base + c, word, ba, be);
                    a = rnd<T>(a + ba);
                    e = rnd<T>(e + be);
                }
                x[2 * i] = a;
                x[2 * i + 1] = e;
                ss += a * a + e * e;
            }
        }
        T* o = out + part * plane + dst;
        if (part == 2) {
#pragma unroll
            for (int i = 0; i < QKV_MAX_PAIRS_PER_LANE; ++i) {
                const int c = 2 * (lane + 32 * i);
                if (c < D) st_pair(o + c, word, x[2 * i], x[2 * i + 1]);
            }
            continue;
        }
        for (int s = 16; s > 0; s >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, s);
        const float rstd = rsqrtf(ss / D + eps);
        const T* scale = part == 0 ? q_scale : k_scale;
        T* pre = out + 3 * plane + dst;
#pragma unroll
        for (int i = 0; i < QKV_MAX_PAIRS_PER_LANE; ++i) {
            const int p = lane + 32 * i, c = 2 * p;
            if (c < D) {
                float s0, s1;
                ld_pair(scale + c, word, s0, s1);
                const float y0 = rnd<T>(x[2 * i] * rstd * s0);
                const float y1 = rnd<T>(x[2 * i + 1] * rstd * s1);
                if (part == 0 && keep_q) st_pair(pre + c, word, y0, y1);
                const float cs = cos_t[(size_t)t * half + p], sn = sin_t[(size_t)t * half + p];
                st_pair(o + c, word, y0 * cs - y1 * sn, y0 * sn + y1 * cs);
            }
        }
    }
}

extern "C" __global__ void ipaflux_qkv_rope_bf16(const __nv_bfloat16* qkv, const __nv_bfloat16* bias,
        const __nv_bfloat16* q_scale, const __nv_bfloat16* k_scale, const float* cos_t, const float* sin_t,
        __nv_bfloat16* out, int R, int L, int H, int D, size_t row_stride, int has_bias, int offset, int L_total,
        int B, int keep_q, float eps) {
    qkv_rope(qkv, bias, q_scale, k_scale, cos_t, sin_t, out, R, L, H, D, row_stride, has_bias, offset, L_total, B,
             keep_q, eps);
}
extern "C" __global__ void ipaflux_qkv_rope_f16(const __half* qkv, const __half* bias, const __half* q_scale,
        const __half* k_scale, const float* cos_t, const float* sin_t, __half* out, int R, int L, int H, int D,
        size_t row_stride, int has_bias, int offset, int L_total, int B, int keep_q, float eps) {
    qkv_rope(qkv, bias, q_scale, k_scale, cos_t, sin_t, out, R, L, H, D, row_stride, has_bias, offset, L_total, B,
             keep_q, eps);
}
