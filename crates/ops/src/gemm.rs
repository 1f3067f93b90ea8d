//! A safe front for the `gemm` crate (the kernel behind candle's CPU matmul), for ops that lay out
//! their own operands (im2col convolution, tiled attention) and want the product written straight
//! into their buffer, optionally accumulated onto what is there (a fused bias or a running sum).

/// A strided read-only matrix view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Scalars the kernels run in.
pub(crate) trait Scalar:
    Copy + Send + Sync + Default + 'static + std::ops::AddAssign + std::ops::Mul<Output = Self>
{
    const ONE: Self;
    const ZERO: Self;
    fn from_f64(v: f64) -> Self;
}

impl Scalar for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Scalar for f64 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// `dst [m, n] (row-major) = lhs [m, k] · rhs [k, n]`, or `+=` when `accumulate`.
///
/// Splits across the rayon pool when the product is large enough to pay for it, as candle does.
pub(crate) fn matmul<T: Scalar>(dst: &mut [T], accumulate: bool, lhs: MatRef<T>, rhs: MatRef<T>) {
    matmul_strided(dst, rhs.cols, accumulate, lhs, rhs)
}

/// [`matmul`] into rows `dst_row_stride` apart: a block of columns of a wider matrix.
pub(crate) fn matmul_strided<T: Scalar>(
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(n <= dst_row_stride, "gemm: destination rows overlap");
    assert!(
        m == 0 || n == 0 || dst.len() >= (m - 1) * dst_row_stride + n,
        "gemm: destination too small"
    );
    assert!(lhs.fits() && rhs.fits(), "gemm: operand view out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride).take(m) {
                row[..n].fill(T::ZERO);
            }
        }
        return;
    }
    if few_rows_times_column_major(m, k, n, &rhs) {
        // `gemm` writes a row-major product by solving the transposed problem, which needs the
        // right operand row-major; a column-major one (a linear layer's `x·Wᵀ`) is repacked
        // whole on every call, and with few rows that repacking costs more than the product
        // (64 × 5120 · 5120 × 1280: 9.1 ms, against 3.5 ms for a column-major product plus this
        // transpose, on an Intel Xeon with AVX-512). Computing into a column-major scratch reads
        // the weight in place; the scratch is small because m is.
        let mut scratch = vec![T::ZERO; m * n];
        // SAFETY: the scratch is column-major m × n: element (i, j) at j·m + i < m·n.
        unsafe { product(scratch.as_mut_ptr(), (m as isize, 1), false, lhs, rhs) }
        transpose_into(&scratch, m, n, dst, dst_row_stride, accumulate);
        return;
    }
    // SAFETY: the asserts above bound every index the kernel touches: dst row i spans
    // [i·stride, i·stride + n) inside `dst`.
    unsafe {
        product(
            dst.as_mut_ptr(),
            (1, dst_row_stride as isize),
            accumulate,
            lhs,
            rhs,
        )
    }
}

/// `dst = lhs · rhs` (`+=` when `accumulate`) through `gemm`, with `dst`'s (column, row) strides,
/// on the rayon pool when the product is large enough to pay for it, as candle does.
///
/// # Safety
/// `dst` with those strides must be valid for writes (and for reads when `accumulate`) at every
/// `(i, j)` of the `lhs.rows × rhs.cols` product; `lhs` and `rhs` must [`MatRef::fits`], and
/// `lhs.cols == rhs.rows > 0`. Strides fit in isize because they index allocated slices.
unsafe fn product<T: Scalar>(
    dst: *mut T,
    (dst_col_stride, dst_row_stride): (isize, isize),
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 48 * 48 * 256 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_col_stride,
        dst_row_stride,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        parallelism,
    )
}

