// Fused attention forward for bf16/f16 on tensor cores (WMMA), no score matrix
// in global memory: per block BR query rows of one (batch, head), looping over
// key tiles of BC with the online softmax of FlashAttention-2 (Dao, 2023,
// "FlashAttention-2: Faster Attention with Better Parallelism"): running row
// max m and sum l in f32, output rescaled by exp(m_old - m_new) per tile,
// P rounded to the input type before P·V (as FlashAttention does), O in f32.
//
// q [BH, L, D], k/v [BH, S, D], o [BH, L, D], all contiguous. D <= 128; the
// tiles are zero-padded to DP (D rounded up to 16), so any head size works
// (SigLIP so400m: 72). Shared-memory rows are padded (LD* = width + 16 bytes)
// so that the WMMA tile loads and the per-row softmax hit distinct banks; Q's
// fragments stay in registers for the whole key loop; global loads are 16
// bytes wide when D % 8 == 0 and the pointers are aligned (`vec`).
// Written for this project; no code copied.
// IPAFLUX_HOST_EMULATION (host_emulation.cpp): compiled for the host, with
// the inline PTX below replaced by the emulator's functions and version 1
// (WMMA) left out.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../store16.cuh"
#ifndef IPAFLUX_HOST_EMULATION
#include <mma.h>
using namespace nvcuda;
#define IPAFLUX_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#define BR 64       // query rows per block: 4 warps x 16 rows
#define BC 64       // keys per tile
#define THREADS 128
#define MAX_K16 8   // DP / 16 at most (D <= 128)

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Copies rows [r0, r0 + rows) of a [n, D] matrix into a [rows, DP] tile with
// row stride ld, zero outside. vec: 8 elements (16 bytes) per load. NT:
// the block's threads, which share the copy.
template <typename T, int NT = THREADS>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, int r0, int rows, int n,
                                          int D, int DP, bool vec) {
    if (vec) {
        const int cpr = DP / 8;
        for (int i = threadIdx.x; i < rows * cpr; i += NT) {
            const int r = i / cpr, c = (i - r * cpr) * 8, g = r0 + r;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (g < n && c < D) val = *reinterpret_cast<const uint4*>(src + (size_t)g * D + c);
            *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
        }
    } else {
        const T zero = from_f<T>(0.f);
        for (int i = threadIdx.x; i < rows * DP; i += NT) {
            const int r = i / DP, c = i - r * DP, g = r0 + r;
            dst[r * ld + c] = (g < n && c < D) ? src[(size_t)g * D + c] : zero;
        }
    }
}

#ifndef IPAFLUX_HOST_EMULATION
template <typename T>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          T* __restrict__ o, int L, int S, int D, int DP, float scale_log2, int vec_loads) {
    const int LDT = DP + 8;    // bf16/f16 tiles (Q staging, K, V)
    const int LDS = BC + 4;    // f32 scores
    const int LDP = BC + 8;    // probabilities
    const int LDO = DP + 4;    // f32 output accumulator
    extern __shared__ __align__(128) unsigned char smem[];
    T* Ks = reinterpret_cast<T*>(smem);                   // BC x LDT (first holds the Q tile)
    T* Vs = Ks + BC * LDT;                                 // BC x LDT
    float* Ss = reinterpret_cast<float*>(Vs + BC * LDT);   // BR x LDS
    T* Ps = reinterpret_cast<T*>(Ss + BR * LDS);           // BR x LDP
    float* Os = reinterpret_cast<float*>(Ps + BR * LDP);   // BR x LDO

    const bool vec = vec_loads != 0;
    const int bh = blockIdx.y, row0 = blockIdx.x * BR;
    const T* qb = q + (size_t)bh * L * D;
    const T* kb = k + (size_t)bh * S * D;
    const T* vb = v + (size_t)bh * S * D;
    T* ob = o + (size_t)bh * L * D;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16;        // this warp's first row in the tile
    const int r = lane >> 1;         // two lanes per row for the softmax
    const int half = lane & 1;       // which half of the BC columns
    const int nk = DP / 16;

    // Q tile through shared memory into registers, once.
    load_tile(Ks, LDT, qb, row0, BR, L, D, DP, vec);
    for (int i = threadIdx.x; i < BR * LDO; i += THREADS) Os[i] = 0.f;
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[MAX_K16];
#pragma unroll
    for (int kk = 0; kk < MAX_K16; ++kk)
        if (kk < nk) wmma::load_matrix_sync(qf[kk], Ks + wr * LDT + kk * 16, LDT);
    __syncthreads();

    float* Sw = Ss + wr * LDS;
    T* Pw = Ps + wr * LDP;
    float* Ow = Os + wr * LDO;
    float m = -INFINITY, l = 0.f;    // row max (scaled, log2 domain) and row sum

    for (int s0 = 0; s0 < S; s0 += BC) {
        load_tile(Ks, LDT, kb, s0, BC, S, D, DP, vec);
        load_tile(Vs, LDT, vb, s0, BC, S, D, DP, vec);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
#pragma unroll
        for (int j = 0; j < BC / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < MAX_K16; ++kk) {
                if (kk < nk) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(b, Ks + j * 16 * LDT + kk * 16, LDT);
                    wmma::mma_sync(acc, qf[kk], b, acc);
                }
            }
            wmma::store_matrix_sync(Sw + j * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax of row r over this tile's valid columns.
        const int valid = min(BC, S - s0);
        const float* srow = Sw + r * LDS;
        float mx = -INFINITY;
        for (int c = half * 32; c < half * 32 + 32; ++c)
            if (c < valid) mx = fmaxf(mx, srow[c]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m, mx * scale_log2);
        const float alpha = exp2f(m - m_new);
        float sum = 0.f;
        T* prow = Pw + r * LDP;
        for (int c = half * 32; c < half * 32 + 32; ++c) {
            const float p = c < valid ? exp2f(srow[c] * scale_log2 - m_new) : 0.f;
            prow[c] = from_f<T>(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        float* orow = Ow + r * LDO;
        for (int c = half; c < DP; c += 2) orow[c] *= alpha;
        __syncwarp();

        // O += P V.
        for (int n = 0; n < nk; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, Ow + n * 16, LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, Pw + kk * 16, LDP);
                wmma::load_matrix_sync(b, Vs + kk * 16 * LDT + n * 16, LDT);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Ow + n * 16, acc, LDO, wmma::mem_row_major);
        }
        __syncthreads();   // K/V tiles are overwritten next
    }

    const int g = row0 + wr + r;
    if (g < L) {
        const float inv = 1.f / l;
        for (int c = half; c < D; c += 2) ob[(size_t)g * D + c] = from_f<T>(Ow[r * LDO + c] * inv);
    }
}

#ifndef IPAFLUX_WGMMA_ONLY
extern "C" __global__ void __launch_bounds__(THREADS)
ipaflux_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                       __nv_bfloat16* o, int L, int S, int D, int DP, float scale_log2, int vec_loads) {
    attention<__nv_bfloat16>(q, k, v, o, L, S, D, DP, scale_log2, vec_loads);
}

