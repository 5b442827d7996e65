// Runs modulation.cu's kernels on the host, without a GPU (../host_emulation.hpp),
// and checks each against a plain reference written here from the kernel's
// contract (the doc comments in modulation.cu and mod.rs). Built and run by
// `scripts/kernel-emulation.sh` (part of `cargo xtask cuda-check`, so CI runs it).
// Written for this project.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../host_emulation.hpp"
#include "modulation.cu"

// One stream of qkv_rope: rows of width 3*H*D at row_stride, this stream's tokens at offset.
template <typename T> struct Stream {
    int L;
    size_t row_stride;
    std::vector<T> qkv, bias, q_scale, k_scale;
};

template <typename T>
void check_qkv_rope(const char* name, int B, int H, int D, std::vector<int> lens, bool keep_q, bool has_bias) {
    std::mt19937 rng(7);
    const int W = 3 * H * D, half = D / 2;
    int L_total = 0;
    for (int l : lens) L_total += l;
    std::vector<Stream<T>> streams;
    for (size_t s = 0; s < lens.size(); ++s) {
        const size_t stride = W + (s == 1 ? 7 : 0);   // the second stream: a narrow of wider rows
        streams.push_back(Stream<T>{lens[s], stride, random_vec<T>(B * lens[s] * stride, rng), random_vec<T>(W, rng, 0.3f),
                                    random_vec<T>(D, rng), random_vec<T>(D, rng)});
    }
    std::vector<float> cos_t(L_total * half), sin_t(L_total * half);
    for (int t = 0; t < L_total; ++t)
        for (int p = 0; p < half; ++p) {
            const double a = (t + 1) * std::pow(10000.0, -2.0 * p / D);
            cos_t[t * half + p] = (float)std::cos(a);
            sin_t[t * half + p] = (float)std::sin(a);
        }
    const int P = keep_q ? 4 : 3;
    const size_t plane = (size_t)B * H * L_total * D;
    std::vector<T> out(P * plane, from_float<T>(NAN));
    std::vector<float> want(P * plane, 0.f);
    const float eps = 1e-6f;
    int offset = 0;
    for (auto& st : streams) {
        const int R = B * st.L;
        const unsigned warps = 8, blocks = (unsigned)((R * H + warps - 1) / warps);
        launch(blocks, warps * 32, [&] {
            if constexpr (std::is_same_v<T, __nv_bfloat16>)
                ipaflux_qkv_rope_bf16(st.qkv.data(), st.bias.data(), st.q_scale.data(), st.k_scale.data(), cos_t.data(),
                                      sin_t.data(), out.data(), R, st.L, H, D, st.row_stride, has_bias, offset, L_total, B,
                                      keep_q, eps);
            else
                ipaflux_qkv_rope_f16(st.qkv.data(), st.bias.data(), st.q_scale.data(), st.k_scale.data(), cos_t.data(),
                                     sin_t.data(), out.data(), R, st.L, H, D, st.row_stride, has_bias, offset, L_total, B,
                                     keep_q, eps);
        });
        // Reference: bias, split, RMSNorm with scale, RoPE on consecutive pairs.
        for (int b = 0; b < B; ++b)
            for (int l = 0; l < st.L; ++l)
                for (int h = 0; h < H; ++h)
                    for (int part = 0; part < 3; ++part) {
                        const T* row = st.qkv.data() + ((size_t)b * st.L + l) * st.row_stride;
                        std::vector<float> x(D);
                        double ss = 0;
                        for (int c = 0; c < D; ++c) {
                            const int i = (part * H + h) * D + c;
                            x[c] = has_bias ? round_to<T>(to_float(row[i]) + to_float(st.bias[i])) : to_float(row[i]);
                            ss += (double)x[c] * x[c];
                        }
                        const int t = offset + l;
                        auto at = [&](int p, int c) { return p * plane + (((size_t)b * H + h) * L_total + t) * D + c; };
                        if (part == 2) {
                            for (int c = 0; c < D; ++c) want[at(2, c)] = x[c];
                            continue;
                        }
                        const float rstd = (float)(1.0 / std::sqrt(ss / D + eps));
                        const auto& scale = part == 0 ? st.q_scale : st.k_scale;
                        for (int p = 0; p < half; ++p) {
                            const float y0 = round_to<T>(x[2 * p] * rstd * to_float(scale[2 * p]));
                            const float y1 = round_to<T>(x[2 * p + 1] * rstd * to_float(scale[2 * p + 1]));
                            if (part == 0 && keep_q) {
                                want[at(3, 2 * p)] = y0;
                                want[at(3, 2 * p + 1)] = y1;
                            }
                            const float cs = cos_t[t * half + p], sn = sin_t[t * half + p];
                            want[at(part, 2 * p)] = y0 * cs - y1 * sn;
                            want[at(part, 2 * p + 1)] = y0 * sn + y1 * cs;
                        }
                    }
        offset += st.L;
    }
    // One rounding of the output, and now and then a rounded intermediate one step apart.
    compare(name, out, want, std::is_same_v<T, __nv_bfloat16> ? 8e-3f : 1e-3f);
}

