//! Linear layers with their bias, GELU or residual add in the product's
//! epilogue (`cuda::linear_lt`, feature `cuda`: cuBLASLt's epilogues) as
//! plain parameters: which rows the operands are ([`RowMatrix`]), the
//! product in cuBLASLt's column-major terms ([`plan`], [`with_residual`])
//! and the alignment cuBLASLt is told each pointer has ([`alignment`]). No CUDA here, so the tests below (a host
//! transcription of cuBLASLt's semantics against `GELU(x Wᵀ + b)` computed
//! directly) run in every build, CI's included.

use ipaflux_core::candle_core::Layout;

/// A matrix of `rows` evenly strided rows of `cols` contiguous elements,
/// `stride` apart, from element `offset` of its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMatrix {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl RowMatrix {
    /// `x [..., C]` with every leading dimension walking rows evenly (a
    /// contiguous tensor, or a narrow of a wider one's last dimension);
    /// `None` otherwise.
    pub fn of(l: &Layout) -> Option<Self> {
        let (dims, st) = (l.dims(), l.stride());
        let (&cols, lead) = dims.split_last()?;
        let (&col_stride, lead_st) = st.split_last()?;
        if cols > 1 && col_stride != 1 {
            return None;
        }
        let rows: usize = lead.iter().product();
        // The innermost leading dimension sets the row stride; each outer one
        // must step exactly over the rows inside it.
        let stride = lead_st.last().copied().unwrap_or(cols);
        let mut inner = 1;
        for (&d, &s) in lead.iter().zip(lead_st).rev() {
            if d > 1 && s != inner * stride {
                return None;
            }
            inner *= d;
        }
        (stride >= cols && rows > 0 && cols > 0).then_some(Self { offset: l.start_offset(), rows, cols, stride })
    }
}

/// One cuBLASLt product `D = epilogue(Aᵀ · B + β·C + bias)` in its
/// column-major terms, offsets and leading dimensions in elements: A is
/// always read transposed (PyTorch's `[N, K]` weight is column-major
/// `[K, N]`), B as it is. `c`: `(offset, ldc)` of a residual C in its own
/// storage, added with β = 1 ([`with_residual`]); `None`: C is D and β = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtGemm {
    pub c: Option<(usize, usize)>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: usize,
    pub lda: usize,
    pub b: usize,
    pub ldb: usize,
    pub d: usize,
    pub ldd: usize,
}

/// `Y = GELU(X Wᵀ + b)` for row-major `x [R, K]` and `w [N, K]` (PyTorch's
/// layout), written into a row-major output of `width` columns from column
/// `col0` (the single blocks put the attention in the columns before it).
/// Row-major `Y [R, N]` at row stride `width` is column-major `Yᵀ [N, R]`
/// with `ldd = width`, so the product is issued as `Yᵀ = W Xᵀ`: A = W's
/// memory (column-major `[K, N]`, transposed), B = X's memory (column-major
/// `[K, R]`, as is); the bias runs along D's rows (the output features), as
/// cuBLASLt's bias epilogues add it. `None` where the shapes do not fit
/// together.
pub fn plan(x: RowMatrix, w: RowMatrix, width: usize, col0: usize) -> Option<LtGemm> {
    (x.cols == w.cols && col0 + w.rows <= width).then_some(LtGemm {
        c: None,
        m: w.rows,
        n: x.rows,
        k: x.cols,
        a: w.offset,
        lda: w.stride,
        b: x.offset,
        ldb: x.stride,
        d: col0,
        ldd: width,
    })
}

impl LtGemm {
    /// `self` with every element offset 0: what cuBLASLt's descriptors and
    /// its heuristic's choice depend on (shapes and leading dimensions; the
    /// pointers' alignments are told apart). Products that differ only in
    /// where their operands start share one set of descriptors.
    pub fn shape(&self) -> Self {
        Self { c: self.c.map(|(_, ldc)| (0, ldc)), a: 0, b: 0, d: 0, ..*self }
    }
}

/// `g` with `residual` (row-major `[R, N]`, the output's shape) added to its
/// product: column-major `[N, R]` at `ldc` = its row stride, β = 1 (SigLIP's
/// residual connections after `out_proj` and `fc2`). `None` where the shape
/// differs from the output's.
pub fn with_residual(g: LtGemm, residual: RowMatrix) -> Option<LtGemm> {
    (residual.rows == g.n && residual.cols == g.m)
        .then_some(LtGemm { c: Some((residual.offset, residual.stride)), ..g })
}

