//! 2-D convolution with a frozen-weight backward and the adapter hook.

use crate::adapter::{apply_adapters, ScaledAdapter};
use crate::gemm::{matmul, matmul_new, matmul_strided, MatRef, Scalar};
use crate::storage::{cpu_slice, hand_over, same_float, Precomputed};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage,
    Result, Shape, Tensor,
};
use candle_nn::VarBuilder;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
        }
    }
}

/// `torch.nn.Conv2d` (square kernel, groups 1, dilation 1) plus adapters.
///
/// On the CPU (f32/f64) the convolution is one gemm per image against an im2col matrix laid out in
/// the weight's own `(c, ki, kj)` order, so neither the weight nor the output is ever transposed,
/// and the bias is the gemm's starting value. Its backward computes only the gradients of the
/// operands that are tracked: a frozen weight (a plain tensor, not a `Var`) gets none.
/// Elsewhere candle's convolution runs, and a frozen weight is handled by computing the output
/// detached and re-attaching it with a backward that yields only `∂x`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: Conv2dConfig,
    pub adapters: Vec<ScaledAdapter>,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_c, "bias")?);
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            config,
            adapters: vec![],
        })
    }

    pub fn from_weights(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        config: Conv2dConfig,
    ) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            config,
            adapters: vec![],
        }
    }

    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.config.padding, self.config.stride)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    /// The base convolution without adapters.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((weight, bias)) = crate::params_like(&self.weight, self.bias.as_ref(), x)? {
            // Mixed precision: the weights meet the activations in their dtype.
            return Self::from_weights(self.name.clone(), weight, bias, self.config)
                .forward_base(x);
        }
        let cpu_kernel = x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.weight.dtype() == x.dtype();
        if cpu_kernel {
            let bias = match &self.bias {
                Some(b) => b.clone(),
                None => Tensor::zeros(self.weight.dim(0)?, x.dtype(), x.device())?,
            };
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &bias.contiguous()?,
                Conv2dGemm(self.config),
            );
        }
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if !trainable && !x.track_op() {
            return self.plain(x);
        }
        if crate::cuda_kernel(x) {
            return gemm_backward_conv(x, &self.weight, self.bias.as_ref(), self.config);
        }
        if trainable {
            return self.plain(x);
        }
        let value = self.plain(&x.detach())?.contiguous()?;
        x.apply_op1(FrozenConvBackward {
            value: Precomputed::new("frozen conv", value),
            weight: self.weight.clone(),
            config: self.config,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        apply_adapters(y, x, &self.adapters)
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, xs)
    }
}

/// `conv(x, w) + b` whose output comes from candle's convolution (on CUDA: im2col + cuBLAS, or
/// cuDNN) and whose backward is GEMMs around im2col/col2im: `∂x = col2im(Wᵀ·g)`,
/// `∂W = Σ_b g_b·im2col(x_b)ᵀ`, `∂b = Σ g`, each computed only for the operands that are tracked
/// (a frozen weight gets none). candle's own backward would run a transposed-convolution loop
/// for `∂x` and, for `∂W`, a convolution whose kernel is the whole output gradient: the slow,
/// memory-hungry part of a training step on a GPU (issue 9). The column matrices exist one
/// image at a time, only inside the backward pass.
pub(crate) fn gemm_backward_conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    config: Conv2dConfig,
) -> Result<Tensor> {
    let geometry = ConvGeometry::new(x.dims(), w.dims(), config)?;
    let (xd, wd) = (x.detach(), w.detach());
    let mut value = conv2d(&xd, &wd, config.padding, config.stride)?;
    if let Some(b) = b {
        value = value.broadcast_add(&b.detach().reshape((1, (), 1, 1))?)?;
    }
    let bias = match b {
        Some(b) => b.clone(),
        // An untracked stand-in: a bias-less convolution gets no bias gradient.
        None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
    };
    x.apply_op3(
        w,
        &bias,
        GemmConvBackward {
            value: Precomputed::new("conv2d", value.contiguous()?),
            geometry,
        },
    )
}

struct GemmConvBackward {
    value: Precomputed,
    geometry: ConvGeometry,
}

