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
// "ldmatrix"), and meet again; `wgmma` does the same over its warpgroup, its
// shared-memory operands read through their matrix descriptors. `cp.async` lands only at the `wait_group`
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
        for (unsigned g = 0; g < threads / 128; ++g) warpgroups.push_back(std::make_unique<std::barrier<>>(128));
    }
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // Warpgroups (4 warps) for wgmma; their exchange slots are their warps'.
    std::vector<std::unique_ptr<std::barrier<>>> warpgroups;
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

// Shared-memory addresses as the device sees them: offsets into the block's
// shared window (here its dynamic shared memory), so the kernels' wgmma
// descriptors are built exactly as on the device and decoded below.
inline unsigned smem_addr(const void* p) {
    return (unsigned)((const unsigned char*)p - emu_ctx->smem.data());
}

// wgmma (sm_90a), as the PTX ISA defines it for the forms version 8 uses:
// warpgroup-collective (128 threads), asynchronous. An issued wgmma's result
// lands in its accumulator registers only at the wgmma.wait_group that
// completes its commit group; until then they hold NaN, so reading them
// early fails the check (as cp.async above). Operands in shared memory come
// through matrix descriptors in the no-swizzle canonical layout: core
// matrices of 8 rows × 16 bytes, LBO bytes apart along K, SBO bytes apart
// along M/N; K-major: a core matrix row is 8 K-values of one M/N index;
// MN-major: 8 M/N values of one K index. Other layout types fail.
struct EmuWgmma {
    float* acc;
    int n;
};
inline thread_local std::vector<std::pair<float*, std::vector<float>>> emu_wgmma_shadow;   // results in flight
inline thread_local std::vector<EmuWgmma> emu_wgmma_pending;
inline thread_local std::vector<std::vector<EmuWgmma>> emu_wgmma_groups;

inline std::vector<float>* emu_wgmma_find(float* acc) {
    for (auto& [p, v] : emu_wgmma_shadow)
        if (p == acc) return &v;
    return nullptr;
}

inline const unsigned char* emu_desc_start(uint64_t d) {
    if ((d >> 62) != 0 || ((d >> 49) & 7) != 0) {
        std::printf("wgmma descriptor %016llx: a swizzled layout or a base offset (not emulated)\n",
                    (unsigned long long)d);
        std::abort();
    }
    return emu_ctx->smem.data() + ((d & 0x3FFF) << 4);
}
inline size_t emu_desc_lbo(uint64_t d) { return ((d >> 16) & 0x3FFF) << 4; }
inline size_t emu_desc_sbo(uint64_t d) { return ((d >> 32) & 0x3FFF) << 4; }

// Element `elem` of 16-byte row `row` (0..7) of the core matrix that is
// `mn_group`-th along M/N (SBO apart) and `k_group`-th along K (LBO apart).
template <typename T> float emu_core_element(uint64_t d, int row, int mn_group, int k_group, int elem) {
    const unsigned char* p =
        emu_desc_start(d) + row * 16 + mn_group * emu_desc_sbo(d) + k_group * emu_desc_lbo(d) + elem * 2;
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    return emu_b16_to_float<T>(bits);
}
// Element (mn, k) of a K-major operand (a core-matrix row holds 8 K values);
// element (k, mn) of an MN-major one (a row holds 8 M/N values).
template <typename T> float emu_kmajor(uint64_t d, int mn, int k) {
    return emu_core_element<T>(d, mn % 8, mn / 8, k / 8, k % 8);
}
template <typename T> float emu_mnmajor(uint64_t d, int k, int mn) {
    return emu_core_element<T>(d, k % 8, mn / 8, k / 8, mn % 8);
}

