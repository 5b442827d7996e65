//! The IP-Adapter's term by cuBLAS (`cuda::ip_term`, feature `cuda`) as
//! plain parameters: where the query lies ([`QueryLayout`]) and the two
//! strided-batched products in cuBLAS's column-major terms ([`plan`]). No
//! CUDA here, so the tests below (a host transcription of cuBLAS's
//! semantics, the term computed through it against attention summed
//! directly) run in every build, CI's included.

use ipaflux_core::candle_core::Layout;

/// Where a `[B, H, L, D]` query's rows lie: rows of D contiguous elements,
/// `D` apart, each (item, head) matrix `batch_stride` after the last, from
/// `offset`. `None` if cuBLAS cannot walk it as one strided batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLayout {
    pub offset: usize,
    pub batch_stride: usize,
}

impl QueryLayout {
    pub fn of(l: &Layout) -> Option<Self> {
        let (dims, st) = (l.dims(), l.stride());
        let [b, h, _, d] = *dims else { return None };
        let row_ok = st[3] == 1 || d == 1;
        let rows_ok = st[2] == d;
        // One stride over items and heads together: B = 1, or items H heads apart.
        let batch_ok = b == 1 || st[0] == h * st[1];
        (row_ok && rows_ok && batch_ok).then_some(Self { offset: l.start_offset(), batch_stride: st[1] })
    }
}

/// One strided-batched product in cuBLAS's column-major terms:
/// `C_i = α · op(A_i) · op(B_i) + β · C_i`, `A_i` at `a + i · stride_a` etc.
/// Offsets and strides in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: usize,
    pub lda: usize,
    pub stride_a: usize,
    pub b: usize,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: usize,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// The products of the term for `[B, H, L, D]` queries over `S` keys. Row-major
/// `X [r, c]` is column-major `Xᵀ [c, r]`, so each row-major product
/// `Y = X W` is issued as `Yᵀ = Wᵀ Xᵀ`:
///
/// - scores: `S_i [L, S] = Q_i K_iᵀ` as `S_iᵀ [S, L] = K_i Q_iᵀ`: A = K memory
///   (column-major `[D, S]` = `K_iᵀ`, transposed), B = Q memory (column-major
///   `[D, L]` = `Q_iᵀ`, as is), C = scores, batch over all B·H (item, head);
/// - output, per item b: `O_h [L, D] = P_h V_h` as `O_hᵀ [D, L] = V_hᵀ P_hᵀ`:
///   A = V memory (column-major `[D, S]`), B = P memory (column-major
///   `[S, L]`), C = the output rows of item b from column `h·D`, `ldc = H·D`,
///   batch over the H heads.
pub fn plan(b: usize, h: usize, l: usize, s: usize, d: usize, q: QueryLayout) -> (Gemm, Vec<Gemm>) {
    let scores = Gemm {
        trans_a: true,
        trans_b: false,
        m: s,
        n: l,
        k: d,
        a: 0,
        lda: d,
        stride_a: s * d,
        b: q.offset,
        ldb: d,
        stride_b: q.batch_stride,
        c: 0,
        ldc: s,
        stride_c: l * s,
        batch: b * h,
    };
    let outputs = (0..b)
        .map(|item| Gemm {
            trans_a: false,
            trans_b: false,
            m: d,
            n: l,
            k: s,
            a: item * h * s * d,
            lda: d,
            stride_a: s * d,
            b: item * h * l * s,
            ldb: s,
            stride_b: l * s,
            c: item * l * h * d,
            ldc: h * d,
            stride_c: d,
            batch: h,
        })
        .collect();
    (scores, outputs)
}

#[cfg(test)]
mod tests {
    //! The products' parameters run through a host transcription of cuBLAS's
    //! column-major strided-batched semantics, with the softmax between them,
    //! against attention computed directly: the index reasoning of [`plan`]
    //! checked without a GPU (the GPU run checks cuBLAS itself).

    use super::*;