/// The alignment cuBLASLt may assume of a pointer (it assumes 256 bytes
/// unless told less, and a kernel chosen for 256 may fault or misread a
/// less aligned operand): the largest power of two dividing `address`, at
/// most 256.
pub fn alignment(address: u64) -> u32 {
    if address == 0 {
        return 256;
    }
    let low = address & address.wrapping_neg();
    low.min(256) as u32
}

#[cfg(test)]
mod tests {
    //! [`plan`]'s parameters through a host transcription of cuBLASLt's
    //! column-major semantics with the `GELU_BIAS` epilogue, against
    //! `GELU(x Wᵀ + b)` computed directly: the index reasoning checked without
    //! a GPU (the GPU run checks cuBLASLt itself).

    use super::*;

    fn gelu(v: f32) -> f32 {
        0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh())
    }

    /// cuBLASLt's matmul on host slices (column-major, element offsets): the
    /// `GELU_BIAS` epilogue, or with a residual C (β = 1) the `BIAS` one.
    fn host_lt(g: &LtGemm, a: &[f32], b: &[f32], c: &[f32], bias: &[f32], d: &mut [f32]) {
        for col in 0..g.n {
            for row in 0..g.m {
                let mut acc = 0f32;
                for p in 0..g.k {
                    let (x, y) = (a[g.a + p + row * g.lda], b[g.b + p + col * g.ldb]);
                    acc += x * y;
                }
                d[g.d + row + col * g.ldd] = match g.c {
                    // β = 0: C is not read.
                    None => gelu(acc + bias[row]),
                    Some((offset, ldc)) => acc + c[offset + row + col * ldc] + bias[row],
                };
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// `x`: rows `x_col0..x_col0 + k` of a `[b, l, x_width]` tensor; `w`: rows
    /// `w_row0..w_row0 + n` of a `[w_rows, k]` weight; output width `head + n`.
    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        l: usize,
        x_width: usize,
        x_col0: usize,
        k: usize,
        w_rows: usize,
        w_row0: usize,
        n: usize,
        head: usize,
    ) {
        let x_mem = values(b * l * x_width, 1);
        let w_mem = values(w_rows * k, 2);
        let bias = values(n, 3);
        let xl = Layout::contiguous((b, l, x_width)).narrow(2, x_col0, k).unwrap_or_else(|e| panic!("{e}"));
        let wl = Layout::contiguous((w_rows, k)).narrow(0, w_row0, n).unwrap_or_else(|e| panic!("{e}"));
        let (x, w) = (RowMatrix::of(&xl).expect("x taken"), RowMatrix::of(&wl).expect("w taken"));
        let width = head + n;
        let g = plan(x, w, width, head).expect("shapes fit");
        let mut out = vec![f32::NAN; b * l * width];
        host_lt(&g, &w_mem, &x_mem, &[], &bias, &mut out);
        let mut worst = 0f32;
        for r in 0..b * l {
            for c in 0..width {
                let got = out[r * width + c];
                if c < head {
                    // The head's columns are the caller's: the product leaves them alone.
                    assert!(got.is_nan(), "column {c} of row {r} written");
                    continue;
                }
                let j = c - head;
                let dot: f32 = (0..k).map(|p| x_mem[r * x_width + x_col0 + p] * w_mem[(w_row0 + j) * k + p]).sum();
                let e = (got - gelu(dot + bias[j])).abs();
                worst = worst.max(if e.is_finite() { e } else { f32::INFINITY });
            }
        }
        assert!(worst < 1e-5, "max error {worst}");
    }

    #[test]
    fn a_contiguous_input_and_weight_give_gelu_of_the_layer() {
        // A double block's `mlp.0`.
        check(1, 5, 6, 0, 6, 7, 0, 7, 0);
    }

    #[test]
    fn the_mlp_half_lands_beside_the_head_from_a_narrowed_weight() {
        // A single block's `linear1` MLP half: weight rows after the QKV rows,
        // written after the attention's columns; two items.
        check(2, 3, 4, 0, 4, 9, 6, 3, 5);
    }

    #[test]
    fn input_rows_read_at_their_stride() {
        check(2, 2, 10, 3, 5, 4, 1, 3, 2);
    }

    #[test]
    fn a_residual_is_added_from_its_own_rows() {
        // SigLIP's `fc2`: y = r + (x Wᵀ + b), r read at its own row stride (a narrow here).
        let (rows, k, n, r_width, r_col0) = (5, 6, 4, 7, 2);
        let (x_mem, w_mem, bias, r_mem) =
            (values(rows * k, 1), values(n * k, 2), values(n, 3), values(rows * r_width, 4));
        let x = RowMatrix::of(&Layout::contiguous((1, rows, k))).expect("x");
        let w = RowMatrix::of(&Layout::contiguous((n, k))).expect("w");
        let rl = Layout::contiguous((1, rows, r_width)).narrow(2, r_col0, n).unwrap_or_else(|e| panic!("{e}"));
        let r = RowMatrix::of(&rl).expect("residual");
        let g = with_residual(plan(x, w, n, 0).expect("plan"), r).expect("residual fits");
        let mut out = vec![f32::NAN; rows * n];
        host_lt(&g, &w_mem, &x_mem, &r_mem, &bias, &mut out);
        for i in 0..rows {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| x_mem[i * k + p] * w_mem[j * k + p]).sum();
                let want = r_mem[i * r_width + r_col0 + j] + dot + bias[j];
                assert!((out[i * n + j] - want).abs() < 1e-5, "({i}, {j}): {} vs {want}", out[i * n + j]);
            }
        }
        let wrong = RowMatrix { cols: n + 1, ..r };
        assert_eq!(with_residual(g, wrong), None, "a residual of another shape");
    }

    #[test]
    fn layouts_and_shapes_that_do_not_fit_are_refused() {
        let t = Layout::contiguous((4, 6)).transpose(0, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(RowMatrix::of(&t), None, "columns not contiguous");
        // Items not one row block apart (a narrow along L of a [B, L, C] tensor).
        let gap = Layout::contiguous((2, 5, 3)).narrow(1, 1, 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(RowMatrix::of(&gap), None);
        let one = Layout::contiguous((1, 5, 3)).narrow(1, 1, 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(RowMatrix::of(&one), Some(RowMatrix { offset: 3, rows: 3, cols: 3, stride: 3 }));
        let x = RowMatrix { offset: 0, rows: 4, cols: 8, stride: 8 };
        let w = RowMatrix { offset: 0, rows: 6, cols: 7, stride: 7 };
        assert_eq!(plan(x, w, 6, 0), None, "inner sizes differ");
        let w = RowMatrix { cols: 8, stride: 8, ..w };
        assert_eq!(plan(x, w, 6, 1), None, "the output does not fit its width");
        assert!(plan(x, w, 7, 1).is_some());
    }

    #[test]
    fn the_shape_forgets_offsets_only() {
        let x = RowMatrix { offset: 5, rows: 4, cols: 8, stride: 8 };
        let w = RowMatrix { offset: 16, rows: 6, cols: 8, stride: 8 };
        let r = RowMatrix { offset: 3, rows: 4, cols: 6, stride: 9 };
        let g = with_residual(plan(x, w, 7, 1).expect("plan"), r).expect("residual");
        let moved = with_residual(
            plan(RowMatrix { offset: 0, ..x }, RowMatrix { offset: 0, ..w }, 7, 1).expect("plan"),
            RowMatrix { offset: 0, ..r },
        )
        .expect("residual");
        assert_ne!(g, moved);
        assert_eq!(g.shape(), moved.shape(), "offsets only");
        let wider = plan(RowMatrix { stride: 10, ..x }, w, 7, 1).expect("plan");
        assert_ne!(g.shape(), wider.shape(), "another leading dimension");
        let no_residual = plan(x, w, 7, 1).expect("plan");
        assert_ne!(g.shape(), no_residual.shape(), "β = 0 against a residual");
    }

    #[test]
    fn alignment_is_the_lowest_set_bit_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x1000 + 6144), 256);
        assert_eq!(alignment(0x1000 + 2 * 96), 64);
        assert_eq!(alignment(0x1000 + 2), 2);
        assert_eq!(alignment(0x1000 + 18), 2);
        assert_eq!(alignment(0x1000 + 48), 16);
    }
}
