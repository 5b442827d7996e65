// Elementwise kernels over `n` values, 256 per workgroup, 2-D grid for large n.
struct Params {
    n: u32,
    nb: u32,   // length of `b` (add_mod) or `a` (repeat): indices wrap modulo it
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// tanh without overflow: tanh(u) = 1 - 2 / (exp(2u) + 1), |u| clamped where tanh is ±1 in f32.
fn tanh_safe(u: f32) -> f32 {
    let c = clamp(u, -15.0, 15.0);
    return 1.0 - 2.0 / (exp(2.0 * c) + 1.0);
}

// GELU, tanh approximation (PyTorch `gelu(approximate="tanh")`).
@compute @workgroup_size(256)
fn gelu_tanh(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    let v = a[i];
    y[i] = 0.5 * v * (1.0 + tanh_safe(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}

// erf after Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
fn erf_approx(v: f32) -> f32 {
    let s = sign(v);
    let t = 1.0 / (1.0 + 0.3275911 * abs(v));
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-v * v));
}

// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
@compute @workgroup_size(256)
fn gelu_erf(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    let v = a[i];
    y[i] = 0.5 * v * (1.0 + erf_approx(v * 0.7071067811865476));
}

// y = a + b[i mod nb]: residual adds (nb = n) and broadcast adds (position embeddings).
@compute @workgroup_size(256)
fn add_mod(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    y[i] = a[i] + b[i % p.nb];
}

// y = a[i mod nb]: a tensor repeated over the batch.
@compute @workgroup_size(256)
fn repeat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    y[i] = a[i % p.nb];
}
