// Runs attention.cu's `mma` and `wgmma` kernels (versions 3 to 8) on the host,
// without a GPU (../host_emulation.hpp emulates ldmatrix, mma.sync, wgmma and
// cp.async), and
// checks them against attention computed in double from the same bf16/f16
// inputs: the [B, H, L, D] output, the merged-heads [B, L, H·D] epilogue,
// base + scale · attention, and the IP-Adapter term fused in (`_ip` entries:
// rows from ip_row0 on get ip_scale · attention of q_ip over k_ip, v_ip). Built and run by `scripts/kernel-emulation.sh`.
// Written for this project.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../host_emulation.hpp"
#include "attention.cu"

#include <string>

struct Case {
    const char* name;
    int version;   // 3: attention2 (sync loads), 4: cp.async, 5: 4 with 8 warps, 6: 32 rows a warp, 7: 6 staged,
                   // 8: wgmma (D = 128)
    int B, H, L, S, D;
    bool merged, add;
    int S_ip = 0, ip_row0 = 0;   // S_ip > 0: the IP term fused in (versions 4 to 7)
};

// Attention of row r of q [BH, L, D] over k, v [BH, S, D] for (b·H + h) = bh, all D columns, in double.
template <typename T>
std::vector<double> attend(const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v, int bh, int r,
                           int L, int S, int D) {
    std::vector<double> p(S), out(D, 0.0);
    double mx = -INFINITY, sum = 0;
    for (int s = 0; s < S; ++s) {
        double dot = 0;
        for (int c = 0; c < D; ++c)
            dot += (double)to_float(q[((size_t)bh * L + r) * D + c]) * to_float(k[((size_t)bh * S + s) * D + c]);
        p[s] = dot / std::sqrt((double)D);
        mx = std::fmax(mx, p[s]);
    }
    for (int s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
    for (int s = 0; s < S; ++s)
        for (int d = 0; d < D; ++d) out[d] += p[s] / sum * to_float(v[((size_t)bh * S + s) * D + d]);
    return out;
}

// Checks one case; returns the kernel's output.
template <typename T> std::vector<T> run_case(const Case& c) {
    std::mt19937 rng(5);
    const int BH = c.B * c.H, DP = (c.D + 15) / 16 * 16;
    auto q = random_vec<T>((size_t)BH * c.L * c.D, rng), k = random_vec<T>((size_t)BH * c.S * c.D, rng),
         v = random_vec<T>((size_t)BH * c.S * c.D, rng), base = random_vec<T>((size_t)BH * c.L * c.D, rng);
    const float out_scale = c.add ? 0.7f : 1.f;
    std::vector<T> o(q.size(), from_float<T>(NAN));
    const float scale_log2 = (float)(1.0 / std::sqrt((double)c.D) * 1.4426950408889634);
    // As mod.rs: K and V tiles of BC2 rows padded by 8 elements, two stages
    // from version 4 on; versions 6 and 7 keep their 128-row Q tile in front of them.
    const size_t pair = 2 * BC2 * (DP + 8) * sizeof(T);
    // Version 8: its 128-row Q tile and two K/V stages, unpadded (wgmma's canonical layout).
    const size_t smem = c.version == 8   ? (size_t)(ROWS8 + 4 * BC2) * D8 * sizeof(T)
                        : c.version == 3 ? pair
                        : c.version >= 6 ? 2 * pair + ROWS6 * (DP + 8) * sizeof(T)
                                         : 2 * pair;
    const int rows = c.version == 3 || c.version == 4 ? 64 : 128;   // per block, as mod.rs
    const unsigned threads = c.version == 5 || c.version == 8 ? 256 : 128;
    const Dim3 grid{(unsigned)((c.L + rows - 1) / rows), (unsigned)BH};
    const bool ip = c.S_ip > 0;
    const int S_ip = ip ? c.S_ip : 1;
    auto q_ip = random_vec<T>((size_t)BH * c.L * c.D, rng), k_ip = random_vec<T>((size_t)BH * S_ip * c.D, rng),
         v_ip = random_vec<T>((size_t)BH * S_ip * c.D, rng);
    const float ip_scale = 0.8f;
    launch(grid, threads, smem, [&] {
        auto run = [&](auto kernel) {
            kernel(q.data(), k.data(), v.data(), o.data(), c.L, c.S, c.D, DP, scale_log2, 1, c.H, c.merged, base.data(),
                   c.add, out_scale, q_ip.data(), k_ip.data(), v_ip.data(), S_ip, c.ip_row0, ip_scale, ip);
        };
        switch (c.version * 2 + ip) {
            case 6: run(attention2<T, false, false, 4>); break;
            case 8: run(attention2<T, true, false, 4>); break;
            case 9: run(attention2<T, true, true, 4>); break;
            case 10: run(attention2<T, true, false, 8>); break;
            case 11: run(attention2<T, true, true, 8>); break;
            case 12: run(attention6<T, false, false>); break;
            case 13: run(attention6<T, true, false>); break;
            case 14: run(attention6<T, false, true>); break;
            case 15: run(attention6<T, true, true>); break;
            case 16: run(attention8<T, false>); break;
            case 17: run(attention8<T, true>); break;
            default: std::printf("%s: no such kernel\n", c.name); ++emu_failures;
        }
    });
    std::vector<float> want(o.size());
    for (int bh = 0; bh < BH; ++bh) {
        const int b = bh / c.H, h = bh % c.H;
        for (int r = 0; r < c.L; ++r) {
            const auto main = attend(q, k, v, bh, r, c.L, c.S, c.D);
            const auto extra = ip && r >= c.ip_row0 ? attend(q_ip, k_ip, v_ip, bh, r, c.L, S_ip, c.D)
                                                    : std::vector<double>(c.D, 0.0);
            for (int d = 0; d < c.D; ++d) {
                const size_t idx = c.merged ? (((size_t)b * c.L + r) * c.H + h) * c.D + d : ((size_t)bh * c.L + r) * c.D + d;
                const double val = main[d] * out_scale + (c.add ? to_float(base[idx]) : 0.0) + ip_scale * extra[d];
                want[idx] = (float)val;
            }
        }
    }
    // As gpu-check's tolerance for bf16/f16 attention (P is rounded to T before P·V, as FlashAttention does).
    compare(c.name, o, want, 2e-2f);
    return o;
}

int main() {
    // Version 3 was checked on a GPU: its passing is the emulator's self-check.
    const Case cases[] = {
        {"v3 bf16 [1,2,100|100,128] (checked on a GPU: emulation self-check)", 3, 1, 2, 100, 100, 128, false, false},
        {"v4 bf16 cp.async [1,2,100|200,128], 4 key tiles, the last partial", 4, 1, 2, 100, 200, 128, false, false},
        {"v4 bf16 [2,3,70|130,128] merged heads", 4, 2, 3, 70, 130, 128, true, false},
        {"v4 bf16 [2,2,64|128,128] merged, base + 0.7 attention (IP term)", 4, 2, 2, 64, 128, 128, true, true},
        {"v3 bf16 [2,2,64|128,128] merged, base + 0.7 attention", 3, 2, 2, 64, 128, 128, true, true},
        {"v4 bf16 [1,2,80|90,72] SigLIP head size (padded columns)", 4, 1, 2, 80, 90, 72, false, false},
        // Versions 5 and 6: 128 rows a block (a partial second block where L is not a multiple).
        {"v5 bf16 [1,2,200|200,128], 2 row blocks, the last partial", 5, 1, 2, 200, 200, 128, false, false},
        {"v5 bf16 [2,3,70|130,128] merged, base + 0.7 attention", 5, 2, 3, 70, 130, 128, true, true},
        {"v5 bf16 [1,2,80|90,72] SigLIP head size", 5, 1, 2, 80, 90, 72, false, false},
        {"v6 bf16 [1,2,200|200,128], 2 row blocks, the last partial", 6, 1, 2, 200, 200, 128, false, false},
        {"v6 bf16 [2,3,70|130,128] merged, base + 0.7 attention", 6, 2, 3, 70, 130, 128, true, true},
        {"v6 bf16 [1,2,80|90,72] SigLIP head size (an odd count of 16-column chunks)", 6, 1, 2, 80, 90, 72, false,
         false},
        // Version 7: version 6's cases through its staged 16-byte epilogue.
        {"v7 bf16 [1,2,200|200,128], 2 row blocks, the last partial", 7, 1, 2, 200, 200, 128, false, false},
        {"v7 bf16 [2,3,70|130,128] merged, base + 0.7 attention", 7, 2, 3, 70, 130, 128, true, true},
        {"v7 bf16 [2,3,200|30,128] [B,H,L,D], base + 0.7 attention, one key tile", 7, 2, 3, 200, 30, 128, false,
         true},
        {"v7 bf16 [1,2,80|90,72] SigLIP head size (lanes past D idle)", 7, 1, 2, 80, 90, 72, false, false},
        {"v7 bf16 [1,3,150|90,72] merged, base + 0.7 attention, D = 72", 7, 1, 3, 150, 90, 72, true, true},
    };
    for (const auto& c : cases) run_case<__nv_bfloat16>(c);
    auto with_ip = [](Case c, const char* name, int S_ip, int ip_row0) {
        c.name = name;
        c.S_ip = S_ip;
        c.ip_row0 = ip_row0;
        return c;
    };
    // The IP term fused in: row blocks wholly before ip_row0, straddling it, after it; S_ip as Flux's 128.
    const Case ip4{"", 4, 2, 2, 200, 100, 128, true, false};
    run_case<__nv_bfloat16>(with_ip(ip4, "v4 + IP bf16 [2,2,200|100,128] merged, IP (S_ip = 128) on rows >= 70", 128, 70));
    run_case<__nv_bfloat16>(with_ip({"", 4, 1, 3, 90, 64, 72, false, false},
                                    "v4 + IP bf16 [1,3,90|64,72] [B,H,L,D], IP (S_ip = 20) on all rows", 20, 0));
    run_case<__half>(with_ip(ip4, "v4 + IP f16 [2,2,200|100,128] merged, IP on rows >= 70", 128, 70));
    run_case<__half>({"v4 f16 [1,2,100|200,128] merged", 4, 1, 2, 100, 200, 128, true, false});
    // 128-row blocks: ip_row0 in the second half of a block (a 64-row skip test would miss it).
    for (int version : {5, 6, 7, 8}) {
        const Case ip{"", version, 1, 2, 300, 100, 128, true, false};
        const std::string v = "v" + std::to_string(version);
        const std::string bf = v + " + IP bf16 [1,2,300|100,128] merged, IP on rows >= 200";
        const std::string hf = v + " + IP f16 [1,2,300|100,128] merged, IP on rows >= 200";
        run_case<__nv_bfloat16>(with_ip(ip, bf.c_str(), 128, 200));
        run_case<__half>(with_ip(ip, hf.c_str(), 128, 200));
    }
    for (int version : {6, 7}) {
        const std::string name = "v" + std::to_string(version) + " + IP bf16 [1,3,90|64,72] [B,H,L,D], IP (S_ip = 20) on all rows";
        run_case<__nv_bfloat16>(with_ip({"", version, 1, 3, 90, 64, 72, false, false}, name.c_str(), 20, 0));
    }
    // Version 8 (wgmma, D = 128 only): version 6's cases at D = 128, and a
    // key count past one tile with a partial last one.
    const Case v8[] = {
        {"v8 bf16 wgmma [1,2,200|200,128], 2 row blocks, the last partial", 8, 1, 2, 200, 200, 128, false, false},
        {"v8 bf16 wgmma [2,3,70|130,128] merged, base + 0.7 attention", 8, 2, 3, 70, 130, 128, true, true},
        {"v8 bf16 wgmma [2,3,200|30,128] [B,H,L,D], base + 0.7 attention, one key tile", 8, 2, 3, 200, 30, 128, false,
         true},
    };
    for (const auto& c : v8) run_case<__nv_bfloat16>(c);
    run_case<__half>({"v8 f16 wgmma [1,2,150|190,128] merged", 8, 1, 2, 150, 190, 128, true, false});
    // Versions 7 and 8 change how results leave the block (7) and which
    // instructions multiply (8; summed in the same order as version 6's
    // mma.sync, 16 keys or head columns a step), not what the results are:
    // under emulation their outputs are version 6's bit for bit (base +
    // s·attention, IP term added), so the descriptors' layouts address the
    // same elements as ldmatrix does.
    for (bool add : {false, true}) {
        const Case c6{"v6 [2,3,150|130,128] merged (for the bit-identity checks)", 6, 2, 3, 150, 130, 128, true, add, 128, 40};
        const auto o6 = run_case<__nv_bfloat16>(c6);
        for (int version : {7, 8}) {
            Case c = c6;
            c.version = version;
            const std::string v = "v" + std::to_string(version);
            const std::string name = v + " [2,3,150|130,128] merged (for the bit-identity checks)";
            c.name = name.c_str();
            const auto o = run_case<__nv_bfloat16>(c);
            const bool same = std::memcmp(o6.data(), o.data(), o6.size() * sizeof(o6[0])) == 0;
            const std::string what = v + " = v6 bit for bit (" + (add ? "base + 0.7 attention, " : "") + "IP rows >= 40)";
            std::printf("%-66s %s\n", what.c_str(), same ? "ok" : "FAIL");
            emu_failures += !same;
        }
    }
    std::printf("attention kernels, host emulation: %d failure(s)\n", emu_failures);
    return emu_failures ? 1 : 0;
}
