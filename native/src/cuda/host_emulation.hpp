// A host emulation of the CUDA execution model, enough to run this
// project's kernels on a machine without a GPU and check them against plain
// references (`scripts/kernel-emulation.sh`, run by `cargo xtask cuda-check`,
// so by CI). Include it after the CUDA headers and before the kernel's .cu.
//
// One thread block runs at a time, each CUDA thread as a std::thread:
// `__syncthreads` is a barrier over the block; warp-level operations (shuffles,
// `ldmatrix`, `mma.sync.m16n8k16`) publish each lane's operands to the warp,
// meet at a barrier, compute each lane's result from all lanes' operands as the
// PTX ISA defines the fragment layouts ("Matrix Fragments for mma.m16n8k16",
// "ldmatrix"), and meet again. `cp.async` lands only at the `wait_group`
// that completes its group, its destination poisoned until then, so reading a
// stage too early is caught (below), as are index and layout errors. `__shared__` variables are statics and
// dynamic shared memory is a per-block buffer. Timing, memory coalescing and
// bank conflicts are not emulated. Written for this project.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Per launched block: barriers, the warps' exchange slots, dynamic shared
// memory. A GPU's shared memory holds whatever earlier blocks left there, so
// here it starts as 0xFF bytes (NaN in bf16, f16 and f32): a kernel that
// reads an element it never wrote (padding it forgot to zero) fails its check.
struct BlockCtx {
    static constexpr int SLOTS = 8;   // 64-bit values a lane can publish at once
    BlockCtx(unsigned threads, size_t smem_bytes)
        : block(threads), warps((threads + 31) / 32), exchange((threads + 31) / 32 * 32 * SLOTS),
          smem(smem_bytes + 128, 0xFF) {
        for (auto& w : warps) w = std::make_unique<std::barrier<>>(32);
    }
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> exchange;
    std::vector<unsigned char> smem;
};

inline thread_local Dim3 emu_threadIdx, emu_blockIdx;
inline thread_local BlockCtx* emu_ctx = nullptr;
inline Dim3 emu_blockDim, emu_gridDim;

// Launches `kernel` over grid (gx, gy) of `threads`-thread blocks, one block at a time.
inline void launch(Dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()>& kernel) {
    emu_gridDim = grid;
    emu_blockDim = Dim3{threads};
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            BlockCtx ctx(threads, smem_bytes);
            std::vector<std::thread> pool;
            pool.reserve(threads);
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([&, bx, by, t] {
                    emu_threadIdx = Dim3{t};
                    emu_blockIdx = Dim3{bx, by};
                    emu_ctx = &ctx;
                    kernel();
                });
            for (auto& th : pool) th.join();
        }
}
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& kernel) {
    launch(Dim3{grid}, threads, 0, kernel);
}

// Every lane of this thread's warp publishes `n` values; `read(lane, slot)` then
// sees any lane's, until all lanes are done reading.
template <class F> void warp_exchange(const uint64_t* mine, int n, F&& body) {
    const unsigned lane = emu_threadIdx.x % 32, warp = emu_threadIdx.x / 32;
    uint64_t* ex = emu_ctx->exchange.data() + (size_t)warp * 32 * BlockCtx::SLOTS;
    for (int i = 0; i < n; ++i) ex[lane * BlockCtx::SLOTS + i] = mine[i];
    emu_ctx->warps[warp]->arrive_and_wait();
    body([&](unsigned l, int slot) { return ex[l * BlockCtx::SLOTS + slot]; });
    emu_ctx->warps[warp]->arrive_and_wait();
}

inline float emu_shfl_xor(float v, int offset) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint64_t mine = bits;
    float out = 0.f;
    warp_exchange(&mine, 1, [&](auto read) {
        const uint32_t b = (uint32_t)read((emu_threadIdx.x % 32) ^ (unsigned)offset, 0);
        std::memcpy(&out, &b, 4);
    });
    return out;
}

inline void emu_syncthreads() { emu_ctx->block.arrive_and_wait(); }
inline void emu_syncwarp() { emu_ctx->warps[emu_threadIdx.x / 32]->arrive_and_wait(); }

// ldmatrix.m8n8.{x1,x2,x4}[.trans].b16: lanes 8i..8i+7 give the row addresses
// of matrix i; lane l receives, per matrix, row l/4, columns 2(l%4), +1 (of the
// transposed matrix with .trans), the lower column in the lower half.
inline void emu_ldmatrix(unsigned* r, int matrices, bool trans, const void* p) {
    const uint64_t mine = (uint64_t)(uintptr_t)p;
    const unsigned lane = emu_threadIdx.x % 32;
    warp_exchange(&mine, 1, [&](auto read) {
        for (int i = 0; i < matrices; ++i) {
            uint16_t e[2];
            for (int j = 0; j < 2; ++j) {
                const unsigned row = trans ? 2 * (lane % 4) + j : lane / 4;
                const unsigned col = trans ? lane / 4 : 2 * (lane % 4) + j;
                const auto* rowp = reinterpret_cast<const uint16_t*>((uintptr_t)read(8 * i + row, 0));
                e[j] = rowp[col];
            }
            r[i] = (unsigned)e[0] | ((unsigned)e[1] << 16);
        }
    });
}