extern "C" __global__ void __launch_bounds__(THREADS)
ipaflux_attention_f16(const __half* q, const __half* k, const __half* v, __half* o,
                      int L, int S, int D, int DP, float scale_log2, int vec_loads) {
    attention<__half>(q, k, v, o, L, S, D, DP, scale_log2, vec_loads);
}
#endif  // IPAFLUX_WGMMA_ONLY
#endif  // IPAFLUX_HOST_EMULATION: version 1

// ---------------------------------------------------------------------------
// Version 2 (`mma`): the same algorithm with every per-tile intermediate in
// registers, after FlashAttention-2's layout: each warp owns 16 query rows;
// S = Q Kᵀ is accumulated by `mma.sync.m16n8k16` into fragments whose layout
// is exactly the A operand of the following P·V product, so scores and
// probabilities never touch shared memory, and the output accumulator stays
// in registers for the whole key loop (version 1 stores S, P and O to shared
// memory every tile). Operands come from shared memory through `ldmatrix`
// (K as stored, V transposed by `.trans`). Row statistics of a fragment row
// live in the 4 lanes of a quad and are combined with two shuffles.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16".
// ---------------------------------------------------------------------------

// Query rows per block: 16 per warp (4 warps in versions 3 and 4, 8 in 5; 32 per
// warp in 6).
#define BC2 64      // keys per tile
#define MAX_D8 16   // DP / 8 at most (D <= 128)

#ifndef IPAFLUX_HOST_EMULATION
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x2(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col), f32 accumulate.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // IPAFLUX_HOST_EMULATION: ldmatrix, mma

// Two floats rounded to T, the lower column in the low half (fragment order).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// pack2's inverse: the two T of a word as floats (low half first).
template <typename T> __device__ __forceinline__ float2 unpack2(unsigned w);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned w) {
    __nv_bfloat162 v;
    memcpy(&v, &w, sizeof v);
    return __bfloat1622float2(v);
}
template <> __device__ __forceinline__ float2 unpack2<__half>(unsigned w) {
    __half2 v;
    memcpy(&v, &w, sizeof v);
    return __half22float2(v);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#ifndef IPAFLUX_HOST_EMULATION
// cp.async (sm_80+): 16 bytes global -> shared without passing through
// registers; with valid = false the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// 2^x on the special-function unit (ex2.approx.ftz: about 2 ulp; 2^-inf = 0),
// where exp2f's accurate path takes several instructions.
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#endif  // IPAFLUX_HOST_EMULATION: cp.async, ex2.approx

template <bool FAST> __device__ __forceinline__ float exp2_(float x) { return FAST ? ex2_approx(x) : exp2f(x); }

// load_tile's 16-byte path issued as cp.async (the caller commits and waits).
// 16 threads a row, each one 16-byte chunk of it (DP <= 128 is at most 16
// chunks; the lanes past DP / 8 copy nothing), rows NT / 16 apart: no
// division per chunk (one was an eighth of the key loop's instructions,
// `scripts/kernel-sass.sh`), and with `rows` a constant the loop unrolls.
template <typename T, int NT>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* __restrict__ src, int r0, int rows, int n,
                                                int D, int DP) {
    const int col = (threadIdx.x % 16) * 8;
    if (col >= DP) return;
#pragma unroll
    for (int r = threadIdx.x / 16; r < rows; r += NT / 16) {
        const int g = r0 + r;
        const bool ok = g < n && col < D;
        cp_async16(dst + r * ld + col, ok ? src + (size_t)g * D + col : src, ok);
    }
}

// The online softmax of one warp's 16-row fragment for one key tile
// (FlashAttention-2): scores `sacc` (C fragments, rows g and g + 8) of keys
// past `valid` masked, the running maxima m0, m1 (log2 domain) and this
// lane's sums l0, l1 updated, the output accumulator rescaled, and P rounded
// to T as A fragments in `pa`. t: the lane's fragment column pair. FAST:
// 2^x by ex2.approx (versions 4 to 6).
template <typename T, bool FAST>
__device__ __forceinline__ void softmax_tile(float (&sacc)[BC2 / 8][4], int valid, int t, float scale_log2, float& m0,
                                             float& m1, float& l0, float& l1, float (&oacc)[MAX_D8][4],
                                             unsigned (&pa)[BC2 / 16][4]) {
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < BC2 / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (j * 8 + 2 * t + e < valid) {
                mx0 = fmaxf(mx0, sacc[j][e]);
                mx1 = fmaxf(mx1, sacc[j][2 + e]);
            } else {
                sacc[j][e] = -INFINITY;
                sacc[j][2 + e] = -INFINITY;
            }
        }
    }
    const float mn0 = fmaxf(m0, quad_max(mx0) * scale_log2);
    const float mn1 = fmaxf(m1, quad_max(mx1) * scale_log2);
    const float alpha0 = exp2_<FAST>(m0 - mn0), alpha1 = exp2_<FAST>(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < BC2 / 8; ++j) {
        const float p0 = exp2_<FAST>(sacc[j][0] * scale_log2 - mn0), p1 = exp2_<FAST>(sacc[j][1] * scale_log2 - mn0);
        const float p2 = exp2_<FAST>(sacc[j][2] * scale_log2 - mn1), p3 = exp2_<FAST>(sacc[j][3] * scale_log2 - mn1);
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        pa[j / 2][(j & 1) * 2 + 0] = pack2<T>(p0, p1);   // row g
        pa[j / 2][(j & 1) * 2 + 1] = pack2<T>(p2, p3);   // row g + 8
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int n = 0; n < MAX_D8; ++n) {
        oacc[n][0] *= alpha0;
        oacc[n][1] *= alpha0;
        oacc[n][2] *= alpha1;
        oacc[n][3] *= alpha1;
    }
}

// O += P V for a warp's MT 16-row tiles and one key tile: B fragments of V
// through ldmatrix.trans (two 8-column tiles a load), each into every row
// tile. lm, lr: this lane's ldmatrix matrix and row; nd: 8-wide output
// column tiles (even).
template <typename T, int MT>
__device__ __forceinline__ void pv_tile(const T* Vs, int LDT, int lm, int lr, int nd,
                                        const unsigned (&pa)[MT][BC2 / 16][4], float (&oacc)[MT][MAX_D8][4]) {
#pragma unroll
    for (int kc = 0; kc < BC2 / 16; ++kc) {
        const T* vrow = Vs + (kc * 16 + (lm & 1) * 8 + lr) * LDT + (lm >> 1) * 8;
#pragma unroll
        for (int n = 0; n < MAX_D8; n += 2) {
            if (n < nd) {
                unsigned b[4];
                ldsm_x4_trans(b, vrow + n * 8);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    mma16816<T>(oacc[m][n], pa[m][kc], b[0], b[1]);
                    mma16816<T>(oacc[m][n + 1], pa[m][kc], b[2], b[3]);
                }
            }
        }
    }
}