/// `lhs [m, k] · rhs [k, n]` into a new row-major `Vec`, written by the kernel without zeroing it
/// first (a weight gradient's first product: zero-filling a 59 MB buffer that the product then
/// overwrites was 2 % of a DreamBooth step).
pub(crate) fn matmul_new<T: Scalar>(lhs: MatRef<T>, rhs: MatRef<T>) -> Vec<T> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(lhs.fits() && rhs.fits(), "gemm: operand view out of bounds");
    if m == 0 || n == 0 || k == 0 || few_rows_times_column_major(m, k, n, &rhs) {
        let mut dst = vec![T::ZERO; m * n];
        matmul(&mut dst, false, lhs, rhs);
        return dst;
    }
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the operands are bounded by the asserts above; the destination is the Vec's
    // allocation of m·n elements, row-major, which the kernel writes in full and never reads
    // (no accumulation), so every element is initialized before `set_len`.
    unsafe {
        product(dst.as_mut_ptr(), (1, n as isize), false, lhs, rhs);
        dst.set_len(m * n);
    }
    dst
}

/// Whether `m × k · k × n` with a column-major right operand is cheaper through a column-major
/// product (see [`matmul_strided`]). Measured on the SD 1.5 UNet's linear layers: with up to 256
/// rows it is (1.3–3.4× faster), at 1024 rows it is not.
fn few_rows_times_column_major<T>(m: usize, k: usize, n: usize, rhs: &MatRef<T>) -> bool {
    rhs.row_stride == 1 && rhs.col_stride != 1 && m <= 256 && k >= 64 && n >= 64
}

/// `dst[i, j] (=|+=) src[j·m + i]`: a column-major `m × n` block into row-major rows
/// `dst_row_stride` apart, in 16 × 16 tiles so that both sides stay in cache.
fn transpose_into<T: Scalar>(
    src: &[T],
    m: usize,
    n: usize,
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
) {
    const TILE: usize = 16;
    for i0 in (0..m).step_by(TILE) {
        for j0 in (0..n).step_by(TILE) {
            for i in i0..(i0 + TILE).min(m) {
                let row = &mut dst[i * dst_row_stride..];
                for j in j0..(j0 + TILE).min(n) {
                    let v = src[j * m + i];
                    if accumulate {
                        row[j] += v;
                    } else {
                        row[j] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_with_transposed_views_and_accumulation() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        let expect = naive(&a, &b, m, k, n);
        let mut dst = vec![0.0; m * n];
        matmul(
            &mut dst,
            false,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
        );
        assert!(dst.iter().zip(&expect).all(|(x, y)| (x - y).abs() < 1e-12));
        // bᵀ stored row-major, read back through a transposed view; accumulate onto 1.0.
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut dst = vec![1.0; m * n];
        matmul(
            &mut dst,
            true,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&bt, n, k).t(),
        );
        assert!(dst
            .iter()
            .zip(&expect)
            .all(|(x, y)| (x - 1.0 - y).abs() < 1e-12));
    }

    #[test]
    fn matmul_new_matches_matmul() {
        for (m, k, n) in [(70, 40, 90), (3, 70, 90), (5, 0, 4)] {
            let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.53).cos()).collect();
            let (lhs, rhs) = (
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&bt, n, k).t(),
            );
            let mut expect = vec![0.0; m * n];
            matmul(&mut expect, false, lhs, rhs);
            assert_eq!(matmul_new(lhs, rhs), expect, "{m}×{k}·{k}×{n}");
        }
    }

    /// Few rows times a column-major right operand takes the column-major product and the
    /// transpose; into a wider destination, overwritten and accumulated.
    #[test]
    fn few_rows_times_column_major_matches_naive() {
        let (m, k, n, stride) = (3, 70, 90, 97);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.53).cos()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
        let expect = naive(&a, &b, m, k, n);
        let rhs = MatRef::row_major(&bt, n, k).t();
        assert!(few_rows_times_column_major(m, k, n, &rhs));
        for accumulate in [false, true] {
            let mut dst = vec![2.0; m * stride];
            matmul_strided(
                &mut dst,
                stride,
                accumulate,
                MatRef::row_major(&a, m, k),
                rhs,
            );
            for i in 0..m {
                for j in 0..stride {
                    let want = if j >= n {
                        2.0
                    } else {
                        expect[i * n + j] + if accumulate { 2.0 } else { 0.0 }
                    };
                    assert!((dst[i * stride + j] - want).abs() < 1e-12, "({i}, {j})");
                }
            }
        }
    }
}
