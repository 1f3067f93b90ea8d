//! imprint's CPU kernels beside candle's own ops on the shapes of the SD 1.5 UNet at 256 px
//! (latents 32×32, batch 1): convolution, attention (forward, and forward + backward).
//!
//!     cargo run --release -p imprint-ops --example kernels
//!
//! Prints milliseconds per call (mean of 5 after a warm-up) and the achieved GFLOP/s.

use candle_core::{DType, Device, Result, Tensor, Var};
use imprint_ops::{scaled_dot_product_attention, Conv2d, Conv2dConfig};
use std::time::Instant;

fn time(name: &str, flops: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let n = 5;
    let start = Instant::now();
    for _ in 0..n {
        f()?;
    }
    let s = start.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:44} {:8.2} ms {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
    Ok(s)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!("3×3 convolution, padding 1 (resnet conv1/conv2 of each UNet level)");
    for (c, o, hw) in [
        (4usize, 320usize, 32usize),
        (320, 320, 32),
        (640, 640, 16),
        (1280, 1280, 8),
        (1280, 1280, 4),
    ] {
        let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (o, c, 3, 3), &dev)?;
        let b = Tensor::zeros(o, DType::F32, &dev)?;
        let flops = 2.0 * (hw * hw * o * c * 9) as f64;
        let conv = Conv2d::from_weights(
            "conv",
            w.clone(),
            Some(b.clone()),
            Conv2dConfig {
                padding: 1,
                stride: 1,
            },
        );
        let candle = time(
            &format!("  candle  {c:4} → {o:4} at {hw}×{hw}"),
            flops,
            || {
                x.conv2d(&w, 1, 1, 1, 1)?
                    .broadcast_add(&b.reshape((1, o, 1, 1))?)
            },
        )?;
        let ours = time(
            &format!("  imprint {c:4} → {o:4} at {hw}×{hw}"),
            flops,
            || conv.forward(&x),
        )?;
        println!("  {:>44} {:.2}×", "speed-up", candle / ours);
    }

    println!("attention, 8 heads of 40 (self-attention at 32×32 and 16×16, cross-attention to 77 tokens)");
    for (sq, sk) in [(1024usize, 1024usize), (256, 256), (1024, 77)] {
        let q = Var::from_tensor(&Tensor::randn(0f32, 1., (8, sq, 40), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., (8, sk, 40), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., (8, sk, 40), &dev)?)?;
        let flops = 4.0 * 8.0 * (sq * sk * 40) as f64;
        // A zero mask sends the call through the composed path: full scores, softmax, matmuls.
        let mask = Tensor::zeros((sq, sk), DType::F32, &dev)?;
        let attend = |mask: Option<&Tensor>| {
            scaled_dot_product_attention(&q, &k, &v, 1.0 / 40f64.sqrt(), mask)
        };
        let backward = |mask: Option<&Tensor>| -> Result<Tensor> {
            let grads = attend(mask)?.sum_all()?.backward()?;
            Ok(grads
                .get(&q)
                .cloned()
                .unwrap_or_else(|| q.as_tensor().clone()))
        };
        let composed = time(&format!("  composed {sq}×{sk} forward"), flops, || {
            attend(Some(&mask))
        })?;
        let tiled = time(&format!("  tiled    {sq}×{sk} forward"), flops, || {
            attend(None)
        })?;
        println!("  {:>44} {:.2}×", "speed-up", composed / tiled);
        let composed = time(
            &format!("  composed {sq}×{sk} forward + backward"),
            3.0 * flops,
            || backward(Some(&mask)),
        )?;
        let tiled = time(
            &format!("  tiled    {sq}×{sk} forward + backward"),
            3.0 * flops,
            || backward(None),
        )?;
        println!("  {:>44} {:.2}×", "speed-up", composed / tiled);
    }
    Ok(())
}