// One warp's share of a softmax attention over key tiles (versions 3 to 5):
// its 16 query rows are `qf` (A fragments); K/V `[S, D]` tiles go through the
// shared memory at `Ks`. Leaves O unnormalised in `oacc` (C fragments: rows g
// and g + 8, columns n·8 + 2t, +1) and this lane's part of the row sums in l0,
// l1 (quad_sum gives the row's). Ends in a barrier, so `Ks` may be reused.
//
// PIPE (version 4): K/V tiles double-buffered with cp.async, the next tile's
// copy in flight while this one is multiplied (needs the 16-byte path,
// vec = true), shared memory [K0, V0, K1, V1], and the softmax's 2^x on the
// special-function unit (ex2.approx). Without PIPE: [K, V], loaded
// synchronously, exp2f (version 3). NT: the block's threads, which share the
// tile loads (the warps' count does not change what one warp does).
template <typename T, bool PIPE, int NT>
__device__ __forceinline__ void softmax_pv(const unsigned (&qf)[MAX_K16][4], const T* __restrict__ kb,
                                           const T* __restrict__ vb, int S, int D, int DP, float scale_log2,
                                           T* Ks, int LDT, bool vec, float (&oacc)[MAX_D8][4], float& l0, float& l1) {
    const int lane = threadIdx.x % 32;
    const int t = lane & 3;                    // fragment column pair
    const int lm = lane >> 3, lr = lane & 7;   // ldmatrix: which 8x8 matrix this lane addresses, which row
    const int nk = DP / 16;                    // 16-wide chunks of the head dimension
    const int nd = DP / 8;                     // 8-wide output column tiles (even)

#pragma unroll
    for (int n = 0; n < MAX_D8; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
    // Rows g and g + 8 of this warp: running max (log2 domain) and this lane's part of the sum.
    float m0 = -INFINITY, m1 = -INFINITY;
    l0 = l1 = 0.f;

    const int stage = 2 * BC2 * LDT;   // elements of one K + V pair
    if (PIPE) {
        load_tile_async<T, NT>(Ks, LDT, kb, 0, BC2, S, D, DP);
        load_tile_async<T, NT>(Ks + BC2 * LDT, LDT, vb, 0, BC2, S, D, DP);
        cp_async_commit();
    }
    for (int s0 = 0, it = 0; s0 < S; s0 += BC2, ++it) {
        T* Kc = PIPE ? Ks + (it & 1) * stage : Ks;
        T* Vs = Kc + BC2 * LDT;
        if (PIPE) {
            if (s0 + BC2 < S) {
                // The other stage was last read in the previous iteration, which ended in a barrier.
                T* Kn = Ks + ((it + 1) & 1) * stage;
                load_tile_async<T, NT>(Kn, LDT, kb, s0 + BC2, BC2, S, D, DP);
                load_tile_async<T, NT>(Kn + BC2 * LDT, LDT, vb, s0 + BC2, BC2, S, D, DP);
                cp_async_commit();
                cp_async_wait<1>();   // this tile's group is complete, the next one may be in flight
            } else {
                cp_async_wait<0>();
            }
        } else {
            load_tile<T, NT>(Kc, LDT, kb, s0, BC2, S, D, DP, vec);
            load_tile<T, NT>(Vs, LDT, vb, s0, BC2, S, D, DP, vec);
        }
        __syncthreads();

        // S = Q Kᵀ: 8 tiles of 8 keys. B fragments of K straight from its rows.
        float sacc[BC2 / 8][4];
#pragma unroll
        for (int j = 0; j < BC2 / 8; ++j) {
            sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.f;
            const T* krow = Kc + (j * 8 + lr) * LDT + lm * 8;
#pragma unroll
            for (int kk = 0; kk < MAX_K16; kk += 2) {
                if (kk + 1 < nk) {
                    unsigned b[4];
                    ldsm_x4(b, krow + kk * 16);
                    mma16816<T>(sacc[j], qf[kk], b[0], b[1]);
                    mma16816<T>(sacc[j], qf[kk + 1], b[2], b[3]);
                } else if (kk < nk) {
                    unsigned b[4];
                    ldsm_x2(b, krow + kk * 16);
                    mma16816<T>(sacc[j], qf[kk], b[0], b[1]);
                }
            }
        }

        // Online softmax; keys past S are masked.
        unsigned pa[1][BC2 / 16][4];   // P as A fragments: 4 chunks of 16 keys
        softmax_tile<T, PIPE>(sacc, S - s0, t, scale_log2, m0, m1, l0, l1, oacc, pa[0]);
        // One 16-row tile: oacc as an array of one.
        pv_tile<T, 1>(Vs, LDT, lm, lr, nd, pa, reinterpret_cast<float(&)[1][MAX_D8][4]>(oacc));
        __syncthreads();   // K/V tiles are overwritten next
    }
}

// The Q tile of rows [row0, row0 + 16·WARPS) of `qb [L, D]` into this warp's
// A fragments (its 16 rows), staged through `Ks`; ends in a barrier.
template <typename T, int WARPS>
__device__ __forceinline__ void load_q(unsigned (&qf)[MAX_K16][4], const T* __restrict__ qb, int row0, int L, int D,
                                       int DP, T* Ks, int LDT, bool vec) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int lm = lane >> 3, lr = lane & 7;
    const int nk = DP / 16;
    load_tile<T, 32 * WARPS>(Ks, LDT, qb, row0, 16 * WARPS, L, D, DP, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < MAX_K16; ++kk)
        if (kk < nk) ldsm_x4(qf[kk], Ks + (warp * 16 + (lm & 1) * 8 + lr) * LDT + kk * 16 + (lm >> 1) * 8);
    __syncthreads();
}

// f(row, index in o, value) for each accumulator element of this lane in a
// warp's 16-row fragment `acc` whose first row is `ra` (rows < L, columns <
// D): rows ra + g scaled by s0, ra + g + 8 by s1. Element (row, column) of
// (batch, head) bh in o's layout: [BH, L, D], or [B, L, H, D] when merged.
template <typename F>
__device__ __forceinline__ void each_element(const float (&acc)[MAX_D8][4], int ra, float s0, float s1, int L, int D,
                                             int nd, int bh, int H, int merged, F&& f) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int ga = ra + g, gb = ga + 8;
    const int bi = bh / H, hi = bh - bi * H;
    const size_t row_step = merged ? (size_t)H * D : (size_t)D;
    const size_t first = merged ? ((size_t)bi * L * H + hi) * D : (size_t)bh * L * D;
#pragma unroll
    for (int n = 0; n < MAX_D8; ++n) {
        const int c = n * 8 + 2 * t;
        if (n >= nd || c >= D) continue;
        for (int e = 0; e < 2 && c + e < D; ++e) {
            if (ga < L) f(ga, first + (size_t)ga * row_step + c + e, acc[n][e] * s0);
            if (gb < L) f(gb, first + (size_t)gb * row_step + c + e, acc[n][2 + e] * s1);
        }
    }
}

