// One `w_at(n, k)` per weight format; the host appends the one it needs to
// matmul.wgsl. Layouts: see quant.rs.

//! f32
fn w_at(n: u32, k: u32) -> f32 {
    return bitcast<f32>(w[n * p.stride + k]);
}

//! f16
fn w_at(n: u32, k: u32) -> f32 {
    let i = n * p.stride + k;
    let pair = unpack2x16float(w[i / 2u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

//! q8
fn w_at(n: u32, k: u32) -> f32 {
    let i = n * p.stride + k;
    let byte = (w[i / 4u] >> ((i % 4u) * 8u)) & 0xffu;
    let q = bitcast<i32>(byte << 24u) >> 24u;
    return f32(q) * scales[n * p.blocks_per_row + k / 32u];
}

//! q4
fn w_at(n: u32, k: u32) -> f32 {
    let i = n * p.stride + k;
    let nib = (w[i / 8u] >> ((i % 8u) * 4u)) & 0xfu;
    return f32(i32(nib) - 8) * scales[n * p.blocks_per_row + k / 32u];
}