// H a multiple of 8: the 16-byte path; otherwise the scalar loop.
template <typename T> void check_gated_add(const char* name, bool has_bias, int H) {
    std::mt19937 rng(11);
    const int B = 2, L = 37;
    const size_t n = (size_t)B * L * H;
    auto x = random_vec<T>(n, rng), y = random_vec<T>(n, rng), bias = random_vec<T>(H, rng), gate = random_vec<T>(B * H, rng);
    std::vector<T> out(n, from_float<T>(NAN));
    const unsigned blocks = 5;   // fewer than n / 256: the grid-stride loop is exercised
    launch(blocks, 256, [&] {
        if constexpr (std::is_same_v<T, __nv_bfloat16>)
            ipaflux_gated_add_bf16(x.data(), y.data(), bias.data(), gate.data(), out.data(), n, H, (size_t)L * H, has_bias);
        else
            ipaflux_gated_add_f16(x.data(), y.data(), bias.data(), gate.data(), out.data(), n, H, (size_t)L * H, has_bias);
    });
    std::vector<float> want(n);
    for (size_t i = 0; i < n; ++i) {
        const size_t item = i / ((size_t)L * H), c = i % H;
        const float yb = to_float(y[i]) + (has_bias ? to_float(bias[c]) : 0.f);
        want[i] = to_float(x[i]) + yb * to_float(gate[item * H + c]);
    }
    compare(name, out, want, std::is_same_v<T, __nv_bfloat16> ? 8e-3f : 1e-3f);
}

// The scalar loop was checked on a GPU (session 7); the 16-byte path (H a
// multiple of 8; 3072 is Flux's: one or two vectors a thread) is not yet.
template <typename T> void check_ln_modulate(const char* name, int H) {
    std::mt19937 rng(3);
    const int B = 2, L = 3;
    auto x = random_vec<T>((size_t)B * L * H, rng, 2.f), scale = random_vec<T>(B * H, rng),
         shift = random_vec<T>(B * H, rng);
    std::vector<T> out(x.size(), from_float<T>(NAN));
    launch(B * L, 256, [&] {
        if constexpr (std::is_same_v<T, __nv_bfloat16>)
            ipaflux_ln_modulate_bf16(x.data(), scale.data(), shift.data(), out.data(), H, L, 1e-6f);
        else
            ipaflux_ln_modulate_f16(x.data(), scale.data(), shift.data(), out.data(), H, L, 1e-6f);
    });
    std::vector<float> want(x.size());
    for (int r = 0; r < B * L; ++r) {
        double mean = 0, var = 0;
        for (int c = 0; c < H; ++c) mean += to_float(x[r * H + c]);
        mean /= H;
        for (int c = 0; c < H; ++c) var += std::pow(to_float(x[r * H + c]) - mean, 2);
        const double rstd = 1.0 / std::sqrt(var / H + 1e-6);
        const int item = r / L;
        for (int c = 0; c < H; ++c)
            want[r * H + c] = (float)((to_float(x[r * H + c]) - mean) * rstd * (1 + to_float(scale[item * H + c])) +
                                      to_float(shift[item * H + c]));
    }
    compare(name, out, want, std::is_same_v<T, __nv_bfloat16> ? 8e-3f : 1e-3f);
}

