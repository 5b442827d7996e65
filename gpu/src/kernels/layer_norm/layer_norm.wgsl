// LayerNorm over rows of `cols` values: (x - mean) / sqrt(var + eps) * g + b,
// variance of the centred values (as candle and PyTorch compute it).
// One workgroup of 256 per row; tree reductions in workgroup memory.
struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, 256>;

fn reduce(lid: u32) -> f32 {
    for (var s = 128u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += 256u) {
        s += x[base + c];
    }
    red[lid] = s;
    let mean = reduce(lid) / f32(p.cols);
    var v = 0.0;
    for (var c = lid; c < p.cols; c += 256u) {
        let d = x[base + c] - mean;
        v += d * d;
    }
    red[lid] = v;
    let inv = inverseSqrt(reduce(lid) / f32(p.cols) + p.eps);
    for (var c = lid; c < p.cols; c += 256u) {
        y[base + c] = (x[base + c] - mean) * inv * g[c] + b[c];
    }
}
