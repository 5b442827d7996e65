// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] + bias[n], without workgroup
// memory: each invocation computes a 4x4 block straight from global memory.
// For CPU-emulated adapters (lavapipe, SwiftShader), where workgroup memory
// and barriers cost more than they save; `w_at` is appended per format.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    stride: u32,
    n_total: u32,
    n_offset: u32,
    blocks_per_row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.y * 4u;
    let c0 = gid.x * 4u;
    if (r0 >= p.m || c0 >= p.n) {
        return;
    }
    // Clamp row/column indices so every load is in bounds; stores are masked.
    var rows: array<u32, 4>;
    var cols: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(r0 + i, p.m - 1u);
        cols[i] = min(c0 + i, p.n - 1u);
    }
    var acc: array<f32, 16>;
    for (var k = 0u; k < p.k; k++) {
        let a0 = x[rows[0] * p.k + k];
        let a1 = x[rows[1] * p.k + k];
        let a2 = x[rows[2] * p.k + k];
        let a3 = x[rows[3] * p.k + k];
        for (var j = 0u; j < 4u; j++) {
            let b = w_at(cols[j], k);
            acc[j] = fma(a0, b, acc[j]);
            acc[4u + j] = fma(a1, b, acc[4u + j]);
            acc[8u + j] = fma(a2, b, acc[8u + j]);
            acc[12u + j] = fma(a3, b, acc[12u + j]);
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + i;
        for (var j = 0u; j < 4u; j++) {
            let c = c0 + j;
            if (r < p.m && c < p.n) {
                y[r * p.n_total + p.n_offset + c] = acc[i * 4u + j] + bias[c];
            }
        }
    }
}
