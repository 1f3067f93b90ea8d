//! Device tests: every op of this crate on CUDA against the same op on the CPU, forward and
//! backward, on the same inputs (issue 9). Built only with `--features cuda`
//! (`tools/cuda/build.sh --tests`) and run on the GPU machine by `tools/cuda/device.sh`; they need a
//! GPU and fail without one, so CI (no GPU) compiles them through `build.sh --check` but never runs
//! them.
//!
//! Tolerances: f32 results agree within 1e-4 relative (DESIGN.md's component tolerance; cuBLAS
//! and the CPU kernels sum in different orders). Half precision is compared with the f32 CPU result:
//! bf16 keeps 8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3) and fp16 11 (2⁻¹¹ ≈ 4.9e-4); an op
//! rounds its inputs, its output and, in reductions, partial sums, so we allow about five unit
//! roundoffs: 2e-2 for bf16, 3e-3 for fp16, measured as relative L2 error over the whole tensor.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use imprint_ops::grad_check::rand_tensor;
use imprint_ops::{
    checkpoint, chunked_attention, fused_attention_applies, geglu, group_norm, group_norm_silu,
    layer_norm, scaled_dot_product_attention, softmax_last_dim, upsample_nearest2x, Adapter,
    Checkpointing, Conv2d, Conv2dConfig, Linear, LowRank, ScaledAdapter,
};
use std::sync::Arc;

fn cuda() -> Device {
    Device::new_cuda(0)
        .expect("these tests need a CUDA device (run them through tools/cuda/device.sh)")
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    imprint_ops::grad_check::rel_l2(a, b).unwrap()
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 3e-3,
        DType::BF16 => 2e-2,
        _ => 1e-10,
    }
}

/// Runs `f` on `inputs` on the CPU in f32 and on CUDA in `dtype`, and compares the output and the
/// gradient of `Σ f(inputs) ⊙ r` for every input (r a fixed random tensor).
fn compare(name: &str, inputs: &[Tensor], dtype: DType, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let run = |device: &Device, dtype: DType| -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| {
                Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap()
            })
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let r = rand_tensor(y.dims(), 99, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(device)
            .unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = ts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                grads
                    .get(t)
                    .unwrap_or_else(|| panic!("{name}: no gradient for input {i} on {device:?}"))
                    .clone()
            })
            .collect();
        (y, gs)
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu, DType::F32);
    let (y_gpu, g_gpu) = run(&cuda(), dtype);
    let tol = tolerance(dtype);
    let err = rel_l2(&y_gpu, &y_cpu);
    assert!(
        err <= tol,
        "{name} {dtype:?} forward: relative error {err:e} > {tol:e}"
    );
    for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        let err = rel_l2(a, b);
        assert!(
            err <= tol,
            "{name} {dtype:?} gradient of input {i}: relative error {err:e} > {tol:e}"
        );
    }
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor(shape, seed, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn softmax_matches_cpu() {
    for dt in DTYPES {
        compare("softmax_last_dim", &[rand(&[3, 5, 77], 1)], dt, |t| {
            softmax_last_dim(&t[0])
        });
    }
}

#[test]
fn layer_norm_matches_cpu() {
    let inputs = [rand(&[2, 7, 64], 1), rand(&[64], 2), rand(&[64], 3)];
    for dt in DTYPES {
        compare("layer_norm", &inputs, dt, |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5)
        });
    }
}

#[test]
fn group_norm_and_silu_match_cpu() {
    let inputs = [rand(&[2, 32, 6, 5], 1), rand(&[32], 2), rand(&[32], 3)];
    for dt in DTYPES {
        compare("group_norm", &inputs, dt, |t| {
            group_norm(&t[0], &t[1], &t[2], 8, 1e-6)
        });
        compare("group_norm_silu", &inputs, dt, |t| {
            group_norm_silu(&t[0], &t[1], &t[2], 8, 1e-6)
        });
    }
}

/// SD-sized rows: a group norm row of 2 × 4096 values and a softmax row of 4096 exceed one block
/// of threads, so the kernels' strided loops and two-stage reductions run.
#[test]
fn large_rows_match_cpu() {
    let inputs = [rand(&[1, 64, 64, 64], 1), rand(&[64], 2), rand(&[64], 3)];
    compare("group_norm_silu (large)", &inputs, DType::F32, |t| {
        group_norm_silu(&t[0], &t[1], &t[2], 32, 1e-5)
    });
    compare("softmax (large)", &[rand(&[8, 4096], 4)], DType::F32, |t| {
        softmax_last_dim(&t[0])
    });
}