// Checked on a GPU in session 7; here for completeness: rows at a stride (the
// single blocks' MLP half), bias, grid-stride loop. W, S and A multiples of 8
// and a 16-byte aligned start (first = 8): the 16-byte path. A > 0: each
// output row starts with a head row of A values (the joined linear2 input).
void check_gelu_tanh(const char* name, size_t W, size_t S, size_t first, size_t A) {
    std::mt19937 rng(13);
    const size_t rows = 9, OW = A + W;
    auto x = random_vec<__nv_bfloat16>(first + rows * S, rng, 2.f), bias = random_vec<__nv_bfloat16>(W, rng),
         head = random_vec<__nv_bfloat16>(rows * A + 1, rng);
    std::vector<__nv_bfloat16> out(rows * OW, from_float<__nv_bfloat16>(NAN));
    launch(1, 64, [&] {
        ipaflux_gelu_tanh_bf16(x.data() + first, bias.data(), out.data(), rows, (int)W, S, 1, head.data(), (int)A);
    });
    std::vector<float> want(rows * OW);
    for (size_t r = 0; r < rows; ++r) {
        for (size_t c = 0; c < A; ++c) want[r * OW + c] = to_float(head[r * A + c]);
        for (size_t c = 0; c < W; ++c) {
            const double v = (double)to_float(x[first + r * S + c]) + to_float(bias[c]);
            want[r * OW + A + c] =
                (float)(0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))));
        }
    }
    compare(name, out, want, 8e-3f);
}

int main() {
    check_gelu_tanh("gelu_tanh bf16, strided rows, bias (scalar loop)", 40, 57, 5, 0);
    check_gelu_tanh("gelu_tanh bf16, strided rows, bias (16-byte path)", 48, 64, 8, 0);
    check_gelu_tanh("gelu_tanh bf16 after a head of 5 (scalar loop)", 40, 57, 5, 5);
    check_gelu_tanh("gelu_tanh bf16 after a head of 16 (16-byte path)", 48, 64, 8, 16);
    check_ln_modulate<__nv_bfloat16>("ln_modulate bf16, H 300 (scalar loop)", 300);
    check_ln_modulate<__nv_bfloat16>("ln_modulate bf16, H 3072 (16-byte path)", 3072);
    check_ln_modulate<__half>("ln_modulate f16, H 296 (16-byte path)", 296);
    check_gated_add<__nv_bfloat16>("gated_add bf16 with bias (16-byte path)", true, 96);
    check_gated_add<__nv_bfloat16>("gated_add bf16 without bias (16-byte path)", false, 96);
    check_gated_add<__half>("gated_add f16 with bias (16-byte path)", true, 96);
    check_gated_add<__nv_bfloat16>("gated_add bf16 with bias (scalar loop)", true, 100);
    // The first stream's even row stride takes 4-byte pairs, the second's odd one 2-byte accesses.
    check_qkv_rope<__nv_bfloat16>("qkv_rope bf16, 2 streams (text, image), D 128, keep q", 2, 3, 128, {3, 5}, true, true);
    check_qkv_rope<__nv_bfloat16>("qkv_rope bf16, 1 stream, D 128, no q, no bias", 1, 2, 128, {6}, false, false);
    check_qkv_rope<__half>("qkv_rope f16, 2 streams, D 16 (lanes idle), keep q", 2, 2, 16, {2, 3}, true, true);
    check_qkv_rope<__nv_bfloat16>("qkv_rope bf16, 2 streams, D 256 (4 pairs a lane)", 1, 1, 256, {2, 2}, true, true);
    std::printf("modulation kernels, host emulation: %d failure(s)\n", emu_failures);
    return emu_failures ? 1 : 0;
}
