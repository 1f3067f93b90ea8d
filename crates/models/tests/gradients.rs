//! The networks' gradients: what training differentiates must match finite differences, reach the
//! trainable inputs, and leave frozen weights without gradients.

use candle_core::{DType, Device, Tensor, Var};
use imprint_models::init::{write_random_model, KnownConfig};
use imprint_models::loading::ModelFolder;
use imprint_models::TextConditioning;
use imprint_ops::grad_check::rand_tensor;

fn tiny(config: KnownConfig, name: &str) -> (tempfile::TempDir, ModelFolder) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(name);
    write_random_model(config, &root, 3).unwrap();
    (dir, ModelFolder::open(&root).unwrap())
}

/// Central differences of `loss` at a few elements of `x`, against `grad`.
fn check_some(x: &Tensor, grad: &Tensor, loss: impl Fn(&Tensor) -> f64, picks: &[usize]) {
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-5;
    for &j in picks {
        let eval = |d: f64| {
            let mut p = base.clone();
            p[j] += d;
            loss(&Tensor::from_vec(p, x.dims(), x.device()).unwrap())
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let err = (numeric - g[j]).abs() / numeric.abs().max(1e-3);
        assert!(
            err < 1e-4,
            "element {j}: analytic {} vs numeric {numeric}",
            g[j]
        );
    }
}

#[test]
fn unet_gradient_to_text_states_matches_finite_differences() {
    for (config, name) in [(KnownConfig::Tiny, "sd1"), (KnownConfig::TinySd2, "sd2")] {
        let (_dir, folder) = tiny(config, name);
        let unet = folder.load_unet(DType::F64, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let d = unet.config.cross_attention_dim.expand(1, "").unwrap()[0];
        let sample = rand_tensor(&[1, 4, 8, 8], 1, &dev).unwrap();
        let t = Tensor::new(&[400f64], &dev).unwrap();
        let text = rand_tensor(&[1, 5, d], 2, &dev).unwrap();
        let r = rand_tensor(&[1, 4, 8, 8], 3, &dev).unwrap();
        let loss = |text: &Tensor| -> Tensor {
            unet.forward(&sample, &t, TextConditioning::Shared(text))
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let var = Var::from_tensor(&text).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .expect("the text states receive a gradient");
        check_some(
            &text,
            g,
            |x| loss(x).to_scalar::<f64>().unwrap(),
            &[0, 7, d + 3, 4 * d + d - 1],
        );
        // Frozen weights: no gradient is computed for any of them.
        let mut weights = vec![];
        let mut unet = unet;
        use imprint_models::{Projection, VisitProjections};
        unet.visit_projections(&mut |p| match p {
            Projection::Linear(l) => weights.push(l.weight.clone()),
            Projection::Conv2d(c) => weights.push(c.weight.clone()),
        });
        assert!(weights.len() > 20);
        assert!(
            weights.iter().all(|w| grads.get(w).is_none()),
            "{name}: a frozen weight got a gradient"
        );
    }
}

#[test]
fn text_encoder_gradient_to_token_embeddings_matches_finite_differences() {
    let (_dir, folder) = tiny(KnownConfig::TinySd2, "te");
    let te = folder.load_text_encoder(DType::F64, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[49406i64, 320, 1125, 539, 49407, 0, 0]], &dev).unwrap();
    let embeds = te.embed_tokens(&ids).unwrap();
    let r = rand_tensor(&[1, 7, 48], 5, &dev).unwrap();
    let loss = |e: &Tensor| -> Tensor {
        te.forward_embeds(e, &ids, 0)
            .unwrap()
            .last_hidden_state
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let var = Var::from_tensor(&embeds).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("token embeddings receive a gradient");
    check_some(
        &embeds,
        g,
        |x| loss(x).to_scalar::<f64>().unwrap(),
        &[0, 50, 2 * 48 + 5, 4 * 48 + 47],
    );
    assert!(
        grads.get(&te.token_embedding).is_none(),
        "the frozen embedding table got a gradient"
    );
}

#[test]
fn per_layer_conditioning_reaches_each_layer() {
    let (_dir, folder) = tiny(KnownConfig::Tiny, "pplus");
    let unet = folder.load_unet(DType::F64, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let n = unet.num_cross_attention_layers;
    assert_eq!(
        n,
        2 + 1 + 4,
        "tiny: 2 down, 1 mid, 2×2 up cross-attention layers"
    );
    let sample = rand_tensor(&[1, 4, 8, 8], 1, &dev).unwrap();
    let t = Tensor::new(&[10f64], &dev).unwrap();
    let text = rand_tensor(&[1, 3, 32], 2, &dev).unwrap();
    let shared = unet
        .forward(&sample, &t, TextConditioning::Shared(&text))
        .unwrap();
    let same: Vec<Tensor> = (0..n).map(|_| text.clone()).collect();
    let per_layer = unet
        .forward(&sample, &t, TextConditioning::PerLayer(&same))
        .unwrap();
    assert_eq!(
        (shared - &per_layer)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    let vars: Vec<Var> = (0..n)
        .map(|i| Var::from_tensor(&rand_tensor(&[1, 3, 32], 10 + i as u64, &dev).unwrap()).unwrap())
        .collect();
    let states: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = unet
        .forward(&sample, &t, TextConditioning::PerLayer(&states))
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("layer {i} received no gradient"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                > 0.0
        );
    }
    assert!(unet
        .forward(&sample, &t, TextConditioning::PerLayer(&states[..n - 1]))
        .is_err());
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let (_dir, folder) = tiny(KnownConfig::TinySd2, "ckpt");
    let dev = Device::Cpu;
    let sample = rand_tensor(&[1, 4, 8, 8], 1, &dev).unwrap();
    let t = Tensor::new(&[700f64], &dev).unwrap();
    let text = rand_tensor(&[1, 5, 48], 2, &dev).unwrap();
    let run = |checkpointing: bool| {
        let (mut unet, vars) = folder.load_unet_trainable(DType::F64, &dev).unwrap();
        let side = if checkpointing {
            Some(unet.enable_gradient_checkpointing().unwrap())
        } else {
            None
        };
        if let Some(s) = &side {
            s.watch(vars.iter().map(|(_, v)| v.as_tensor()));
        }
        let text_var = Var::from_tensor(&text).unwrap();
        let y = unet
            .forward(&sample, &t, TextConditioning::Shared(text_var.as_tensor()))
            .unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let text_grad = grads.get(text_var.as_tensor()).unwrap().clone();
        let weight_grads: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| {
                let g = match (
                    grads.get(v.as_tensor()),
                    side.as_ref().and_then(|s| s.take(v.as_tensor())),
                ) {
                    (Some(g), Some(s)) => (g + s).unwrap(),
                    (Some(g), None) => g.clone(),
                    (None, Some(s)) => s,
                    (None, None) => panic!("{n}: no gradient"),
                };
                (n.clone(), g)
            })
            .collect();
        (text_grad, weight_grads)
    };
    let (plain_text, plain_w) = run(false);
    let (ckpt_text, ckpt_w) = run(true);
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(diff(&plain_text, &ckpt_text) < 1e-10);
    assert_eq!(plain_w.len(), ckpt_w.len());
    for ((n, a), (_, b)) in plain_w.iter().zip(&ckpt_w) {
        assert!(diff(a, b) < 1e-10, "{n}: checkpointed gradient differs");
    }
}