/// The query-chunked attention with chunks of 16 rows over 70 (several chunks, a ragged last
/// one), on CUDA against the same on the CPU.
#[test]
fn multi_chunk_attention_matches_cpu() {
    let (q, k, v) = (
        rand(&[4, 70, 40], 1),
        rand(&[4, 77, 40], 2),
        rand(&[4, 77, 32], 3),
    );
    let bytes = 16 * 4 * 4 * 77;
    for dt in DTYPES {
        compare(
            "chunked attention",
            &[q.clone(), k.clone(), v.clone()],
            dt,
            |t| chunked_attention(&t[0], &t[1], &t[2], 0.125, bytes),
        );
    }
}

#[test]
fn geglu_matches_cpu() {
    for dt in DTYPES {
        compare("geglu", &[rand(&[2, 9, 48], 1)], dt, |t| geglu(&t[0]));
    }
}

#[test]
fn attention_matches_cpu() {
    // Lengths that are not multiples of any tile; a key length of 77 as in cross-attention.
    let (q, k, v) = (
        rand(&[4, 70, 40], 1),
        rand(&[4, 77, 40], 2),
        rand(&[4, 77, 40], 3),
    );
    let scale = 1.0 / (40f64).sqrt();
    for dt in DTYPES {
        compare("attention", &[q.clone(), k.clone(), v.clone()], dt, |t| {
            scaled_dot_product_attention(&t[0], &t[1], &t[2], scale, None)
        });
    }
    // With an additive mask (regional composition), f32 only: the mask is an f32 input.
    let mask = rand(&[4, 70, 77], 4);
    compare("attention+mask", &[q, k, v], DType::F32, |t| {
        let m = mask.to_device(t[0].device())?;
        scaled_dot_product_attention(&t[0], &t[1], &t[2], scale, Some(&m))
    });
}

/// The fused tensor-core attention (f16/bf16, head dim ≤ 128) at the head dims of SD 1.x (40,
/// 80), SD 2.x (64) and the largest it takes (128), one below a WMMA tile (8), lengths that are
/// not multiples of its 32-row tiles, cross-attention's 77 keys, and batch·heads > 1.
#[test]
fn fused_attention_matches_cpu() {
    for (i, &(b, sq, sk, d)) in [
        (4, 70, 77, 40),
        (2, 100, 100, 64),
        (3, 33, 5, 80),
        (2, 45, 77, 128),
        (3, 1, 17, 8),
        // Head dims that are not multiples of 8 stage element by element; 96 and 100 load the
        // remaining classes (6, 7).
        (2, 19, 23, 20),
        (1, 40, 33, 100),
        (1, 33, 40, 96),
    ]
    .iter()
    .enumerate()
    {
        let s = 10 * i as u64;
        let (q, k, v) = (
            rand(&[b, sq, d], s + 1),
            rand(&[b, sk, d], s + 2),
            rand(&[b, sk, d], s + 3),
        );
        let scale = 1.0 / (d as f64).sqrt();
        for dt in [DType::BF16, DType::F16] {
            let on = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(&cuda()).unwrap();
            assert!(
                fused_attention_applies(&on(&q), &on(&k), &on(&v)),
                "{b}×{sq}×{sk}×{d} {dt:?} does not take the fused kernels"
            );
            compare(
                &format!("fused attention {b}×{sq}×{sk}×{d}"),
                &[q.clone(), k.clone(), v.clone()],
                dt,
                |t| scaled_dot_product_attention(&t[0], &t[1], &t[2], scale, None),
            );
        }
    }
}