template <typename T> float emu_b16_to_float(uint16_t bits) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const uint32_t f = (uint32_t)bits << 16;
        float out;
        std::memcpy(&out, &f, 4);
        return out;
    } else {
        __half_raw raw;
        raw.x = bits;
        return __half2float(__half(raw));
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: c += A (16x16) B (16x8).
// Lane l (g = l/4, t = l%4): a0 A[g][2t..], a1 A[g+8][2t..], a2 A[g][2t+8..],
// a3 A[g+8][2t+8..]; b0 B[2t..][g], b1 B[2t+8..][g]; c0,c1 C[g][2t..],
// c2,c3 C[g+8][2t..].
template <typename T> void emu_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const unsigned lane = emu_threadIdx.x % 32;
    warp_exchange(mine, 6, [&](auto read) {
        float A[16][16], B[16][8];
        auto half_of = [](uint64_t r, int j) { return (uint16_t)(j ? (r >> 16) & 0xffff : r & 0xffff); };
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l / 4, t = l % 4;
            for (int j = 0; j < 2; ++j) {
                A[g][2 * t + j] = emu_b16_to_float<T>(half_of(read(l, 0), j));
                A[g + 8][2 * t + j] = emu_b16_to_float<T>(half_of(read(l, 1), j));
                A[g][2 * t + 8 + j] = emu_b16_to_float<T>(half_of(read(l, 2), j));
                A[g + 8][2 * t + 8 + j] = emu_b16_to_float<T>(half_of(read(l, 3), j));
                B[2 * t + j][g] = emu_b16_to_float<T>(half_of(read(l, 4), j));
                B[2 * t + 8 + j][g] = emu_b16_to_float<T>(half_of(read(l, 5), j));
            }
        }
        const unsigned g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            float acc = 0.f;
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
            c[i] += acc;
        }
    });
}

// The kernels' names for these.
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __shfl_xor_sync(mask, v, offset) emu_shfl_xor(v, offset)
#define __syncthreads() emu_syncthreads()
#define __syncwarp() emu_syncwarp()
#define rsqrtf(x) (1.0f / std::sqrt(x))
#define IPAFLUX_HOST_EMULATION 1
#define IPAFLUX_DYNAMIC_SMEM(name) unsigned char* name = emu_ctx->smem.data()

inline void ldsm_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, 4, false, p); }
inline void ldsm_x2(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, 2, false, p); }
inline void ldsm_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, 4, true, p); }
template <typename T> void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    emu_mma16816<T>(c, a, b0, b1);
}
// cp.async as the PTX ISA defines its completion ("cp.async.wait_group"): a
// copy lands only when a wait_group leaves its committed group among the
// completed ones. Until then its destination holds NaN bytes (all ones: a NaN
// in bf16, f16 and f32), so a kernel that reads a stage before waiting for it,
// or waits for too few groups, computes NaN and fails its check. Per thread,
// as on the device; other threads see the data after the barrier that
// follows the wait.
struct EmuAsyncCopy {
    void* dst;
    unsigned char data[16];
};
inline thread_local std::vector<EmuAsyncCopy> emu_async_pending;             // issued, not committed
inline thread_local std::vector<std::vector<EmuAsyncCopy>> emu_async_groups;  // committed, oldest first

inline void cp_async16(void* dst, const void* src, bool valid) {
    EmuAsyncCopy c{dst, {}};
    if (valid) std::memcpy(c.data, src, 16);
    std::memset(dst, 0xFF, 16);
    emu_async_pending.push_back(c);
}
inline void cp_async_commit() {
    emu_async_groups.push_back(std::move(emu_async_pending));
    emu_async_pending.clear();
}
// Completes all but the newest N committed groups.
template <int N> void cp_async_wait() {
    const size_t keep = N, n = emu_async_groups.size();
    if (n <= keep) return;
    for (size_t g = 0; g < n - keep; ++g)
        for (const auto& c : emu_async_groups[g]) std::memcpy(c.dst, c.data, 16);
    emu_async_groups.erase(emu_async_groups.begin(), emu_async_groups.begin() + (n - keep));
}
inline float ex2_approx(float x) { return std::exp2(x); }

// Test helpers.
inline int emu_failures = 0;

inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_float(__half x) { return __half2float(x); }
template <typename T> T from_float(float x) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(x);
    else return __float2half(x);
}
template <typename T> float round_to(float x) { return to_float(from_float<T>(x)); }

// n values ~ N(0, scale²) rounded to T.
template <typename T> std::vector<T> random_vec(size_t n, std::mt19937& rng, float scale = 1.f) {
    std::normal_distribution<float> dist(0.f, scale);
    std::vector<T> v(n);
    for (auto& x : v) x = from_float<T>(dist(rng));
    return v;
}

// Largest |got - want| over the largest |want|; counts a failure above tol.
template <typename T>
void compare(const char* what, const std::vector<T>& got, const std::vector<float>& want, float tol) {
    float err = 0.f, scale = 1e-12f;
    for (size_t i = 0; i < want.size(); ++i) {
        // A NaN or infinity (an element never written, or computed from a
        // poisoned stage) is an infinite error: fmax alone would skip a NaN.
        const float g = to_float(got[i]);
        err = std::fmax(err, std::isfinite(g) ? std::fabs(g - want[i]) : INFINITY);
        scale = std::fmax(scale, std::fabs(want[i]));
    }
    const float rel = err / scale;
    const bool ok = rel <= tol && std::isfinite(rel);
    std::printf("%-66s rel max err %.3e (tol %.1e) %s\n", what, rel, tol, ok ? "ok" : "FAIL");
    emu_failures += !ok;
}