// Versions 3, 4 and 5: softmax_pv over the whole key sequence, then the
// epilogue. WARPS: 4 (versions 3 and 4, 64 rows a block) or 8 (version 5,
// 128 rows: each K/V tile read from global memory serves twice the rows, so
// the L2→SM traffic of a call halves: 4608² at D = 128 reads 4.1 GB of K/V
// with 64-row blocks, 0.75 ms at an assumed 5.5 TB/s of L2 bandwidth, not
// measured here; each warp's work is the same). Shared memory is the same:
// the 128-row Q tile fits the space of the K/V pair it is staged through.
//
// Epilogue: with merged = 0, o [BH, L, D]; with merged = 1, o [B, L, H, D]
// (heads merged: the layout the output projection reads, so no transpose copy
// follows); with has_base, o = base + out_scale * attention, base in o's
// layout (an attention output that an IP-Adapter term is added to).
//
// IP (the `_ip` entry points; has_ip = 1): the IP-Adapter's term fused into
// the block's attention. Rows r >= ip_row0 also get
// ip_scale * softmax(q_ip[r] k_ipᵀ/√D) v_ip, with q_ip [BH, L, D] (the
// pre-RoPE query), k_ip, v_ip [BH, S_ip, D]. After storing its own result the
// block loads its q_ip tile and runs a second softmax over the S_ip keys,
// then adds the scaled term to the values it stored (each thread re-reads
// only elements it wrote itself, so no synchronisation is needed, and the
// rounding is that of attention followed by a separate base + s·attention
// launch). What is saved is that launch, its Q tile load and its transposes.
// A template parameter, so the kernels without it keep their registers.
template <typename T, bool PIPE, bool IP, int WARPS>
__device__ void attention2(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int L, int S, int D, int DP, float scale_log2, int vec_loads,
                           int H, int merged, const T* __restrict__ base, int has_base, float out_scale,
                           const T* __restrict__ q_ip, const T* __restrict__ k_ip, const T* __restrict__ v_ip,
                           int S_ip, int ip_row0, float ip_scale, int has_ip) {
    const int LDT = DP + 8;    // 16 bytes of padding: 8 ldmatrix rows hit distinct banks
    IPAFLUX_DYNAMIC_SMEM(smem);
    T* Ks = reinterpret_cast<T*>(smem);   // K/V tiles (and the Q tile while it is staged)

    const bool vec = vec_loads != 0;
    constexpr int ROWS = 16 * WARPS, NT = 32 * WARPS;
    const int bh = blockIdx.y, row0 = blockIdx.x * ROWS;
    const int warp = threadIdx.x / 32;
    const int nd = DP / 8;

    unsigned qf[MAX_K16][4];
    float oacc[MAX_D8][4], l0, l1;
    load_q<T, WARPS>(qf, q + (size_t)bh * L * D, row0, L, D, DP, Ks, LDT, vec);
    softmax_pv<T, PIPE, NT>(qf, k + (size_t)bh * S * D, v + (size_t)bh * S * D, S, D, DP, scale_log2, Ks, LDT, vec,
                        oacc, l0, l1);

    // each_element over this warp's rows. The indices are derived there, not
    // kept live across the IP term's key loop.
    auto each = [&](float s0, float s1, auto&& f) {
        each_element(oacc, row0 + warp * 16, s0, s1, L, D, nd, bh, H, merged, f);
    };
    each(1.f / quad_sum(l0), 1.f / quad_sum(l1), [&](int, size_t idx, float val) {
        o[idx] = from_f<T>(has_base ? to_f<T>(base[idx]) + out_scale * val : val);
    });
    // The extra attention, where this block has rows that take it (the branch is uniform over the block).
    if (!IP || !has_ip || row0 + ROWS <= ip_row0) return;
    load_q<T, WARPS>(qf, q_ip + (size_t)bh * L * D, row0, L, D, DP, Ks, LDT, vec);
    softmax_pv<T, PIPE, NT>(qf, k_ip + (size_t)bh * S_ip * D, v_ip + (size_t)bh * S_ip * D, S_ip, D, DP, scale_log2, Ks,
                        LDT, vec, oacc, l0, l1);
    each(ip_scale / quad_sum(l0), ip_scale / quad_sum(l1), [&](int row, size_t idx, float val) {
        if (row >= ip_row0) o[idx] = from_f<T>(to_f<T>(o[idx]) + val);
    });
}

// ---------------------------------------------------------------------------
// Version 6: two 16-row m-tiles per warp, 32 rows a warp and 128 a block of
// 4 warps, as FlashAttention-2 lays out its 128-row blocks. Against version 4
// each K fragment that ldmatrix brings from shared memory feeds two mma
// instead of one, and each K/V tile fetched from L2 serves 128 rows. The Q
// tile stays in shared memory for the whole call and its A fragments are
// re-read for each key tile: 32 rows of them in registers would not fit
// beside the 32-row accumulator. K/V tiles double-buffered by cp.async with
// ex2.approx as version 4; needs the 16-byte path (vec_loads = 1).
// Shared memory: the Q tile [128, LDT], then two stages of K and V.
// ---------------------------------------------------------------------------
#define MT6 2                // m-tiles of 16 rows per warp
#define ROWS6 (32 * MT6 * 2) // query rows per block: 4 warps x 32 (128)