/// The fused attention against the chunked form on the same half-precision inputs on CUDA, at
/// SD 1.5's 512 px self-attention size (4096 tokens, head dim 40, 8 heads): forward and the
/// three gradients, each within bf16's rounding of the other.
#[test]
fn fused_attention_matches_chunked_at_unet_size() {
    let dev = cuda();
    let dt = DType::BF16;
    let t = |seed: u64| {
        Var::from_tensor(
            &rand(&[8, 4096, 40], seed)
                .to_dtype(dt)
                .unwrap()
                .to_device(&dev)
                .unwrap(),
        )
        .unwrap()
    };
    let (q, k, v) = (t(1), t(2), t(3));
    assert!(fused_attention_applies(&q, &k, &v));
    let r = rand(&[8, 4096, 40], 4)
        .to_dtype(dt)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let scale = 1.0 / 40f64.sqrt();
    let run = |f: &dyn Fn() -> Result<Tensor>| {
        let y = f().unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = [&q, &k, &v]
            .iter()
            .map(|x| g.get(x.as_tensor()).unwrap().clone())
            .collect();
        (y, grads)
    };
    let (yf, gf) = run(&|| scaled_dot_product_attention(&q, &k, &v, scale, None));
    let (yc, gc) = run(&|| chunked_attention(&q, &k, &v, scale, 64 << 20));
    let tol = tolerance(dt);
    let err = rel_l2(&yf, &yc);
    assert!(err <= tol, "fused vs chunked forward: {err:e}");
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let err = rel_l2(a, b);
        assert!(err <= tol, "fused vs chunked gradient {i}: {err:e}");
    }
}