    /// cuBLAS's `gemmStridedBatched` on host slices (column-major, element offsets).
    fn host_gemm(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], alpha: f32, beta: f32) {
        for i in 0..g.batch {
            let (ab, bb, cb) = (g.a + i * g.stride_a, g.b + i * g.stride_b, g.c + i * g.stride_c);
            for col in 0..g.n {
                for row in 0..g.m {
                    let mut acc = 0f32;
                    for p in 0..g.k {
                        let x = if g.trans_a { a[ab + p + row * g.lda] } else { a[ab + row + p * g.lda] };
                        let y = if g.trans_b { b[bb + col + p * g.ldb] } else { b[bb + p + col * g.ldb] };
                        acc += x * y;
                    }
                    let at = cb + row + col * g.ldc;
                    // As cuBLAS: with β = 0, C is not read (it may hold anything).
                    c[at] = if beta == 0.0 { alpha * acc } else { alpha * acc + beta * c[at] };
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The term through `plan`'s products on host memory, for a query whose
    /// rows are `q_rows` of `l_all` (starting at `row0`), against the direct sum.
    fn check(b: usize, h: usize, l_all: usize, row0: usize, s: usize, d: usize) {
        let l = l_all - row0;
        let q_mem = values(b * h * l_all * d, 1);
        let (k, v, base) = (values(b * h * s * d, 2), values(b * h * s * d, 3), values(b * l * h * d, 4));
        let scale = 0.7f32;
        // Rows row0.. of each (item, head): a narrow along L, as the double blocks pass.
        let layout = Layout::contiguous((b, h, l_all, d)).narrow(2, row0, l).unwrap_or_else(|e| panic!("{e}"));
        let q = QueryLayout::of(&layout).unwrap_or_else(|| panic!("layout not taken"));
        let (first, outputs) = plan(b, h, l, s, d, q);
        let mut scores = vec![f32::NAN; b * h * l * s];
        host_gemm(&first, &k, &q_mem, &mut scores, 1.0 / (d as f32).sqrt(), 0.0);
        let mut probs = scores.clone();
        for row in probs.chunks_mut(s) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter_mut().for_each(|x| *x = (*x - m).exp() / sum);
        }
        let mut out = base.clone();
        for g in &outputs {
            host_gemm(g, &v, &probs, &mut out, scale, 1.0);
        }
        let mut worst = 0f32;
        for bi in 0..b {
            for hi in 0..h {
                for li in 0..l {
                    let qrow = |c: usize| q_mem[((bi * h + hi) * l_all + row0 + li) * d + c];
                    let kv = |t: &[f32], j: usize, c: usize| t[((bi * h + hi) * s + j) * d + c];
                    let logits: Vec<f32> = (0..s)
                        .map(|j| (0..d).map(|c| qrow(c) * kv(&k, j, c)).sum::<f32>() / (d as f32).sqrt())
                        .collect();
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let w: Vec<f32> = logits.iter().map(|x| (x - m).exp()).collect();
                    let sum: f32 = w.iter().sum();
                    for c in 0..d {
                        let attn: f32 = (0..s).map(|j| w[j] / sum * kv(&v, j, c)).sum();
                        let at = (bi * l + li) * h * d + hi * d + c;
                        let e = (out[at] - (base[at] + scale * attn)).abs();
                        // A NaN (an element never written) is an infinite error; `max` alone would skip it.
                        worst = worst.max(if e.is_finite() { e } else { f32::INFINITY });
                    }
                }
            }
        }
        assert!(worst < 1e-4, "[{b},{h},{l_all}->{l},{s},{d}]: max error {worst}");
    }

    #[test]
    fn the_products_compute_the_term_with_heads_merged() {
        check(1, 3, 7, 0, 5, 4);
    }

    #[test]
    fn a_narrowed_query_is_read_in_place() {
        // A double block: the image rows after the text tokens.
        check(1, 2, 9, 4, 3, 8);
    }

    #[test]
    fn items_get_their_own_output_rows() {
        check(2, 3, 6, 2, 4, 2);
    }

    #[test]
    fn layouts_cublas_cannot_walk_are_refused() {
        // Heads transposed with rows: rows are no longer D apart.
        let t = Layout::contiguous((1, 4, 6, 8)).transpose(1, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(QueryLayout::of(&t), None);
        let c = Layout::contiguous((2, 4, 6, 8));
        assert_eq!(QueryLayout::of(&c), Some(QueryLayout { offset: 0, batch_stride: 48 }));
    }
}