// D (64×N, this thread's C fragments `acc`, tiles of 8 columns) += A (64×16) · B (16×N):
// a(row, k), b(k, col) give the operands. Thread (warp w of the warpgroup,
// lane g·4 + t) holds rows 16w + g, +8, columns 8j + 2t, +1 (as mma.sync's C).
template <class A, class B> void emu_wgmma_issue(float* acc, int N, A&& a, B&& b) {
    const unsigned tw = emu_threadIdx.x % 128, w = tw / 32, lane = tw % 32, g = lane / 4, t = lane % 4;
    std::vector<float> out(4 * N / 8);
    const std::vector<float>* prev = emu_wgmma_find(acc);
    for (int j = 0; j < N / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * w + g + (i >= 2 ? 8 : 0), col = 8 * j + 2 * t + (i & 1);
            float sum = 0.f;
            for (int k = 0; k < 16; ++k) sum += a(row, k) * b(k, col);
            out[4 * j + i] = (prev ? (*prev)[4 * j + i] : acc[4 * j + i]) + sum;
        }
    if (auto* v = emu_wgmma_find(acc)) *v = std::move(out);
    else emu_wgmma_shadow.emplace_back(acc, std::move(out));
    for (int e = 0; e < 4 * N / 8; ++e) acc[e] = NAN;
    emu_wgmma_pending.push_back({acc, 4 * N / 8});
}

// The warpgroup meets around each wgmma (it is .sync.aligned): each thread
// publishes `n` values (the A fragment of the register form) first.
template <class F> void warpgroup_exchange(const uint64_t* mine, int n, F&& body) {
    const unsigned wg = emu_threadIdx.x / 128, tw = emu_threadIdx.x % 128;
    uint64_t* ex = emu_ctx->exchange.data() + (size_t)wg * 128 * BlockCtx::SLOTS;
    for (int i = 0; i < n; ++i) ex[tw * BlockCtx::SLOTS + i] = mine[i];
    emu_ctx->warpgroups[wg]->arrive_and_wait();
    body([&](unsigned thread, int slot) { return ex[thread * BlockCtx::SLOTS + slot]; });
    emu_ctx->warpgroups[wg]->arrive_and_wait();
}

// m64n64k16, A and B (K-major) from shared memory.
template <typename T> void wgmma_s(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
    warpgroup_exchange(nullptr, 0, [&](auto) {
        emu_wgmma_issue(&d[0][0], 64, [&](int r, int k) { return emu_kmajor<T>(desc_a, r, k); },
                        [&](int k, int c) { return emu_kmajor<T>(desc_b, c, k); });
    });
}

// m64n128k16, A from registers (mma.sync's A fragment per warp: a0 (g, 2t..),
// a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..)), B MN-major.
template <typename T> void wgmma_o(float (&d)[16][4], const unsigned (&a)[4], uint64_t desc_b) {
    const uint64_t mine[4] = {a[0], a[1], a[2], a[3]};
    warpgroup_exchange(mine, 4, [&](auto read) {
        auto a_at = [&](int r, int k) {
            const unsigned owner = (r / 16) * 32 + (r % 8) * 4 + (k % 8) / 2;
            const int reg = (r % 16 >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            const uint64_t word = read(owner, reg);
            return emu_b16_to_float<T>((uint16_t)(k % 2 ? (word >> 16) & 0xffff : word & 0xffff));
        };
        emu_wgmma_issue(&d[0][0], 128, a_at, [&](int k, int c) { return emu_mnmajor<T>(desc_b, k, c); });
    });
}

inline void wgmma_fence() {}
inline void fence_proxy_async() {}
inline void wgmma_commit() {
    emu_wgmma_groups.push_back(std::move(emu_wgmma_pending));
    emu_wgmma_pending.clear();
}
// Completes all but the newest N committed groups.
template <int N> void wgmma_wait() {
    const size_t n = emu_wgmma_groups.size();
    if (n <= (size_t)N) return;
    std::vector<float*> done;
    for (size_t g = 0; g < n - N; ++g)
        for (const auto& op : emu_wgmma_groups[g]) done.push_back(op.acc);
    emu_wgmma_groups.erase(emu_wgmma_groups.begin(), emu_wgmma_groups.begin() + (n - N));
    for (float* acc : done) {
        bool later = false;
        for (const auto& grp : emu_wgmma_groups)
            for (const auto& op : grp) later |= op.acc == acc;
        for (const auto& op : emu_wgmma_pending) later |= op.acc == acc;
        if (later) continue;
        for (auto it = emu_wgmma_shadow.begin(); it != emu_wgmma_shadow.end(); ++it)
            if (it->first == acc) {
                std::copy(it->second.begin(), it->second.end(), acc);
                emu_wgmma_shadow.erase(it);
                break;
            }
    }
}

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