// softmax_pv for version 6: this warp's 32 rows of the Q tile `Qs` against
// K/V [S, D]; leaves O unnormalised in oacc[m] and this lane's parts of the
// row sums in l[m] (rows g, g + 8 of m-tile m). Ends in a barrier, so `KV`
// and `Qs` may be reused.
template <typename T>
__device__ __forceinline__ void softmax_pv6(const T* Qs, const T* __restrict__ kb, const T* __restrict__ vb, int S,
                                            int D, int DP, float scale_log2, T* KV, int LDT,
                                            float (&oacc)[MT6][MAX_D8][4], float (&l)[MT6][2]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = lane & 3;
    const int lm = lane >> 3, lr = lane & 7;
    const int nk = DP / 16, nd = DP / 8;

    float mrow[MT6][2];
#pragma unroll
    for (int m = 0; m < MT6; ++m) {
#pragma unroll
        for (int n = 0; n < MAX_D8; ++n) oacc[m][n][0] = oacc[m][n][1] = oacc[m][n][2] = oacc[m][n][3] = 0.f;
        mrow[m][0] = mrow[m][1] = -INFINITY;
        l[m][0] = l[m][1] = 0.f;
    }
    // This lane's ldmatrix row of the Q tile for m-tile 0 (m-tile 1: 16 rows on).
    const T* qrow = Qs + (warp * 32 + (lm & 1) * 8 + lr) * LDT + (lm >> 1) * 8;

    const int stage = 2 * BC2 * LDT;
    load_tile_async<T, THREADS>(KV, LDT, kb, 0, BC2, S, D, DP);
    load_tile_async<T, THREADS>(KV + BC2 * LDT, LDT, vb, 0, BC2, S, D, DP);
    cp_async_commit();
    for (int s0 = 0, it = 0; s0 < S; s0 += BC2, ++it) {
        T* Kc = KV + (it & 1) * stage;
        T* Vs = Kc + BC2 * LDT;
        if (s0 + BC2 < S) {
            T* Kn = KV + ((it + 1) & 1) * stage;
            load_tile_async<T, THREADS>(Kn, LDT, kb, s0 + BC2, BC2, S, D, DP);
            load_tile_async<T, THREADS>(Kn + BC2 * LDT, LDT, vb, s0 + BC2, BC2, S, D, DP);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // S = Q Kᵀ, 32 columns of the head dimension at a time: both m-tiles'
        // A fragments, then each K fragment into both.
        float sacc[MT6][BC2 / 8][4];
#pragma unroll
        for (int m = 0; m < MT6; ++m)
#pragma unroll
            for (int j = 0; j < BC2 / 8; ++j) sacc[m][j][0] = sacc[m][j][1] = sacc[m][j][2] = sacc[m][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < MAX_K16; kk += 2) {
            if (kk >= nk) continue;
            const bool pair = kk + 1 < nk;
            unsigned a[MT6][2][4];
#pragma unroll
            for (int m = 0; m < MT6; ++m) {
                ldsm_x4(a[m][0], qrow + m * 16 * LDT + kk * 16);
                if (pair) ldsm_x4(a[m][1], qrow + m * 16 * LDT + (kk + 1) * 16);
            }
#pragma unroll
            for (int j = 0; j < BC2 / 8; ++j) {
                const T* krow = Kc + (j * 8 + lr) * LDT + lm * 8 + kk * 16;
                unsigned b[4];
                if (pair) {
                    ldsm_x4(b, krow);
#pragma unroll
                    for (int m = 0; m < MT6; ++m) {
                        mma16816<T>(sacc[m][j], a[m][0], b[0], b[1]);
                        mma16816<T>(sacc[m][j], a[m][1], b[2], b[3]);
                    }
                } else {
                    ldsm_x2(b, krow);
#pragma unroll
                    for (int m = 0; m < MT6; ++m) mma16816<T>(sacc[m][j], a[m][0], b[0], b[1]);
                }
            }
        }

        // Online softmax per m-tile; keys past S are masked.
        unsigned pa[MT6][BC2 / 16][4];
#pragma unroll
        for (int m = 0; m < MT6; ++m)
            softmax_tile<T, true>(sacc[m], S - s0, t, scale_log2, mrow[m][0], mrow[m][1], l[m][0], l[m][1], oacc[m],
                                  pa[m]);

        pv_tile<T, MT6>(Vs, LDT, lm, lr, nd, pa, oacc);
        __syncthreads();   // K/V tiles are overwritten next
    }
}


// The staged epilogue (versions 7 and 8) for one warp's MT m-tiles of 16
// rows from `ra` (version 7: two, 32 rows; version 8: one): the
// accumulators, rows g scaled by s[m][0] and rows g + 8 by s[m][1], go to
// the warp's own [16·MT, DP + 8] f32 rows of `stage` (8 floats of padding,
// so the float2 writes of each half-warp hit 32 distinct banks); then each
// lane writes 8 columns (16 bytes) of a row, 16 lanes a row, two rows a
// step, so every store fills whole 32-byte sectors (version 6's fragment
// stores are 2 bytes, 8 of each sector's 32 used: ncu, session 11). MODE 0:
// o = value; 1: o = base + out_scale·value; 2 (the IP term): o += value on
// rows from ip_row0. The arithmetic is version 6's, in f32 and rounded once.
// Needs D % 8 == 0 and 16-byte aligned rows (mod.rs: the 16-byte path, base
// aligned); columns past D are neither read nor written. The caller has
// ended all reads of the shared memory `stage` overlays (a barrier).
template <typename T, int MODE, int MT>
__device__ __forceinline__ void store_rows(const float (&oacc)[MT][MAX_D8][4], const float (&s)[MT][2],
                                           float* stage, int ra, int L, int D, int DP, int bh, int H, int merged,
                                           T* __restrict__ o, const T* __restrict__ base, float out_scale,
                                           int ip_row0) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int lds = DP + 8, nd = DP / 8;
    float* ws = stage + (threadIdx.x / 32) * 16 * MT * lds;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < MAX_D8; ++n) {
            if (n >= nd) continue;
            float* p = ws + (m * 16 + g) * lds + n * 8 + 2 * t;
            *reinterpret_cast<float2*>(p) = make_float2(oacc[m][n][0] * s[m][0], oacc[m][n][1] * s[m][0]);
            *reinterpret_cast<float2*>(p + 8 * lds) = make_float2(oacc[m][n][2] * s[m][1], oacc[m][n][3] * s[m][1]);
        }
    __syncwarp();
    const int c = (lane & 15) * 8;
    if (c >= D) return;
    const int bi = bh / H, hi = bh - bi * H;
    const size_t row_step = merged ? (size_t)H * D : (size_t)D;
    T* orow = o + (merged ? ((size_t)bi * L * H + hi) * D : (size_t)bh * L * D) + c;
    const T* brow = base + (merged ? ((size_t)bi * L * H + hi) * D : (size_t)bh * L * D) + c;
#pragma unroll 4
    for (int r = lane >> 4; r < 16 * MT; r += 2) {
        const int row = ra + r;
        if (row >= L || (MODE == 2 && row < ip_row0)) continue;
        const float4 lo = *reinterpret_cast<const float4*>(ws + r * lds + c);
        const float4 hi4 = *reinterpret_cast<const float4*>(ws + r * lds + c + 4);
        float val[8] = {lo.x, lo.y, lo.z, lo.w, hi4.x, hi4.y, hi4.z, hi4.w};
        const size_t off = (size_t)row * row_step;
        if (MODE != 0) {
            const uint4 raw = *reinterpret_cast<const uint4*>(MODE == 1 ? brow + off : orow + off);
            const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 had = unpack2<T>(words[i]);
                const float f = MODE == 1 ? out_scale : 1.f;
                val[2 * i] = had.x + f * val[2 * i];
                val[2 * i + 1] = had.y + f * val[2 * i + 1];
            }
        }
        store16(orow + off, make_uint4(pack2<T>(val[0], val[1]), pack2<T>(val[2], val[3]), pack2<T>(val[4], val[5]),
                                       pack2<T>(val[6], val[7])));
    }
}

