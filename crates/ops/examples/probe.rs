use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn time<F: FnMut() -> candle_core::Result<Tensor>>(
    name: &str,
    flops: f64,
    mut f: F,
) -> candle_core::Result<()> {
    let _ = f()?;
    let n = 5;
    let t = Instant::now();
    for _ in 0..n {
        let _ = f()?;
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:40} {:8.2} ms {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
    Ok(())
}
fn main() -> candle_core::Result<()> {
    if std::env::var("ATTN").is_ok() {
        return attn();
    }
    let d = Device::Cpu;
    for (c, o, hw) in [
        (320usize, 320usize, 32usize),
        (640, 640, 16),
        (1280, 1280, 8),
        (1280, 1280, 4),
        (4, 320, 32),
    ] {
        let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &d)?;
        let w = Tensor::randn(0f32, 0.02, (o, c, 3, 3), &d)?;
        let fl = 2.0 * (hw * hw * o * c * 9) as f64;
        time(&format!("candle conv3x3 {c}->{o} @{hw}"), fl, || {
            x.conv2d(&w, 1, 1, 1, 1)
        })?;
        let conv = imprint_ops::Conv2d::from_weights(
            "c",
            w.clone(),
            Some(Tensor::zeros(o, DType::F32, &d)?),
            imprint_ops::Conv2dConfig {
                padding: 1,
                stride: 1,
            },
        );
        time(&format!("imprint conv3x3 {c}->{o} @{hw}"), fl, || {
            conv.forward(&x)
        })?;
    }
    for (m, k, n) in [
        (1024usize, 320usize, 320usize),
        (1024, 320, 2560),
        (1024, 1280, 320),
        (256, 640, 640),
        (64, 1280, 1280),
        (1024, 2880, 320),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &d)?;
        let b = Tensor::randn(0f32, 1., (n, k), &d)?;
        let fl = 2.0 * (m * k * n) as f64;
        time(&format!("matmul x·wT {m}x{k}x{n}"), fl, || {
            a.matmul(&b.t()?)
        })?;
        let bc = b.t()?.contiguous()?;
        time(&format!("matmul x·w(contig) {m}x{k}x{n}"), fl, || {
            a.matmul(&bc)
        })?;
    }
    // attention scores: 8 heads, 1024x40 · 40x1024
    let q = Tensor::randn(0f32, 1., (8, 1024, 40), &d)?;
    let k = Tensor::randn(0f32, 1., (8, 1024, 40), &d)?;
    time(
        "attn q·kT 8x1024x40x1024",
        2.0 * 8.0 * 1024.0 * 1024.0 * 40.0,
        || q.matmul(&k.t()?),
    )?;
    let p = Tensor::randn(0f32, 1., (8, 1024, 1024), &d)?;
    time(
        "attn p·v 8x1024x1024x40",
        2.0 * 8.0 * 1024.0 * 1024.0 * 40.0,
        || p.matmul(&k),
    )?;
    let a = Tensor::randn(0f32, 1., (1, 320, 32, 32), &d)?;
    time("add 320x32x32", 0.0, || a.add(&a))?;
    let big = Tensor::randn(0f32, 1., (8, 1024, 1024), &d)?;
    time("add 8x1024x1024", 0.0, || big.add(&big))?;
    let _ = DType::F32;
    Ok(())
}

#[allow(dead_code)]
fn attn() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (sq, sk) in [(1024usize, 1024usize), (1024, 77), (256, 256)] {
        let q = Tensor::randn(0f32, 1., (8, sq, 40), &d)?;
        let k = Tensor::randn(0f32, 1., (8, sk, 40), &d)?;
        let v = Tensor::randn(0f32, 1., (8, sk, 40), &d)?;
        let fl = 4.0 * 8.0 * (sq * sk * 40) as f64;
        time(&format!("flash attn {sq}x{sk}"), fl, || {
            imprint_ops::scaled_dot_product_attention(&q, &k, &v, 0.15, None)
        })?;
        let mask = Tensor::zeros((sq, sk), DType::F32, &d)?;
        time(&format!("composed attn {sq}x{sk}"), fl, || {
            imprint_ops::scaled_dot_product_attention(&q, &k, &v, 0.15, Some(&mask))
        })?;
        let qv = candle_core::Var::from_tensor(&q)?;
        let kv = candle_core::Var::from_tensor(&k)?;
        let vv = candle_core::Var::from_tensor(&v)?;
        time(&format!("flash attn fwd+bwd {sq}x{sk}"), 3.0 * fl, || {
            let g = imprint_ops::scaled_dot_product_attention(&qv, &kv, &vv, 0.15, None)?
                .sum_all()?
                .backward()?;
            Ok(g.get(&qv).unwrap().clone())
        })?;
        time(
            &format!("composed attn fwd+bwd {sq}x{sk}"),
            3.0 * fl,
            || {
                let g =
                    imprint_ops::scaled_dot_product_attention(&qv, &kv, &vv, 0.15, Some(&mask))?
                        .sum_all()?
                        .backward()?;
                Ok(g.get(&qv).unwrap().clone())
            },
        )?;
    }
    Ok(())
}