impl CustomOp3 for GemmConvBackward {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward"
    }
    crate::storage::hand_over_fwd3!(value);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        let (batch, c_out) = (x.dim(0)?, w.dim(0)?);
        let (rows, p) = (g.rows(), g.pixels_out());
        let grad = grad.contiguous()?.reshape((batch, c_out, p))?;
        let w2 = w.reshape((c_out, rows))?;
        let mut gx = Vec::new();
        let mut gw: Option<Tensor> = None;
        for i in 0..batch {
            let g_i = grad.get(i)?;
            if x.track_op() {
                let cols = w2.t()?.matmul(&g_i)?;
                gx.push(if g.is_pointwise() {
                    cols.reshape((1, g.c_in, g.h, g.w))?
                } else {
                    cols.unsqueeze(0)?.apply_op1_no_bwd(&Col2Im(g))?
                });
            }
            if w.track_op() {
                let x_i = x.narrow(0, i, 1)?.contiguous()?;
                let cols = if g.is_pointwise() {
                    x_i.reshape((rows, p))?
                } else {
                    x_i.apply_op1_no_bwd(&Im2Col(g))?.squeeze(0)?
                };
                // Summed over images in f32: half precision would round at every image.
                let part = crate::upcast_half(&g_i.matmul(&cols.t()?)?)?;
                gw = Some(match gw {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        let gx = if gx.is_empty() {
            None
        } else {
            Some(Tensor::cat(&gx, 0)?)
        };
        let gw = gw
            .map(|t| t.to_dtype(w.dtype())?.reshape(w.shape()))
            .transpose()?;
        let gb = if b.track_op() {
            Some(
                crate::upcast_half(&grad)?
                    .sum((0, 2))?
                    .to_dtype(b.dtype())?,
            )
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

/// `[B, C, H, W]` to its column matrices `[B, C·k·k, Ho·Wo]` (rows in the weight's
/// `(c, ki, kj)` order); no backward (it runs inside one).
struct Im2Col(ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let batch = l.dims()[0];
        let (img_len, rows, p) = (g.c_in * g.h * g.w, g.rows(), g.pixels_out());
        let out = same_float!("im2col", (cpu_slice(s, l)?), (x) => {
            let mut cols = vec![Default::default(); batch * rows * p];
            for (img, c) in x.chunks(img_len).zip(cols.chunks_mut(rows * p)) {
                g.im2col(img, (0, g.h_out), c);
            }
            cols
        });
        Ok((out, Shape::from((batch, rows, p))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.0;
        let batch = l.dims()[0];
        let out = crate::cuda::im2col(&g.cuda_geometry(), (s, l), false)?;
        Ok((out, Shape::from((batch, g.rows(), g.pixels_out()))))
    }
}

/// The adjoint of [`Im2Col`]: columns `[B, C·k·k, Ho·Wo]` summed back onto `[B, C, H, W]`.
struct Col2Im(ConvGeometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let batch = l.dims()[0];
        let (img_len, rows, p) = (g.c_in * g.h * g.w, g.rows(), g.pixels_out());
        let out = same_float!("col2im", (cpu_slice(s, l)?), (cols) => {
            let mut img = vec![Default::default(); batch * img_len];
            for (c, x) in cols.chunks(rows * p).zip(img.chunks_mut(img_len)) {
                g.col2im_add(c, (0, g.h_out), x);
            }
            img
        });
        Ok((out, Shape::from((batch, g.c_in, g.h, g.w))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.0;
        let batch = l.dims()[0];
        let out = crate::cuda::im2col(&g.cuda_geometry(), (s, l), true)?;
        Ok((out, Shape::from((batch, g.c_in, g.h, g.w))))
    }
}

/// Hands out an already computed output and, in the backward pass, the input gradient of a
/// convolution with a frozen weight. The value is taken out on the forward so the graph does not
/// keep a second copy of the activation.
struct FrozenConvBackward {
    value: Precomputed,
    weight: Tensor,
    config: Conv2dConfig,
}

impl CustomOp1 for FrozenConvBackward {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        hand_over!(self.value, Cpu)
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        hand_over!(self.value, Cuda)
    }
    fn metal_fwd(&self, _s: &MetalStorage, _l: &Layout) -> Result<(MetalStorage, Shape)> {
        hand_over!(self.value, Metal)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Conv2dConfig { padding, stride } = self.config;
        let k = self.weight.dim(2)?;
        // conv_transpose2d output size: (g - 1)·s − 2p + (k − 1) + out_pad + 1 must equal x's.
        let out = (grad.dim(2)? - 1) * stride + k - 2 * padding;
        let out_padding = x.dim(2)? - out;
        let gx = f32_for_cpu_bf16(grad, &self.weight, |g, w| {
            g.conv_transpose2d(w, padding, out_padding, stride, 1)
        })?;
        Ok(Some(gx))
    }
}

/// `f(x, w)`, computed in f32 and rounded back when `x` is bf16 on the CPU, where candle's
/// convolutions have no bf16 kernel: mixed precision (`--mixed-precision bf16`) then runs on
/// the CPU too, slowly, as it does on a GPU.
fn f32_for_cpu_bf16(
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        return f(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
    }
    f(x, w)
}

/// `x ⊛ w` (candle's convolution, differentiable), bf16 on the CPU included.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    f32_for_cpu_bf16(x, w, |x, w| x.conv2d(w, padding, stride, 1, 1))
}

/// The sizes of one convolution: input `[C, H, W]`, output `[Ho, Wo]`, square kernel `k`.
#[derive(Clone, Copy, Debug)]
struct ConvGeometry {
    c_in: usize,
    h: usize,
    w: usize,
    h_out: usize,
    w_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeometry {
    fn new(x_dims: &[usize], w_dims: &[usize], config: Conv2dConfig) -> Result<Self> {
        let (&[_, c_in, h, w], &[_, c_w, k, k2]) = (x_dims, w_dims) else {
            bail!("conv2d: expected a [B, C, H, W] input and a [O, C, k, k] weight, got {x_dims:?} and {w_dims:?}")
        };
        let Conv2dConfig { padding, stride } = config;
        if c_in != c_w || k != k2 || stride == 0 || h + 2 * padding < k || w + 2 * padding < k {
            bail!("conv2d: input {x_dims:?} does not fit weight {w_dims:?} with padding {padding}, stride {stride}")
        }
        Ok(Self {
            c_in,
            h,
            w,
            h_out: (h + 2 * padding - k) / stride + 1,
            w_out: (w + 2 * padding - k) / stride + 1,
            k,
            stride,
            padding,
        })
    }

    /// The sizes as the CUDA kernels take them.
    #[cfg(feature = "cuda")]
    fn cuda_geometry(&self) -> crate::cuda::ConvSizes {
        crate::cuda::ConvSizes {
            c_in: self.c_in,
            h: self.h,
            w: self.w,
            h_out: self.h_out,
            w_out: self.w_out,
            k: self.k,
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// A 1×1, stride-1, unpadded convolution reads the image itself as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn pixels_out(&self) -> usize {
        self.h_out * self.w_out
    }

    /// For output column `ow` and kernel column `kj`: the input column, if inside the image.
    fn src_col(&self, ow: usize, kj: usize) -> Option<usize> {
        (ow * self.stride + kj)
            .checked_sub(self.padding)
            .filter(|&x| x < self.w)
    }

    fn src_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.stride + ki)
            .checked_sub(self.padding)
            .filter(|&y| y < self.h)
    }

    /// Output rows per column tile: the column matrix of a tile stays under `COLS_BUDGET`
    /// elements, so a 512 px VAE convolution never builds a gigabyte-sized im2col.
    fn tile_rows(&self) -> usize {
        (COLS_BUDGET / (self.rows() * self.w_out).max(1)).clamp(1, self.h_out.max(1))
    }

    /// `(first output row, rows)` of each tile.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let (h_out, step) = (self.h_out, self.tile_rows());
        (0..h_out)
            .step_by(step)
            .map(move |oh0| (oh0, step.min(h_out - oh0)))
    }

    /// im2col of output rows `[oh0, oh0 + rows)` of one image `[C, H, W]` into
    /// `cols [C·k·k, rows·Wo]`, rows in the weight's `(c, ki, kj)` order so that
    /// `W [O, C·k·k] · cols` is that block of the NCHW output.
    fn im2col<T: Scalar>(&self, img: &[T], (oh0, rows): (usize, usize), cols: &mut [T]) {
        use rayon::prelude::*;
        let (k, plane) = (self.k, self.h * self.w);
        let p = rows * self.w_out;
        cols[..self.rows() * p]
            .par_chunks_mut(k * k * p)
            .enumerate()
            .for_each(|(c, chan)| {
                let src = &img[c * plane..(c + 1) * plane];
                for ki in 0..k {
                    for kj in 0..k {
                        let row = &mut chan[(ki * k + kj) * p..(ki * k + kj + 1) * p];
                        for (i, dst) in row.chunks_mut(self.w_out).enumerate() {
                            let Some(y) = self.src_row(oh0 + i, ki) else {
                                dst.fill(T::ZERO);
                                continue;
                            };
                            let line = &src[y * self.w..(y + 1) * self.w];
                            if self.stride == 1 {
                                // One contiguous run, zero-padded at both ends.
                                let lo = self.padding.saturating_sub(kj).min(self.w_out);
                                let hi = (self.w + self.padding)
                                    .saturating_sub(kj)
                                    .clamp(lo, self.w_out);
                                dst[..lo].fill(T::ZERO);
                                dst[lo..hi].copy_from_slice(
                                    &line[lo + kj - self.padding..hi + kj - self.padding],
                                );
                                dst[hi..].fill(T::ZERO);
                            } else {
                                for (ow, d) in dst.iter_mut().enumerate() {
                                    *d = self.src_col(ow, kj).map_or(T::ZERO, |x| line[x]);
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Adds columns `[C·k·k, rows·Wo]` of output rows `[oh0, oh0 + rows)` back onto pixels
    /// `[C, H, W]`, summing the overlaps: the adjoint of [`Self::im2col`].
    fn col2im_add<T: Scalar>(&self, cols: &[T], (oh0, rows): (usize, usize), img: &mut [T]) {
        use rayon::prelude::*;
        let (k, plane) = (self.k, self.h * self.w);
        let p = rows * self.w_out;
        // One channel plane per task: each writes only its own pixels.
        img.par_chunks_mut(plane).enumerate().for_each(|(c, dst)| {
            for ki in 0..k {
                for kj in 0..k {
                    let row = (c * k * k + ki * k + kj) * p;
                    let src = &cols[row..row + p];
                    for i in 0..rows {
                        let Some(y) = self.src_row(oh0 + i, ki) else {
                            continue;
                        };
                        for ow in 0..self.w_out {
                            if let Some(x) = self.src_col(ow, kj) {
                                dst[y * self.w + x] += src[i * self.w_out + ow];
                            }
                        }
                    }
                }
            }
        });
    }

    /// A tile's columns of an output-shaped matrix `[rows, Ho·Wo]` (an output gradient): rows
    /// of the tile's length, a whole output row apart.
    fn tile_columns<'a, T>(
        &self,
        m: &'a [T],
        rows: usize,
        (oh0, n): (usize, usize),
    ) -> MatRef<'a, T> {
        MatRef {
            data: &m[oh0 * self.w_out..],
            rows,
            cols: n * self.w_out,
            row_stride: self.pixels_out(),
            col_stride: 1,
        }
    }

    /// The column buffer for one tile (empty for a pointwise convolution, which needs none).
    fn cols_buffer<T: Scalar>(&self) -> Vec<T> {
        if self.is_pointwise() {
            vec![]
        } else {
            vec![T::ZERO; self.rows() * self.tile_rows() * self.w_out]
        }
    }
}

/// Most elements one im2col tile may hold (16 MiB of f32).
#[cfg(not(test))]
const COLS_BUDGET: usize = 1 << 22;
/// Tests run on images of a few pixels: a tiny budget makes them cross ragged multi-row tiles.
#[cfg(test)]
const COLS_BUDGET: usize = 200;

/// The CPU convolution `y = W · im2col(x) + b` over `(x, weight, bias)`; see [`Conv2d`].
struct Conv2dGemm(Conv2dConfig);

impl Conv2dGemm {
    fn run<T: Scalar>(&self, x: &[T], w: &[T], b: &[T], g: &ConvGeometry, batch: usize) -> Vec<T> {
        let (c_out, p) = (b.len(), g.pixels_out());
        let weight = MatRef::row_major(w, c_out, g.rows());
        let mut out = vec![T::ZERO; batch * c_out * p];
        let mut cols = g.cols_buffer();
        let img_len = g.c_in * g.h * g.w;
        for (bi, dst) in out.chunks_mut(c_out * p).enumerate() {
            for (row, &bias) in dst.chunks_mut(p).zip(b) {
                row.fill(bias);
            }
            let img = &x[bi * img_len..(bi + 1) * img_len];
            if g.is_pointwise() {
                matmul(dst, true, weight, MatRef::row_major(img, g.rows(), p));
                continue;
            }
            for tile in g.tiles() {
                let pt = tile.1 * g.w_out;
                g.im2col(img, tile, &mut cols);
                let block = &mut dst[tile.0 * g.w_out..];
                let rhs = MatRef::row_major(&cols, g.rows(), pt);
                matmul_strided(block, p, true, weight, rhs);
            }
        }
        out
    }
}

impl CustomOp3 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xd, wd) = (l1.dims(), l2.dims());
        let g = ConvGeometry::new(xd, wd, self.0)?;
        if l3.dims() != [wd[0]] {
            bail!("conv2d: bias {:?} for {} output channels", l3.dims(), wd[0])
        }
        let out = same_float!(
            "conv2d",
            (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?),
            (x, w, b) => self.run(x, w, b, &g, xd[0])
        );
        Ok((out, Shape::from((xd[0], wd[0], g.h_out, g.w_out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let geometry = ConvGeometry::new(x.dims(), w.dims(), self.0)?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvInputGrad(geometry))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &ConvWeightGrad(geometry))?)
        } else {
            None
        };
        let gb = if !b.track_op() {
            None
        } else if grad.device().is_cpu() {
            Some(grad.apply_op1_no_bwd(&ChannelSum)?)
        } else {
            Some(grad.sum((0, 2, 3))?)
        };
        Ok((gx, gw, gb))
    }
}

/// A bias gradient: `[B, C, H, W]` summed to `[C]`. candle's `sum((0, 2, 3))` reduces through
/// a strided index walk (2 % of a DreamBooth step); each `(b, c)` plane here is one contiguous run,
/// summed in 8 lanes.
struct ChannelSum;

impl ChannelSum {
    fn run<T: Scalar>(grad: &[T], channels: usize, plane: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; channels];
        if plane == 0 {
            return out;
        }
        for image in grad.chunks(channels * plane) {
            for (sum, run) in out.iter_mut().zip(image.chunks(plane)) {
                let mut lanes = [T::ZERO; 8];
                let mut chunks = run.chunks_exact(8);
                for c in &mut chunks {
                    for (l, v) in lanes.iter_mut().zip(c) {
                        *l += *v;
                    }
                }
                for v in chunks.remainder() {
                    lanes[0] += *v;
                }
                for l in lanes {
                    *sum += l;
                }
            }
        }
        out
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "conv2d-bias-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, channels, h, w) = l.shape().dims4()?;
        let out = same_float!("conv2d bias gradient", (cpu_slice(s, l)?), (g) => {
            Self::run(g, channels, h * w)
        });
        Ok((out, Shape::from(channels)))
    }
}

/// `∂x = col2im(Wᵀ · g)` per image, over `(grad, weight)`.
struct ConvInputGrad(ConvGeometry);

impl ConvInputGrad {
    fn run<T: Scalar>(&self, grad: &[T], w: &[T], c_out: usize) -> Vec<T> {
        let g = self.0;
        let (p, img_len) = (g.pixels_out(), g.c_in * g.h * g.w);
        let batch = grad.len() / (c_out * p);
        let weight_t = MatRef::row_major(w, c_out, g.rows()).t();
        let mut out = vec![T::ZERO; batch * img_len];
        let mut cols = g.cols_buffer();
        for (bi, img) in out.chunks_mut(img_len).enumerate() {
            let grad = &grad[bi * c_out * p..(bi + 1) * c_out * p];
            if g.is_pointwise() {
                matmul(img, false, weight_t, MatRef::row_major(grad, c_out, p));
                continue;
            }
            for tile in g.tiles() {
                let pt = tile.1 * g.w_out;
                let g_tile = g.tile_columns(grad, c_out, tile);
                matmul(&mut cols[..g.rows() * pt], false, weight_t, g_tile);
                g.col2im_add(&cols, tile, img);
            }
        }
        out
    }
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let batch = l1.dims()[0];
        let c_out = l2.dims()[0];
        let out = same_float!(
            "conv2d input gradient",
            (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?),
            (gr, w) => self.run(gr, w, c_out)
        );
        Ok((out, Shape::from((batch, g.c_in, g.h, g.w))))
    }
}

/// `∂W = Σ_b g_b · im2col(x_b)ᵀ`, over `(x, grad)`.
struct ConvWeightGrad(ConvGeometry);

impl ConvWeightGrad {
    fn run<T: Scalar>(&self, x: &[T], grad: &[T], c_out: usize) -> Vec<T> {
        let g = self.0;
        let (p, img_len) = (g.pixels_out(), g.c_in * g.h * g.w);
        let batch = x.len() / img_len;
        // The first product creates the gradient (not zeroed first), the others add to it.
        let mut out: Option<Vec<T>> = None;
        let mut add = |lhs: MatRef<T>, rhs: MatRef<T>| match out.as_mut() {
            Some(out) => matmul(out, true, lhs, rhs),
            None => out = Some(matmul_new(lhs, rhs)),
        };
        let mut cols = g.cols_buffer();
        for bi in 0..batch {
            let img = &x[bi * img_len..(bi + 1) * img_len];
            let grad = &grad[bi * c_out * p..(bi + 1) * c_out * p];
            if g.is_pointwise() {
                let cols_t = MatRef::row_major(img, g.rows(), p).t();
                add(MatRef::row_major(grad, c_out, p), cols_t);
                continue;
            }
            for tile in g.tiles() {
                let pt = tile.1 * g.w_out;
                g.im2col(img, tile, &mut cols);
                let g_tile = g.tile_columns(grad, c_out, tile);
                let cols_t = MatRef::row_major(&cols, g.rows(), pt).t();
                add(g_tile, cols_t);
            }
        }
        out.unwrap_or_else(|| vec![T::ZERO; c_out * g.rows()])
    }
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let c_out = l2.dims()[1];
        let out = same_float!(
            "conv2d weight gradient",
            (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?),
            (x, gr) => self.run(x, gr, c_out)
        );
        Ok((out, Shape::from((c_out, g.c_in, g.k, g.k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_grads, check_input_grad, rand_tensor};
    use candle_core::{Device, Var};

    #[test]
    fn frozen_conv_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding, stride, hw) in [
            (3, 1, 1, 5),
            (3, 1, 2, 6),
            (3, 0, 1, 4),
            (3, 1, 2, 5),
            (1, 0, 1, 4),
        ] {
            let w = rand_tensor(&[3, 2, k, k], 1, &dev)?;
            let b = rand_tensor(&[3], 2, &dev)?;
            let conv =
                Conv2d::from_weights("c", w.clone(), Some(b), Conv2dConfig { padding, stride });
            let x = rand_tensor(&[2, 2, hw, hw], 3, &dev)?;
            check_input_grad(&x, |x| conv.forward(x), 1e-6)?;
            let xv = Var::from_tensor(&x)?;
            let g = conv.forward(&xv)?.sum_all()?.backward()?;
            assert!(
                g.get(&w).is_none(),
                "frozen conv weight must get no gradient"
            );
        }
        Ok(())
    }

    /// The im2col + gemm kernel against candle's direct convolution, f32 and f64, including a
    /// non-square image, stride 2, no padding and a pointwise kernel.
    #[test]
    fn gemm_conv_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding, stride, h, w) in [
            (3, 1, 1, 5, 7),
            (3, 1, 2, 6, 5),
            (3, 0, 1, 4, 4),
            (1, 0, 1, 3, 4),
            (1, 0, 2, 5, 5),
            (3, 2, 1, 3, 3),
        ] {
            let wt = rand_tensor(&[4, 3, k, k], 1, &dev)?;
            let b = rand_tensor(&[4], 2, &dev)?;
            let x = rand_tensor(&[2, 3, h, w], 3, &dev)?;
            let expect = x
                .conv2d(&wt, padding, stride, 1, 1)?
                .broadcast_add(&b.reshape((1, 4, 1, 1))?)?;
            for dtype in [DType::F64, DType::F32] {
                let conv = Conv2d::from_weights(
                    "c",
                    wt.to_dtype(dtype)?,
                    Some(b.to_dtype(dtype)?),
                    Conv2dConfig { padding, stride },
                );
                let y = conv.forward(&x.to_dtype(dtype)?)?.to_dtype(DType::F64)?;
                assert_eq!(y.dims(), expect.dims());
                let diff = (y - &expect)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff < 1e-5,
                    "k{k} p{padding} s{stride} {h}x{w} {dtype:?}: {diff}"
                );
            }
        }
        Ok(())
    }

    /// The GEMM backward CUDA convolutions use (im2col/col2im around matmuls), run on the CPU
    /// through the same composition: every operand's gradient against finite differences, a
    /// frozen weight's input gradient alone, and a pointwise kernel (no column matrix).
    #[test]
    fn gemm_backward_conv_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding, stride, h, w) in [
            (3, 1, 1, 4, 5),
            (3, 1, 2, 5, 6),
            (3, 0, 1, 4, 4),
            (3, 2, 2, 3, 4),
            (1, 0, 1, 3, 3),
            (1, 0, 2, 4, 4),
        ] {
            let wt = rand_tensor(&[3, 2, k, k], 1, &dev)?;
            let b = rand_tensor(&[3], 2, &dev)?;
            let x = rand_tensor(&[2, 2, h, w], 3, &dev)?;
            let config = Conv2dConfig { padding, stride };
            check_grads(
                &[x.clone(), wt.clone(), b.clone()],
                |t| gemm_backward_conv(&t[0], &t[1], Some(&t[2]), config),
                1e-6,
            )?;
            check_grads(
                &[x.clone(), wt.clone()],
                |t| gemm_backward_conv(&t[0], &t[1], None, config),
                1e-6,
            )?;
            check_input_grad(&x, |x| gemm_backward_conv(x, &wt, Some(&b), config), 1e-6)?;
            let xv = Var::from_tensor(&x)?;
            let g = gemm_backward_conv(&xv, &wt, Some(&b), config)?
                .sum_all()?
                .backward()?;
            assert!(g.get(&wt).is_none() && g.get(&b).is_none());
        }
        Ok(())
    }

    /// A trainable convolution (DreamBooth): gradients of input, weight and bias, and of a
    /// bias-less one, against finite differences.
    #[test]
    fn trainable_conv_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding, stride, h, w) in [(3, 1, 1, 4, 5), (3, 1, 2, 5, 5), (1, 0, 1, 3, 3)] {
            let wt = rand_tensor(&[3, 2, k, k], 1, &dev)?;
            let b = rand_tensor(&[3], 2, &dev)?;
            let x = rand_tensor(&[2, 2, h, w], 3, &dev)?;
            let config = Conv2dConfig { padding, stride };
            check_grads(
                &[x.clone(), wt.clone(), b],
                |t| {
                    Conv2d::from_weights("c", t[1].clone(), Some(t[2].clone()), config)
                        .forward(&t[0])
                },
                1e-6,
            )?;
            check_grads(
                &[x, wt],
                |t| Conv2d::from_weights("c", t[1].clone(), None, config).forward(&t[0]),
                1e-6,
            )?;
        }
        Ok(())
    }
}