// Version 6 with attention2's arguments and epilogue (vec_loads must be 1;
// mod.rs runs version 3 where it is not). STAGED (version 7): the Q tile
// comes by cp.async in the first K/V tiles' group, so its latency overlaps
// theirs (version 6 loads it first, synchronously), and the results leave
// through store_rows (16-byte stores; mod.rs runs version 6 where base is
// not 16-byte aligned).
template <typename T, bool IP, bool STAGED>
__device__ void attention6(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int L, int S, int D, int DP, float scale_log2, int /*vec_loads*/,
                           int H, int merged, const T* __restrict__ base, int has_base, float out_scale,
                           const T* __restrict__ q_ip, const T* __restrict__ k_ip, const T* __restrict__ v_ip,
                           int S_ip, int ip_row0, float ip_scale, int has_ip) {
    const int LDT = DP + 8;
    IPAFLUX_DYNAMIC_SMEM(smem);
    T* Qs = reinterpret_cast<T*>(smem);
    T* KV = Qs + ROWS6 * LDT;
    // Version 7's staging rows overlay Qs and KV once the key loop is done.
    float* stage = reinterpret_cast<float*>(smem);

    const int bh = blockIdx.y, row0 = blockIdx.x * ROWS6;
    const int warp = threadIdx.x / 32;
    const int nd = DP / 8;
    const int ra = row0 + warp * 32;

    float oacc[MT6][MAX_D8][4], l[MT6][2];
    // Version 6: plain loads; the first barrier in softmax_pv6 orders them
    // before any read. Version 7: issued, committed with the first K/V tiles.
    if (STAGED)
        load_tile_async<T, THREADS>(Qs, LDT, q + (size_t)bh * L * D, row0, ROWS6, L, D, DP);
    else
        load_tile<T, THREADS>(Qs, LDT, q + (size_t)bh * L * D, row0, ROWS6, L, D, DP, true);
    softmax_pv6<T>(Qs, k + (size_t)bh * S * D, v + (size_t)bh * S * D, S, D, DP, scale_log2, KV, LDT, oacc, l);
    if (STAGED) {
        const float s[MT6][2] = {{1.f / quad_sum(l[0][0]), 1.f / quad_sum(l[0][1])},
                                 {1.f / quad_sum(l[1][0]), 1.f / quad_sum(l[1][1])}};
        if (has_base)
            store_rows<T, 1, MT6>(oacc, s, stage, ra, L, D, DP, bh, H, merged, o, base, out_scale, 0);
        else
            store_rows<T, 0, MT6>(oacc, s, stage, ra, L, D, DP, bh, H, merged, o, base, out_scale, 0);
    } else {
#pragma unroll
        for (int m = 0; m < MT6; ++m)
            each_element(oacc[m], ra + m * 16, 1.f / quad_sum(l[m][0]), 1.f / quad_sum(l[m][1]), L, D, nd, bh, H,
                         merged, [&](int, size_t idx, float val) {
                             o[idx] = from_f<T>(has_base ? to_f<T>(base[idx]) + out_scale * val : val);
                         });
    }
    if (!IP || !has_ip || row0 + ROWS6 <= ip_row0) return;
    if (STAGED) {
        // Every warp is done with its staging rows before Qs is refilled.
        __syncthreads();
        load_tile_async<T, THREADS>(Qs, LDT, q_ip + (size_t)bh * L * D, row0, ROWS6, L, D, DP);
    } else {
        // softmax_pv6 ended in a barrier: every warp is done with Qs.
        load_tile<T, THREADS>(Qs, LDT, q_ip + (size_t)bh * L * D, row0, ROWS6, L, D, DP, true);
    }
    softmax_pv6<T>(Qs, k_ip + (size_t)bh * S_ip * D, v_ip + (size_t)bh * S_ip * D, S_ip, D, DP, scale_log2, KV, LDT,
                   oacc, l);
    if (STAGED) {
        // Each lane re-reads only the elements of o it wrote above (the same lane → row, column map).
        const float s[MT6][2] = {{ip_scale / quad_sum(l[0][0]), ip_scale / quad_sum(l[0][1])},
                                 {ip_scale / quad_sum(l[1][0]), ip_scale / quad_sum(l[1][1])}};
        store_rows<T, 2, MT6>(oacc, s, stage, ra, L, D, DP, bh, H, merged, o, base, 0.f, ip_row0);
    } else {
#pragma unroll
        for (int m = 0; m < MT6; ++m)
            each_element(oacc[m], ra + m * 16, ip_scale / quad_sum(l[m][0]), ip_scale / quad_sum(l[m][1]), L, D, nd,
                         bh, H, merged, [&](int row, size_t idx, float val) {
                             if (row >= ip_row0) o[idx] = from_f<T>(to_f<T>(o[idx]) + val);
                         });
    }
}

// Entry points, one per version and dtype (mod.rs loads them by name); the
// arguments are attention2's. Versions 4 and 5 (PIPE) need vec_loads = 1.
// Launch bounds: 4 warps, at most 168 registers a thread (3 blocks per SM's
// 64K registers), which the kernels without IP meet on their own (ptxas: 168,
// no spills); the IP entries would take 187 and fit 2 blocks an SM. 8 warps:
// one block an SM at up to 255 registers (two would need 128).
#ifndef IPAFLUX_WGMMA_ONLY
#define IPAFLUX_ATTENTION_ENTRY(NAME, T, PIPE, IP, WARPS, MIN_BLOCKS)                                              \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)                                            \
    NAME(const T* q, const T* k, const T* v, T* o, int L, int S, int D, int DP, float scale_log2, int vec_loads,   \
         int H, int merged, const T* base, int has_base, float out_scale, const T* q_ip, const T* k_ip,            \
         const T* v_ip, int S_ip, int ip_row0, float ip_scale, int has_ip) {                                       \
        attention2<T, PIPE, IP, WARPS>(q, k, v, o, L, S, D, DP, scale_log2, vec_loads, H, merged, base, has_base,  \
                                       out_scale, q_ip, k_ip, v_ip, S_ip, ip_row0, ip_scale, has_ip);              \
    }
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention2_bf16, __nv_bfloat16, false, false, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention2_f16, __half, false, false, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention4_bf16, __nv_bfloat16, true, false, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention4_f16, __half, true, false, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention5_bf16, __nv_bfloat16, true, false, 8, 1)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention5_f16, __half, true, false, 8, 1)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention2_ip_bf16, __nv_bfloat16, false, true, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention2_ip_f16, __half, false, true, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention4_ip_bf16, __nv_bfloat16, true, true, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention4_ip_f16, __half, true, true, 4, 3)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention5_ip_bf16, __nv_bfloat16, true, true, 8, 1)
IPAFLUX_ATTENTION_ENTRY(ipaflux_attention5_ip_f16, __half, true, true, 8, 1)

// Versions 6 and 7: 4 warps of 32 rows; two blocks an SM (255 registers at most).
#define IPAFLUX_ATTENTION6_ENTRY(NAME, T, IP, STAGED)                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                       \
    NAME(const T* q, const T* k, const T* v, T* o, int L, int S, int D, int DP, float scale_log2, int vec_loads,   \
         int H, int merged, const T* base, int has_base, float out_scale, const T* q_ip, const T* k_ip,            \
         const T* v_ip, int S_ip, int ip_row0, float ip_scale, int has_ip) {                                       \
        attention6<T, IP, STAGED>(q, k, v, o, L, S, D, DP, scale_log2, vec_loads, H, merged, base, has_base,       \
                                  out_scale, q_ip, k_ip, v_ip, S_ip, ip_row0, ip_scale, has_ip);                   \
    }
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention6_bf16, __nv_bfloat16, false, false)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention6_f16, __half, false, false)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention6_ip_bf16, __nv_bfloat16, true, false)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention6_ip_f16, __half, true, false)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention7_bf16, __nv_bfloat16, false, true)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention7_f16, __half, false, true)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention7_ip_bf16, __nv_bfloat16, true, true)
IPAFLUX_ATTENTION6_ENTRY(ipaflux_attention7_ip_f16, __half, true, true)
#endif  // IPAFLUX_WGMMA_ONLY: versions 3 to 7

