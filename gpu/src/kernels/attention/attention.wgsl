// Softmax attention without mask, scale 1/sqrt(D), heads packed in the last
// dimension: q [B, Lq, H*D], k and v [B, Lk, H*D] -> o [B, Lq, H*D].
// One invocation per (batch, head, query); a single pass over the keys with
// the online softmax (running max and sum, rescaled accumulator; Milakov &
// Gimelshein 2018, as in FlashAttention). Keys and values are staged through
// workgroup memory in tiles shared by the 64 queries of a workgroup, which
// all belong to one (batch, head).
struct Params {
    batch: u32,
    lq: u32,
    lk: u32,
    heads: u32,
    d: u32,
    scale: f32,
    q_blocks: u32,   // ceil(lq / 64)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;

const MAX_D: u32 = 128u;
const TILE: u32 = 16u;   // keys per staged tile

var<workgroup> ks: array<f32, 2048>; // [TILE][MAX_D]
var<workgroup> vs: array<f32, 2048>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wg.x + wg.y * nwg.x;          // (batch, head, query block)
    let qb = group % p.q_blocks;
    let bh = group / p.q_blocks;
    if (bh >= p.batch * p.heads) {
        return;
    }
    let h = bh % p.heads;
    let b = bh / p.heads;
    let qi = qb * 64u + lid;
    let live = qi < p.lq;
    let width = p.heads * p.d;
    var qv: array<f32, MAX_D>;
    var acc: array<f32, MAX_D>;
    if (live) {
        let base = (b * p.lq + qi) * width + h * p.d;
        for (var j = 0u; j < p.d; j++) {
            qv[j] = q[base + j] * p.scale;
        }
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var t0 = 0u; t0 < p.lk; t0 += TILE) {
        let count = min(TILE, p.lk - t0);
        for (var e = lid; e < count * p.d; e += 64u) {
            let r = e / p.d;
            let j = e % p.d;
            let src = (b * p.lk + t0 + r) * width + h * p.d + j;
            ks[r * MAX_D + j] = k[src];
            vs[r * MAX_D + j] = v[src];
        }
        workgroupBarrier();
        if (live) {
            for (var r = 0u; r < count; r++) {
                var s = 0.0;
                for (var j = 0u; j < p.d; j++) {
                    s = fma(qv[j], ks[r * MAX_D + j], s);
                }
                let m_new = max(m, s);
                let corr = exp(m - m_new);
                let e = exp(s - m_new);
                l = l * corr + e;
                for (var j = 0u; j < p.d; j++) {
                    acc[j] = fma(acc[j], corr, e * vs[r * MAX_D + j]);
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let base = (b * p.lq + qi) * width + h * p.d;
        for (var j = 0u; j < p.d; j++) {
            o[base + j] = acc[j] / l;
        }
    }
}
