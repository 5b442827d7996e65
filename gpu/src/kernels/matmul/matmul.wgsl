// y[m, n_offset + n] = sum_k x[m, k] * W[n, k] + bias[n]
// A 64x64 output tile per workgroup of 16x16 invocations (4x4 outputs each),
// K in steps of 16 through workgroup memory. The weight is read through
// `w_at`, which the host appends per format (f32, f16, q8, q4): dequantizing
// happens as the tile is loaded.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    stride: u32,        // padded values per weight row
    n_total: u32,       // columns of y (a split weight writes a column range)
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

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> xs: array<f32, 1024>; // [TM][TK]
var<workgroup> ws: array<f32, 1024>; // [TN][TK]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    let tid = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = tid + i * 256u;
            let r = e / TK;
            let kk = e % TK;
            let gk = k0 + kk;
            var xv = 0.0;
            if (row0 + r < p.m && gk < p.k) {
                xv = x[(row0 + r) * p.k + gk];
            }
            xs[e] = xv;
            var wv = 0.0;
            if (col0 + r < p.n && gk < p.k) {
                wv = w_at(col0 + r, gk);
            }
            ws[e] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[(lid.y * 4u + i) * TK + kk];
                b[i] = ws[(lid.x * 4u + i) * TK + kk];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(a[i], b[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x * 4u + j;
            if (r < p.m && c < p.n) {
                y[r * p.n_total + p.n_offset + c] = acc[i * 4u + j] + bias[c];
            }
        }
    }
}