// ---------------------------------------------------------------------------
// Version 8 (Hopper, sm_90a): the products on `wgmma`, the warpgroup-wide
// asynchronous MMA of FlashAttention-3 (Shah et al., 2024), without its warp
// specialisation, TMA or ping-pong scheduling: two warpgroups of 64 query
// rows, 128 rows a block, each issuing S = Q Kᵀ (m64n64k16, both operands
// from shared memory) and O += P V (m64n128k16, P from registers: the S
// accumulator's layout is the A fragment's, as with mma.sync), with the
// online softmax of versions 3 to 6 (softmax_tile) between them. K/V tiles
// double-buffered by cp.async as version 6; the other warpgroup's products
// can run while one computes its softmax. Head size 128 only (the
// instruction's N); mod.rs runs version 6 otherwise.
//
// Shared-memory tiles are stored in wgmma's canonical no-swizzle layout
// ("core matrices" of 8 rows × 16 bytes, 128 contiguous bytes): 16-byte
// chunk c of row r at chunk index (r % 8) + 8·c + 128·(r / 8). Q and K are
// K-major operands (8-row groups SBO = 2048 bytes apart, the two 8-column
// halves of a 16-column step LBO = 128 bytes apart); V, stored the same way,
// is the MN-major B operand of P·V (its rows are the K dimension: 8-key
// groups LBO = 2048 bytes apart, 8-column groups SBO = 128 bytes). PTX ISA,
// "Asynchronous Warpgroup Level Matrix Shared Memory Layout"; the operand
// forms cross-checked against CUTLASS's canonical GMMA layouts. Compiled
// only for compute_90a (build.rs, IPAFLUX_WGMMA_ONLY) and on the host by
// the emulator (host_emulation.hpp emulates wgmma from the same descriptors).
// ---------------------------------------------------------------------------
#if defined(IPAFLUX_WGMMA_ONLY) || defined(IPAFLUX_HOST_EMULATION)
#define WG8 2                  // warpgroups a block
#define ROWS8 (64 * WG8)       // query rows a block
#define THREADS8 (128 * WG8)
#define D8 128                 // the head size
#define TILE_SBO8 2048         // bytes between 8-row groups of a D8-wide tile
#define TILE_LBO8 128          // bytes between 16-byte column chunks of a row group

// A wgmma shared-memory matrix descriptor: start address, leading and stride
// byte offsets (each without its 4 low bits), no swizzle, base offset 0.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((smem_addr(p) & 0x3FFFFu) >> 4) | ((unsigned long long)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFFu) >> 4) << 32);
}

#ifndef IPAFLUX_HOST_EMULATION
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy writes to shared memory (cp.async, stores)
// visible to the async proxy that wgmma reads operands through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64×64 f32, this thread's C fragments) += A (64×16, desc_a) · B (16×64,
// desc_b, K-major). d[j] is 8-column tile j: rows g and g + 8 of the warp's 16.
template <typename T> __device__ __forceinline__ void wgmma_s(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b);
// d (64×128 f32) += A (64×16, this thread's A fragment a) · B (16×128, desc_b, MN-major).
template <typename T>
__device__ __forceinline__ void wgmma_o(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b);
// The instructions, one text per element type (TY: "bf16" or "f16").
#define IPAFLUX_WGMMA_S(TY)                                            \
    asm volatile(                                                      \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                   \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "    \
        "{"                                                            \
        "%0, %1, %2, %3, %4, %5, %6, %7, "                             \
        "%8, %9, %10, %11, %12, %13, %14, %15, "                       \
        "%16, %17, %18, %19, %20, %21, %22, %23, "                     \
        "%24, %25, %26, %27, %28, %29, %30, %31"                       \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                             \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),  \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),  \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),  \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),  \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),  \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),  \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])   \
        : "l"(desc_a), "l"(desc_b), "r"(1));
#define IPAFLUX_WGMMA_O(TY)                                                  \
    asm volatile(                                                            \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                         \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "         \
        "{"                                                                  \
        "%0, %1, %2, %3, %4, %5, %6, %7, "                                   \
        "%8, %9, %10, %11, %12, %13, %14, %15, "                             \
        "%16, %17, %18, %19, %20, %21, %22, %23, "                           \
        "%24, %25, %26, %27, %28, %29, %30, %31, "                           \
        "%32, %33, %34, %35, %36, %37, %38, %39, "                           \
        "%40, %41, %42, %43, %44, %45, %46, %47, "                           \
        "%48, %49, %50, %51, %52, %53, %54, %55, "                           \
        "%56, %57, %58, %59, %60, %61, %62, %63"                             \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                     \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),        \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),        \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),        \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),        \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),        \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),        \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),        \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),        \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),        \
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),        \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),    \
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),    \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),    \
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),    \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),    \
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])     \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
template <> __device__ __forceinline__ void wgmma_s<__nv_bfloat16>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b) {
    IPAFLUX_WGMMA_S("bf16");
}
template <> __device__ __forceinline__ void wgmma_s<__half>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b) {
    IPAFLUX_WGMMA_S("f16");
}
template <> __device__ __forceinline__ void wgmma_o<__nv_bfloat16>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b) {
    IPAFLUX_WGMMA_O("bf16");
}
template <> __device__ __forceinline__ void wgmma_o<__half>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b) {
    IPAFLUX_WGMMA_O("f16");
}
#endif  // IPAFLUX_HOST_EMULATION: wgmma

// Rows [r0, r0 + rows) of `src [n, D8]` into a tile in the canonical layout
// above, by cp.async (the caller commits and waits), zero past n. Chunk i of
// the tile is (row group i / 128, chunk (i / 8) % 16, row i % 8): its index
// is its place, and the 8 threads of a quarter-warp write one 128-byte core
// matrix (no bank conflicts).
template <typename T>
__device__ __forceinline__ void load_tile8(T* dst, const T* __restrict__ src, int r0, int rows, int n) {
#pragma unroll 4
    for (int i = threadIdx.x; i < rows * (D8 / 8); i += THREADS8) {
        const int r = (i >> 7) * 8 + (i & 7), c = (i >> 3) & 15, g = r0 + r;
        const bool ok = g < n;
        cp_async16(dst + i * 8, ok ? src + (size_t)g * D8 + c * 8 : src, ok);
    }
}

