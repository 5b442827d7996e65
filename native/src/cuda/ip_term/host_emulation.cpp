// Runs ip_term.cu's softmax on the host, without a GPU (../host_emulation.hpp),
// against a plain reference written from its contract. Built and run by
// `scripts/kernel-emulation.sh` (part of `cargo xtask cuda-check`, so CI runs
// it). The cuBLAS products around it are checked by mod.rs's tests (their
// parameters, run through a host transcription of cuBLAS's semantics) and on
// a GPU by `gpu-check`. Written for this project.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../host_emulation.hpp"
#include "ip_term.cu"

template <typename T> void check_softmax(const char* name, long long rows, int n, unsigned threads, float spread) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-spread, spread);
    std::vector<float> s(rows * n);
    for (auto& x : s) x = u(rng);
    std::vector<T> p(rows * n, from_float<T>(NAN));
    const unsigned warps = threads / 32, blocks = (unsigned)((rows + warps - 1) / warps);
    launch(blocks, threads, [&] {
        if constexpr (std::is_same_v<T, __nv_bfloat16>)
            ipaflux_softmax_rows_bf16(s.data(), p.data(), rows, n);
        else
            ipaflux_softmax_rows_f16(s.data(), p.data(), rows, n);
    });
    std::vector<float> want(rows * n);
    for (long long r = 0; r < rows; ++r) {
        double m = -INFINITY, sum = 0;
        for (int c = 0; c < n; ++c) m = std::max(m, (double)s[r * n + c]);
        for (int c = 0; c < n; ++c) sum += std::exp(s[r * n + c] - m);
        for (int c = 0; c < n; ++c) want[r * n + c] = (float)(std::exp(s[r * n + c] - m) / sum);
    }
    compare(name, p, want, 1e-2f);
}

int main() {
    // 128 keys (the IP-Adapter's image tokens), rows not a multiple of the block's warps.
    check_softmax<__nv_bfloat16>("softmax rows bf16, n 128, 13 rows, 8 warps a block", 13, 128, 256, 8.f);
    check_softmax<__half>("softmax rows f16, n 128, 5 rows", 5, 128, 64, 8.f);
    // Rows shorter than a warp (idle lanes) and not a multiple of 32.
    check_softmax<__nv_bfloat16>("softmax rows bf16, n 7", 9, 7, 64, 3.f);
    check_softmax<__nv_bfloat16>("softmax rows bf16, n 200", 4, 200, 128, 30.f);
    std::printf("ip_term kernels, host emulation: %d failure(s)\n", emu_failures);
    return emu_failures ? 1 : 0;
}