/// Only some of q, k, v need a gradient (e.g. a frozen text encoder's keys and values in
/// cross-attention, or only the queries): the others get none, the rest match the CPU.
#[test]
fn fused_attention_partial_gradients_match_cpu() {
    let (q, k, v) = (
        rand(&[2, 40, 64], 1),
        rand(&[2, 77, 64], 2),
        rand(&[2, 77, 64], 3),
    );
    let scale = 0.125;
    let r = rand(&[2, 40, 64], 4);
    for tracked in [
        [true, false, false],
        [false, false, true],
        [false, true, true],
    ] {
        let grads = |device: &Device, dtype: DType| {
            let inputs: Vec<(Tensor, Option<Var>)> = [&q, &k, &v]
                .iter()
                .zip(tracked)
                .map(|(t, tr)| {
                    let t = t.to_dtype(dtype).unwrap().to_device(device).unwrap();
                    if tr {
                        let var = Var::from_tensor(&t).unwrap();
                        (var.as_tensor().clone(), Some(var))
                    } else {
                        (t, None)
                    }
                })
                .collect();
            let y =
                scaled_dot_product_attention(&inputs[0].0, &inputs[1].0, &inputs[2].0, scale, None)
                    .unwrap();
            let r = r.to_dtype(dtype).unwrap().to_device(device).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            inputs
                .iter()
                .map(|(t, var)| {
                    let got = g.get(t).cloned();
                    assert_eq!(got.is_some(), var.is_some(), "{tracked:?} on {device:?}");
                    got
                })
                .collect::<Vec<_>>()
        };
        let cpu = grads(&Device::Cpu, DType::F32);
        let on = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&cuda()).unwrap();
        assert!(fused_attention_applies(&on(&q), &on(&k), &on(&v)));
        let gpu = grads(&cuda(), DType::BF16);
        for (i, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
            if let (Some(a), Some(b)) = (a, b) {
                let err = rel_l2(a, b);
                assert!(
                    err <= tolerance(DType::BF16),
                    "{tracked:?} gradient {i}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn upsample_matches_cpu() {
    for dt in DTYPES {
        compare("upsample_nearest2x", &[rand(&[2, 3, 5, 4], 1)], dt, |t| {
            upsample_nearest2x(&t[0])
        });
    }
}

#[derive(Debug)]
struct TestLora {
    down: Tensor,
    up: Tensor,
}

impl Adapter for TestLora {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.down.t()?)?
            .broadcast_matmul(&self.up.t()?)?
            * 0.75
    }
    fn low_rank(&self) -> Option<LowRank> {
        Some(LowRank {
            down: self.down.clone(),
            up: self.up.clone(),
            scale: 0.75,
        })
    }
}

/// A frozen linear layer (weight and bias are constants, so only the input has a gradient) and
/// the same layer with a LoRA adapter whose factors are trained.
#[test]
fn frozen_and_lora_linear_match_cpu() {
    let w = rand(&[24, 40], 1);
    let b = rand(&[24], 2);
    for dt in DTYPES {
        let (w, b) = (w.clone(), b.clone());
        compare("frozen linear", &[rand(&[2, 9, 40], 3)], dt, move |t| {
            let lin = Linear::from_weights(
                "l",
                w.to_dtype(t[0].dtype())?.to_device(t[0].device())?,
                Some(b.to_dtype(t[0].dtype())?.to_device(t[0].device())?),
            );
            lin.forward(&t[0])
        });
    }
    // Mixed precision: half activations and frozen weight, f32 factors (cast where they meet).
    for dt in [DType::BF16, DType::F16] {
        let dev = cuda();
        let x = rand(&[2, 9, 40], 3);
        let (down, up) = (rand(&[4, 40], 4), rand(&[24, 4], 5));
        let run = |device: &Device, act: DType| -> Vec<Tensor> {
            let down = Var::from_tensor(&down.to_device(device).unwrap()).unwrap();
            let up = Var::from_tensor(&up.to_device(device).unwrap()).unwrap();
            let mut lin = Linear::from_weights(
                "l",
                w.to_dtype(act).unwrap().to_device(device).unwrap(),
                Some(b.to_dtype(act).unwrap().to_device(device).unwrap()),
            );
            lin.adapters.push(ScaledAdapter {
                adapter: Arc::new(TestLora {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                }),
                scale: 0.5,
            });
            let xs = x.to_dtype(act).unwrap().to_device(device).unwrap();
            let y = lin.forward(&xs).unwrap();
            let g = y
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gd = g.get(down.as_tensor()).expect("down gradient").clone();
            let gu = g.get(up.as_tensor()).expect("up gradient").clone();
            assert_eq!(
                gd.dtype(),
                DType::F32,
                "the f32 factor's gradient stays f32"
            );
            vec![y, gd, gu]
        };
        let (cpu, gpu) = (run(&Device::Cpu, DType::F32), run(&dev, dt));
        for (name, (a, b)) in ["output", "down gradient", "up gradient"]
            .iter()
            .zip(gpu.iter().zip(&cpu))
        {
            let err = rel_l2(a, b);
            assert!(
                err <= tolerance(dt),
                "mixed-precision lora linear {dt:?} {name}: {err:e}"
            );
        }
    }
    let inputs = [rand(&[2, 9, 40], 3), rand(&[4, 40], 4), rand(&[24, 4], 5)];
    for dt in DTYPES {
        let (w, b) = (w.clone(), b.clone());
        compare("lora linear", &inputs, dt, move |t| {
            let mut lin = Linear::from_weights(
                "l",
                w.to_dtype(t[0].dtype())?.to_device(t[0].device())?,
                Some(b.to_dtype(t[0].dtype())?.to_device(t[0].device())?),
            );
            lin.adapters.push(ScaledAdapter {
                adapter: Arc::new(TestLora {
                    down: t[1].clone(),
                    up: t[2].clone(),
                }),
                scale: 0.5,
            });
            lin.forward(&t[0])
        });
    }
}

/// Frozen weights get no gradient on CUDA either: the point of the custom linear/conv ops.
#[test]
fn frozen_weights_get_no_gradient_on_cuda() {
    let dev = cuda();
    let w = rand(&[8, 6], 1).to_device(&dev).unwrap();
    let x = Var::from_tensor(&rand(&[3, 6], 2).to_device(&dev).unwrap()).unwrap();
    let lin = Linear::from_weights("l", w.clone(), None);
    let g = lin
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&w).is_none() && g.get(x.as_tensor()).is_some());

    let cw = rand(&[5, 3, 3, 3], 3).to_device(&dev).unwrap();
    let xc = Var::from_tensor(&rand(&[1, 3, 8, 8], 4).to_device(&dev).unwrap()).unwrap();
    let conv = Conv2d::from_weights(
        "c",
        cw.clone(),
        None,
        Conv2dConfig {
            padding: 1,
            stride: 1,
        },
    );
    let g = conv
        .forward(xc.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&cw).is_none() && g.get(xc.as_tensor()).is_some());
}

