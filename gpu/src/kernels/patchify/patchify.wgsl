// Unfolds pixels [B, C, H, W] into patches [B, gh*gw, C*p*p] (channel-major
// inside a patch, as a stride-p convolution reads them), so the patch
// embedding is a matmul. One invocation per output value.
struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    size: u32,
    gh: u32,
    gw: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let pp = p.size * p.size;
    let inner = i % (p.c * pp);
    let tok = (i / (p.c * pp)) % (p.gh * p.gw);
    let b = i / (p.c * pp * p.gh * p.gw);
    let c = inner / pp;
    let py = (inner / p.size) % p.size;
    let px = inner % p.size;
    let gy = tok / p.gw;
    let gx = tok % p.gw;
    y[i] = x[((b * p.c + c) * p.h + gy * p.size + py) * p.w + gx * p.size + px];
}