// This warpgroup's 64 rows of the Q tile `Qs` against K/V [S, D8] (the
// caller may have issued the Q tile's copy: it is committed with the first
// K/V tiles). Leaves O unnormalised in oacc (the warp's 16 rows as C
// fragments) and this lane's parts of the row sums in l0, l1. Ends in a
// barrier, so `KV` and `Qs` may be reused.
template <typename T>
__device__ __forceinline__ void softmax_pv8(const T* Qs, const T* __restrict__ kb, const T* __restrict__ vb, int S,
                                            float scale_log2, T* KV, float (&oacc)[MAX_D8][4], float& l0,
                                            float& l1) {
    const int t = threadIdx.x & 3;
    const T* qa = Qs + (threadIdx.x / 128) * 64 * D8;
#pragma unroll
    for (int n = 0; n < MAX_D8; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;
    l0 = l1 = 0.f;
    const int stage = 2 * BC2 * D8;
    load_tile8<T>(KV, kb, 0, BC2, S);
    load_tile8<T>(KV + BC2 * D8, vb, 0, BC2, S);
    cp_async_commit();
    for (int s0 = 0, it = 0; s0 < S; s0 += BC2, ++it) {
        const T* Kc = KV + (it & 1) * stage;
        const T* Vs = Kc + BC2 * D8;
        if (s0 + BC2 < S) {
            // The other stage was last read (wgmma completed) before the barrier ending the previous tile.
            T* Kn = KV + ((it + 1) & 1) * stage;
            load_tile8<T>(Kn, kb, s0 + BC2, BC2, S);
            load_tile8<T>(Kn + BC2 * D8, vb, s0 + BC2, BC2, S);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();

        // S = Q Kᵀ over the 8 16-column steps of the head dimension.
        float sacc[BC2 / 8][4];
#pragma unroll
        for (int j = 0; j < BC2 / 8; ++j) sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D8 / 16; ++kk)
            // Step kk: chunks 2kk and 2kk + 1 of every row.
            wgmma_s<T>(sacc, wgmma_desc(qa + kk * 2 * TILE_LBO8 / (int)sizeof(T), TILE_LBO8, TILE_SBO8),
                       wgmma_desc(Kc + kk * 2 * TILE_LBO8 / (int)sizeof(T), TILE_LBO8, TILE_SBO8));
        wgmma_commit();
        wgmma_wait<0>();

        unsigned pa[BC2 / 16][4];
        softmax_tile<T, true>(sacc, S - s0, t, scale_log2, m0, m1, l0, l1, oacc, pa);

        // O += P V, 16 keys (two 8-key groups of V) a step.
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < BC2 / 16; ++kc)
            wgmma_o<T>(oacc, pa[kc], wgmma_desc(Vs + kc * 2 * TILE_SBO8 / (int)sizeof(T), TILE_SBO8, TILE_LBO8));
        wgmma_commit();
        wgmma_wait<0>();
        __syncthreads();   // K/V tiles are overwritten next
    }
}

// Version 8 with attention2's arguments and epilogue (D = 128, vec_loads = 1,
// base 16-byte aligned: mod.rs checks). Each warp's 16 rows leave through
// version 7's staged 16-byte stores (store_rows).
template <typename T, bool IP>
__device__ void attention8(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int L, int S, int D, int /*DP*/, float scale_log2, int /*vec_loads*/,
                           int H, int merged, const T* __restrict__ base, int has_base, float out_scale,
                           const T* __restrict__ q_ip, const T* __restrict__ k_ip, const T* __restrict__ v_ip,
                           int S_ip, int ip_row0, float ip_scale, int has_ip) {
    IPAFLUX_DYNAMIC_SMEM(smem);
    T* Qs = reinterpret_cast<T*>(smem);
    T* KV = Qs + ROWS8 * D8;
    // The staging rows (8 warps × 16 × (D8 + 8) f32) overlay Qs and KV once a key loop is done.
    float* stage = reinterpret_cast<float*>(smem);
    const int bh = blockIdx.y, row0 = blockIdx.x * ROWS8;
    const int ra = row0 + (threadIdx.x / 32) * 16;   // this warp's first row

    float oacc[1][MAX_D8][4], l0, l1;
    load_tile8<T>(Qs, q + (size_t)bh * L * D8, row0, ROWS8, L);
    softmax_pv8<T>(Qs, k + (size_t)bh * S * D8, v + (size_t)bh * S * D8, S, scale_log2, KV, oacc[0], l0, l1);
    const float s[1][2] = {{1.f / quad_sum(l0), 1.f / quad_sum(l1)}};
    if (has_base)
        store_rows<T, 1, 1>(oacc, s, stage, ra, L, D, D8, bh, H, merged, o, base, out_scale, 0);
    else
        store_rows<T, 0, 1>(oacc, s, stage, ra, L, D, D8, bh, H, merged, o, base, out_scale, 0);
    if (!IP || !has_ip || row0 + ROWS8 <= ip_row0) return;
    // Every warp is done with its staging rows before Qs is refilled.
    __syncthreads();
    load_tile8<T>(Qs, q_ip + (size_t)bh * L * D8, row0, ROWS8, L);
    softmax_pv8<T>(Qs, k_ip + (size_t)bh * S_ip * D8, v_ip + (size_t)bh * S_ip * D8, S_ip, scale_log2, KV, oacc[0], l0,
                   l1);
    // Each lane re-reads only the elements of o it wrote above (the same lane → row, column map).
    const float s_ip[1][2] = {{ip_scale / quad_sum(l0), ip_scale / quad_sum(l1)}};
    store_rows<T, 2, 1>(oacc, s_ip, stage, ra, L, D, D8, bh, H, merged, o, base, 0.f, ip_row0);
}

// Entry points: two warpgroups a block. Two blocks an SM (96 KB of shared
// memory each) where the registers fit 128 a thread without spilling (ptxas:
// 125); the `_ip` entries would spill at 128, so they take one (133-141).
#define IPAFLUX_ATTENTION8_ENTRY(NAME, T, IP)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS8, IP ? 1 : 2)                                             \
    NAME(const T* q, const T* k, const T* v, T* o, int L, int S, int D, int DP, float scale_log2, int vec_loads,   \
         int H, int merged, const T* base, int has_base, float out_scale, const T* q_ip, const T* k_ip,            \
         const T* v_ip, int S_ip, int ip_row0, float ip_scale, int has_ip) {                                       \
        attention8<T, IP>(q, k, v, o, L, S, D, DP, scale_log2, vec_loads, H, merged, base, has_base, out_scale,    \
                          q_ip, k_ip, v_ip, S_ip, ip_row0, ip_scale, has_ip);                                      \
    }
IPAFLUX_ATTENTION8_ENTRY(ipaflux_attention8_bf16, __nv_bfloat16, false)
IPAFLUX_ATTENTION8_ENTRY(ipaflux_attention8_f16, __half, false)
IPAFLUX_ATTENTION8_ENTRY(ipaflux_attention8_ip_bf16, __nv_bfloat16, true)
IPAFLUX_ATTENTION8_ENTRY(ipaflux_attention8_ip_f16, __half, true)
#endif  // version 8