#[test]
fn conv_matches_cpu() {
    let w = rand(&[6, 4, 3, 3], 1);
    let b = rand(&[6], 2);
    for (stride, padding) in [(1, 1), (2, 1), (1, 0)] {
        let cfg = Conv2dConfig { padding, stride };
        for dt in DTYPES {
            // Frozen weights: the input gradient only.
            let (wf, bf) = (w.clone(), b.clone());
            compare("frozen conv", &[rand(&[2, 4, 9, 7], 3)], dt, move |t| {
                let c = Conv2d::from_weights(
                    "c",
                    wf.to_dtype(t[0].dtype())?.to_device(t[0].device())?,
                    Some(bf.to_dtype(t[0].dtype())?.to_device(t[0].device())?),
                    cfg,
                );
                c.forward(&t[0])
            });
            // Trained weights (DreamBooth): input, weight and bias gradients.
            compare(
                "trained conv",
                &[rand(&[2, 4, 9, 7], 3), w.clone(), b.clone()],
                dt,
                move |t| {
                    Conv2d::from_weights("c", t[1].clone(), Some(t[2].clone()), cfg).forward(&t[0])
                },
            );
        }
    }
}

/// The GEMM backward (im2col/col2im kernels around cuBLAS) at sizes where the kernels' grids
/// stride over many blocks: 64 channels, a 3×3 kernel at stride 1 and 2 (downsampler), and a
/// pointwise 1×1 (resnet shortcut), batch 3.
#[test]
fn conv_backward_at_unet_sizes_matches_cpu() {
    for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let cfg = Conv2dConfig { padding, stride };
        let w = rand(&[48, 64, k, k], 1);
        let b = rand(&[48], 2);
        for dt in DTYPES {
            compare(
                "trained conv (UNet sizes)",
                &[rand(&[3, 64, 24, 20], 3), w.clone(), b.clone()],
                dt,
                move |t| {
                    Conv2d::from_weights("c", t[1].clone(), Some(t[2].clone()), cfg).forward(&t[0])
                },
            );
        }
    }
}

/// The GEMM backward's other cases: a frozen weight (input gradient only), no bias, an input
/// that is not contiguous, a stride-2 unpadded kernel on an even size (the last row and column
/// get no gradient) and a strided 1×1 kernel (not pointwise: it goes through im2col).
#[test]
fn conv_backward_edge_cases_match_cpu() {
    for (k, stride, padding) in [(3, 2, 0), (1, 2, 0), (3, 1, 1)] {
        let cfg = Conv2dConfig { padding, stride };
        let w = rand(&[5, 6, k, k], 1);
        for dt in DTYPES {
            let wf = w.clone();
            compare(
                "frozen conv, no bias, transposed input",
                &[rand(&[2, 6, 10, 8], 3)],
                dt,
                move |t| {
                    let c = Conv2d::from_weights(
                        "c",
                        wf.to_dtype(t[0].dtype())?.to_device(t[0].device())?,
                        None,
                        cfg,
                    );
                    c.forward(&t[0].transpose(2, 3)?)
                },
            );
            compare(
                "trained conv, no bias",
                &[rand(&[2, 6, 8, 8], 3), w.clone()],
                dt,
                move |t| Conv2d::from_weights("c", t[1].clone(), None, cfg).forward(&t[0]),
            );
        }
    }
}

/// Gradient checkpointing on CUDA: the recomputed backward equals the CPU's plain backward, and
/// the block's own weight gradient arrives through the side store.
#[test]
fn checkpoint_matches_cpu() {
    let run = |dev: &Device| -> (Tensor, Tensor, Tensor) {
        let w = Var::from_tensor(&rand(&[16, 16], 1).to_device(dev).unwrap()).unwrap();
        let x = Var::from_tensor(&rand(&[3, 16], 2).to_device(dev).unwrap()).unwrap();
        let c = rand(&[3, 16], 3).to_device(dev).unwrap();
        let wt = w.as_tensor().clone();
        let block = move |x: &Tensor, c: &Tensor| -> Result<Tensor> {
            softmax_last_dim(&(x.matmul(&wt)? * c)?)?.tanh()
        };
        let ckpt = Checkpointing::new(dev).unwrap();
        ckpt.side.watch([w.as_tensor()]);
        let y = checkpoint(x.as_tensor(), &c, Arc::new(block), &ckpt).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().clone();
        let gw = ckpt
            .side
            .take(w.as_tensor())
            .expect("block weight gradient");
        (y, gx, gw)
    };
    let (y0, gx0, gw0) = run(&Device::Cpu);
    let (y1, gx1, gw1) = run(&cuda());
    for (name, a, b) in [
        ("output", y1, y0),
        ("input gradient", gx1, gx0),
        ("weight gradient", gw1, gw0),
    ] {
        let err = rel_l2(&a, &b);
        assert!(err <= 1e-4, "checkpoint {name}: relative error {err:e}");
    }
}
