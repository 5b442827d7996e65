// Runs attention.cu's `mma` kernels (versions 3 and 4) on the host, without a
// GPU (../host_emulation.hpp emulates ldmatrix, mma.sync and cp.async), and
// checks them against attention computed in double from the same bf16/f16
// inputs: the [B, H, L, D] output, the merged-heads [B, L, H·D] epilogue,
// base + scale · attention, and the IP-Adapter term fused in (`_ip` entries:
// rows from ip_row0 on get ip_scale · attention of q_ip over k_ip, v_ip). Built and run by `scripts/kernel-emulation.sh`.
// Written for this project.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../host_emulation.hpp"
#include "attention.cu"

struct Case {
    const char* name;
    int B, H, L, S, D;
    bool pipelined, merged, add;
    int S_ip = 0, ip_row0 = 0;   // S_ip > 0: the IP term fused in (version 4 only)
};

// Attention of row r of q [BH, L, D] over k, v [BH, S, D] for (b·H + h) = bh, column d, in double.
template <typename T>
double attend(const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v, int bh, int r, int d, int L,
              int S, int D) {
    std::vector<double> p(S);
    double mx = -INFINITY, sum = 0, acc = 0;
    for (int s = 0; s < S; ++s) {
        double dot = 0;
        for (int c = 0; c < D; ++c)
            dot += (double)to_float(q[((size_t)bh * L + r) * D + c]) * to_float(k[((size_t)bh * S + s) * D + c]);
        p[s] = dot / std::sqrt((double)D);
        mx = std::fmax(mx, p[s]);
    }
    for (int s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
    for (int s = 0; s < S; ++s) acc += p[s] * to_float(v[((size_t)bh * S + s) * D + d]);
    return acc / sum;
}

template <typename T> void run_case(const Case& c) {
    std::mt19937 rng(5);
    const int BH = c.B * c.H, DP = (c.D + 15) / 16 * 16;
    auto q = random_vec<T>((size_t)BH * c.L * c.D, rng), k = random_vec<T>((size_t)BH * c.S * c.D, rng),
         v = random_vec<T>((size_t)BH * c.S * c.D, rng), base = random_vec<T>((size_t)BH * c.L * c.D, rng);
    const float out_scale = c.add ? 0.7f : 1.f;
    std::vector<T> o(q.size(), from_float<T>(NAN));
    const float scale_log2 = (float)(1.0 / std::sqrt((double)c.D) * 1.4426950408889634);
    // As mod.rs: K and V tiles of BC2 rows padded by 8 elements, two stages when pipelined.
    const size_t pair = 2 * BC2 * (DP + 8) * sizeof(T);
    const size_t smem = c.pipelined ? 2 * pair : pair;
    const Dim3 grid{(unsigned)((c.L + BR2 - 1) / BR2), (unsigned)BH};
    const bool ip = c.S_ip > 0;
    const int S_ip = ip ? c.S_ip : 1;
    auto q_ip = random_vec<T>((size_t)BH * c.L * c.D, rng), k_ip = random_vec<T>((size_t)BH * S_ip * c.D, rng),
         v_ip = random_vec<T>((size_t)BH * S_ip * c.D, rng);
    const float ip_scale = 0.8f;
    launch(grid, THREADS, smem, [&] {
        auto run = [&](auto kernel) {
            kernel(q.data(), k.data(), v.data(), o.data(), c.L, c.S, c.D, DP, scale_log2, 1, c.H, c.merged, base.data(),
                   c.add, out_scale, q_ip.data(), k_ip.data(), v_ip.data(), S_ip, c.ip_row0, ip_scale, ip);
        };
        if (ip)
            run(attention2<T, true, true>);
        else if (c.pipelined)
            run(attention2<T, true, false>);
        else
            run(attention2<T, false, false>);
    });
    std::vector<float> want(o.size());
    for (int bh = 0; bh < BH; ++bh) {
        const int b = bh / c.H, h = bh % c.H;
        for (int r = 0; r < c.L; ++r) {
            for (int d = 0; d < c.D; ++d) {
                const size_t idx = c.merged ? (((size_t)b * c.L + r) * c.H + h) * c.D + d : ((size_t)bh * c.L + r) * c.D + d;
                double val = attend(q, k, v, bh, r, d, c.L, c.S, c.D) * out_scale + (c.add ? to_float(base[idx]) : 0.0);
                if (ip && r >= c.ip_row0) val += ip_scale * attend(q_ip, k_ip, v_ip, bh, r, d, c.L, S_ip, c.D);
                want[idx] = (float)val;
            }
        }
    }
    // As gpu-check's tolerance for bf16/f16 attention (P is rounded to T before P·V, as FlashAttention does).
    compare(c.name, o, want, 2e-2f);
}

int main() {
    const Case cases[] = {
        {"v3 bf16 [1,2,100|100,128] (checked on a GPU: emulation self-check)", 1, 2, 100, 100, 128, false, false, false},
        {"v4 bf16 cp.async [1,2,100|200,128], 4 key tiles, the last partial", 1, 2, 100, 200, 128, true, false, false},
        {"v4 bf16 [2,3,70|130,128] merged heads", 2, 3, 70, 130, 128, true, true, false},
        {"v4 bf16 [2,2,64|128,128] merged, base + 0.7 attention (IP term)", 2, 2, 64, 128, 128, true, true, true},
        {"v3 bf16 [2,2,64|128,128] merged, base + 0.7 attention", 2, 2, 64, 128, 128, false, true, true},
        {"v4 bf16 [1,2,80|90,72] SigLIP head size (padded columns)", 1, 2, 80, 90, 72, true, false, false},
    };
    for (const auto& c : cases) run_case<__nv_bfloat16>(c);
    // The IP term fused in: row blocks wholly before ip_row0 (none), straddling it, after it; S_ip as Flux's 128.
    Case ip{"v4 + IP bf16 [2,2,200|100,128] merged, IP (S_ip = 128) on rows >= 70", 2, 2, 200, 100, 128, true, true, false};
    ip.S_ip = 128;
    ip.ip_row0 = 70;
    run_case<__nv_bfloat16>(ip);
    Case ip_all{"v4 + IP bf16 [1,3,90|64,72] [B,H,L,D], IP (S_ip = 20) on all rows", 1, 3, 90, 64, 72, true, false, false};
    ip_all.S_ip = 20;
    run_case<__nv_bfloat16>(ip_all);
    ip.name = "v4 + IP f16 [2,2,200|100,128] merged, IP on rows >= 70";
    run_case<__half>(ip);
    run_case<__half>({"v4 f16 [1,2,100|200,128] merged", 1, 2, 100, 200, 128, true, true, false});
    std::printf("attention kernels, host emulation: %d failure(s)\n", emu_failures);
    return emu_failures ? 1 : 0;
}
