//! Round trips, detection, and refusal of corrupt, foreign and malicious files. The pickled
//! fixtures come from tools/reference/concept_files.py (torch.save, as A1111 and diffusers write).

use super::*;
use crate::{TokenEmbedding, TEXT_ENCODER, TEXT_ENCODER_2};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/concepts")
        .join(name)
}

fn vectors(n: usize, dim: usize, seed: f32) -> Tensor {
    let data: Vec<f32> = (0..n * dim)
        .map(|i| ((i as f32 + seed) * 0.37).sin())
        .collect();
    Tensor::from_vec(data, (n, dim), &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn error_text(r: Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.expect_err("should fail"))
}

#[test]
fn native_round_trip_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.safetensors");
    let mut c = Concept::textual_inversion("<toy>", vectors(3, 8, 0.0)).unwrap();
    c.embeddings
        .push(TokenEmbedding::new(TEXT_ENCODER_2, vectors(3, 12, 1.0)).unwrap());
    c.base_model = Some("sd15:abc".into());
    c.metadata.insert("steps".into(), "3000".into());
    save(&c, &path, Format::Native).unwrap();
    assert_eq!(detect(&path).unwrap(), Format::Native);
    let back = load_any(&path).unwrap();
    assert_eq!(back.trigger, "<toy>");
    assert_eq!(back.method, "textual-inversion");
    assert_eq!(back.base_model.as_deref(), Some("sd15:abc"));
    assert_eq!(back.metadata.get("steps").map(String::as_str), Some("3000"));
    for e in &c.embeddings {
        assert!(same(
            &e.vectors,
            &back.embedding(&e.encoder).unwrap().vectors
        ));
    }
}

#[test]
fn diffusers_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("learned_embeds.safetensors");
    let c = Concept::textual_inversion("<cat-toy>", vectors(2, 8, 0.0)).unwrap();
    save(&c, &path, Format::Diffusers).unwrap();
    assert_eq!(detect(&path).unwrap(), Format::Diffusers);
    let back = load_any(&path).unwrap();
    assert_eq!(back.trigger, "<cat-toy>");
    assert!(same(&c.embeddings[0].vectors, &back.embeddings[0].vectors));
    // A folder resolves to its learned_embeds.safetensors, as in diffusers.
    std::fs::remove_file(&path).unwrap();
    save(&c, dir.path(), Format::Diffusers).unwrap();
    assert_eq!(load_any(dir.path()).unwrap().trigger, "<cat-toy>");
}

#[test]
fn a1111_round_trip_names_by_file_stem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cat-toy.safetensors");
    let c = Concept::textual_inversion("<something>", vectors(4, 8, 2.0)).unwrap();
    save(&c, &path, Format::A1111).unwrap();
    assert_eq!(detect(&path).unwrap(), Format::A1111);
    let back = load_any(&path).unwrap();
    assert_eq!(back.trigger, "cat-toy");
    assert!(same(&c.embeddings[0].vectors, &back.embeddings[0].vectors));

    let sdxl = dir.path().join("xl.safetensors");
    let mut c2 = c.clone();
    c2.embeddings
        .push(TokenEmbedding::new(TEXT_ENCODER_2, vectors(4, 12, 3.0)).unwrap());
    save(&c2, &sdxl, Format::A1111).unwrap();
    let names: Vec<String> = read_raw(&sdxl).unwrap().tensors.into_keys().collect();
    assert_eq!(names, ["clip_g", "clip_l"]);
    let back = load_any(&sdxl).unwrap();
    assert!(same(
        &c2.embeddings[1].vectors,
        &back.embedding(TEXT_ENCODER_2).unwrap().vectors
    ));
}

#[test]
fn diffusers_cannot_hold_a_second_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Concept::textual_inversion("<x>", vectors(1, 8, 0.0)).unwrap();
    c.embeddings
        .push(TokenEmbedding::new(TEXT_ENCODER_2, vectors(1, 12, 0.0)).unwrap());
    let e = error_text(save(
        &c,
        &dir.path().join("a.safetensors"),
        Format::Diffusers,
    ));
    assert!(e.contains("second text encoder"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("learned_embeds.safetensors");
    let c = Concept::textual_inversion("<x>", vectors(2, 64, 0.0)).unwrap();
    save(&c, &path, Format::Diffusers).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = error_text(load_any(&path));
    assert!(
        e.contains("learned_embeds.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn unrelated_safetensors_is_not_a_concept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet.safetensors");
    let tensors = HashMap::from([
        ("conv_in.weight".to_string(), vectors(2, 2, 0.0)),
        ("conv_in.bias".to_string(), vectors(1, 2, 0.0)),
    ]);
    imprint_models::io::save_safetensors_atomic(&path, &tensors, None).unwrap();
    let e = error_text(load_any(&path));
    assert!(
        e.contains("unet.safetensors")
            && e.contains("not a concept file")
            && e.contains("conv_in.bias"),
        "{e}"
    );
}

#[test]
fn random_bytes_are_not_a_concept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.pt");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    let e = error_text(load_any(&path));
    assert!(
        e.contains("noise.pt") && e.contains("not a concept file"),
        "{e}"
    );
    // A zip header followed by garbage.
    std::fs::write(&path, b"PK\x03\x04garbage").unwrap();
    let e = error_text(load_any(&path));
    assert!(
        e.contains("noise.pt") && e.contains("PyTorch archive"),
        "{e}"
    );
}

#[test]
fn format_names_parse() {
    assert_eq!("a1111".parse::<Format>().unwrap(), Format::A1111);
    assert_eq!("Diffusers".parse::<Format>().unwrap(), Format::Diffusers);
    assert!("ckpt".parse::<Format>().is_err());
}

// --- Pickled files written by torch.save (fixtures) ---

#[test]
fn a1111_pt_is_read_without_unpickling() {
    let path = fixture("pt-toy.pt");
    assert_eq!(detect(&path).unwrap(), Format::A1111);
    let c = load_any(&path).unwrap();
    assert_eq!(c.trigger, "pt-toy");
    assert_eq!((c.num_vectors(), c.dim()), (1, 32));
    assert_eq!(
        c.metadata.get("a1111.step").map(String::as_str),
        Some("500")
    );
    // Same vectors as the safetensors the fixture script saved alongside.
    let reference = load_any(&fixture("pt-toy-emb-params.safetensors")).unwrap();
    assert!(same(
        &c.embeddings[0].vectors,
        &reference.embeddings[0].vectors
    ));
}

#[test]
fn pt_with_emb_params_and_strided_storage() {
    // `emb_params` saved as a view (a transposed slice of a larger storage).
    let c = load_any(&fixture("strided.pt")).unwrap();
    let reference = load_any(&fixture("strided-expected.safetensors")).unwrap();
    assert!(same(
        &c.embeddings[0].vectors,
        &reference.embeddings[0].vectors
    ));
}

#[test]
fn old_parameter_dict_embeddings_are_read() {
    let c = load_any(&fixture("old-style.pt")).unwrap();
    let reference = load_any(&fixture("old-style-expected.safetensors")).unwrap();
    assert_eq!((c.trigger.as_str(), c.num_vectors()), ("old-style", 2));
    assert!(same(
        &c.embeddings[0].vectors,
        &reference.embeddings[0].vectors
    ));
}

#[test]
fn diffusers_bin_is_read() {
    let c = load_any(&fixture("learned_embeds.bin")).unwrap();
    let reference = load_any(&fixture("learned_embeds.safetensors")).unwrap();
    assert_eq!(c.trigger, reference.trigger);
    assert!(same(
        &c.embeddings[0].vectors,
        &reference.embeddings[0].vectors
    ));
}

#[test]
fn malicious_pickle_is_refused_without_running() {
    let path = fixture("malicious.pt");
    let marker = Path::new("/tmp/imprint-pickle-marker");
    let _ = std::fs::remove_file(marker);
    let e = error_text(load_any(&path));
    assert!(
        e.contains("malicious.pt") && e.contains("refusing to load") && e.contains("system"),
        "{e}"
    );
    assert!(!marker.exists(), "the pickle's payload ran");
}

// --- Hostile pickles, built by hand: refused with an error, never a panic or a blow-up ---

fn archive_with_pickle(pickle: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.finish().unwrap().into_inner()
}

fn pickle_error(body: &[u8]) -> String {
    let mut pickle = vec![0x80, 2];
    pickle.extend_from_slice(body);
    let bytes = archive_with_pickle(&pickle);
    format!(
        "{:#}",
        pt::read_archive(&bytes).expect_err("should be refused")
    )
}

#[test]
fn exponential_memo_copies_are_refused() {
    // l = []; 64 times: l = (l, l) — 2^64 nodes once copied out.
    let mut body = vec![b']', b'q', 0];
    for _ in 0..64 {
        body.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    body.push(b'.');
    let e = pickle_error(&body);
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn deep_nesting_is_refused() {
    let mut body = vec![b')'];
    body.extend(std::iter::repeat_n(0x85, 200_000));
    body.push(b'.');
    let e = pickle_error(&body);
    assert!(e.contains("too deeply nested"), "{e}");
}

#[test]
fn malformed_pickles_are_errors() {
    // An integer longer than 8 bytes (would overflow a shift in the interpreter).
    let mut body = vec![0x8a, 200];
    body.extend(std::iter::repeat_n(0xff, 200));
    body.push(b'.');
    assert!(pickle_error(&body).contains("not supported"));
    // Truncated: a string longer than the data.
    assert!(pickle_error(&[b'X', 0xff, 0, 0, 0, b'a']).contains("truncated"));
    // Stack underflow, unknown opcode, and a top-level object that is not a dict.
    assert!(pickle_error(b"R.").contains("malformed"));
    assert!(pickle_error(b"\xfe.").contains("opcode"));
    assert!(pickle_error(b"N.").contains("not a dict"));
    // A call of anything but tensor rebuilding.
    let e = pickle_error(b"cbuiltins\neval\nX\x01\x00\x00\x00x\x85R.");
    assert!(
        e.contains("refusing to load") && e.contains("builtins.eval"),
        "{e}"
    );
}

fn lora_module(
    network: &str,
    module: &str,
    r: usize,
    inp: usize,
    out: usize,
    alpha: f64,
) -> crate::LoraModule {
    let down = vectors(r, inp, 2.0);
    let up = vectors(out, r, 3.0);
    crate::LoraModule::new(network, module, down, up, alpha, module).unwrap()
}

fn hybrid() -> Concept {
    let mut c = Concept::textual_inversion("<toy>", vectors(2, 8, 0.0)).unwrap();
    c.lora.modules = vec![
        lora_module(
            crate::UNET,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            4,
            8,
            6,
            8.0,
        ),
        lora_module(crate::UNET, "mid_block.attentions.0.proj_in", 2, 6, 6, 1.0),
        lora_module(
            TEXT_ENCODER,
            "text_model.encoder.layers.1.mlp.fc1",
            3,
            8,
            10,
            3.0,
        ),
    ];
    c
}

fn same_lora(a: &Concept, b: &Concept) {
    assert_eq!(a.lora.modules.len(), b.lora.modules.len());
    for m in &a.lora.modules {
        let o = b
            .lora
            .modules
            .iter()
            .find(|o| o.network == m.network && o.module == m.module)
            .unwrap_or_else(|| panic!("{} lost", m.module));
        assert!(
            same(&m.down, &o.down) && same(&m.up, &o.up) && m.alpha == o.alpha,
            "{}",
            m.module
        );
    }
}

#[test]
fn hybrid_concepts_round_trip_through_native_and_kohya() {
    let dir = tempfile::tempdir().unwrap();
    let c = hybrid();
    for (format, name) in [
        (Format::Native, "n.safetensors"),
        (Format::Kohya, "k.safetensors"),
    ] {
        let path = dir.path().join(name);
        save(&c, &path, format).unwrap();
        let (back, detected) = load_with_format(&path).unwrap();
        assert_eq!(detected, format);
        assert_eq!(back.trigger, "<toy>");
        assert!(same(&back.embeddings[0].vectors, &c.embeddings[0].vectors));
        same_lora(&c, &back);
    }
    // diffusers keeps embeddings and LoRA apart, A1111 has no LoRA.
    let e = error_text(save(
        &c,
        &dir.path().join("d.safetensors"),
        Format::Diffusers,
    ));
    assert!(e.contains("separate files"), "{e}");
    let e = error_text(save(&c, &dir.path().join("a.safetensors"), Format::A1111));
    assert!(e.contains("no LoRA"), "{e}");
    // Different ranks and alphas per module survive diffusers' rank/alpha patterns.
    let mut lora_only = c.clone();
    lora_only.embeddings.clear();
    let path = dir.path().join("pytorch_lora_weights.safetensors");
    save(&lora_only, &path, Format::Diffusers).unwrap();
    let back = load_any(dir.path()).unwrap();
    same_lora(&lora_only, &back);
}

fn write(path: &Path, tensors: Vec<(&str, Tensor)>, meta: Option<HashMap<String, String>>) {
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    imprint_models::io::save_safetensors_atomic(path, &tensors, meta).unwrap();
}

#[test]
fn older_diffusers_spellings_and_alpha_sources() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.safetensors");
    write(
        &path,
        vec![
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight", vectors(2, 8, 0.0)),
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", vectors(8, 2, 1.0)),
            ("unet.mid_block.attentions.0.proj_out.lora.down.weight", vectors(2, 8, 0.0)),
            ("unet.mid_block.attentions.0.proj_out.lora.up.weight", vectors(8, 2, 1.0)),
            ("unet.mid_block.attentions.0.proj_out.alpha", Tensor::new(1f32, &Device::Cpu).unwrap()),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight", vectors(2, 8, 0.0)),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", vectors(8, 2, 1.0)),
        ],
        None,
    );
    let c = load_any(&path).unwrap();
    let find = |m: &str| c.lora.modules.iter().find(|x| x.module == m).unwrap().alpha;
    // No alpha anywhere: alpha = rank (scale 1), as diffusers' get_peft_kwargs.
    assert_eq!(
        find("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        2.0
    );
    assert_eq!(find("mid_block.attentions.0.proj_out"), 1.0);
    assert_eq!(find("text_model.encoder.layers.0.self_attn.q_proj"), 2.0);

    // PEFT metadata: lora_alpha, alpha_pattern by module suffix, rsLoRA.
    let meta = HashMap::from([(
        "lora_adapter_metadata".to_string(),
        r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}, "unet.use_rslora": true}"#.to_string(),
    )]);
    write(
        &path,
        vec![
            ("unet.a.attn1.to_k.lora_A.weight", vectors(4, 8, 0.0)),
            ("unet.a.attn1.to_k.lora_B.weight", vectors(8, 4, 1.0)),
            ("unet.a.attn2.to_k.lora_A.weight", vectors(4, 8, 0.0)),
            ("unet.a.attn2.to_k.lora_B.weight", vectors(8, 4, 1.0)),
        ],
        Some(meta),
    );
    let c = load_any(&path).unwrap();
    let scale = |m: &str| {
        c.lora
            .modules
            .iter()
            .find(|x| x.module == m)
            .unwrap()
            .scale()
    };
    assert!((scale("a.attn1.to_k") - 8.0 / 2.0).abs() < 1e-12); // 8 / √4
    assert!((scale("a.attn2.to_k") - 2.0 / 2.0).abs() < 1e-12);

    // Incomplete LyCORIS modules and half pairs are refused by name.
    write(
        &path,
        vec![(
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            vectors(2, 2, 0.0),
        )],
        None,
    );
    let e = error_text(load_any(&path));
    assert!(e.contains("lacks its 'hada_w1_b'"), "{e}");
    write(
        &path,
        vec![(
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
            vectors(2, 8, 0.0),
        )],
        None,
    );
    let e = error_text(load_any(&path));
    assert!(e.contains("lacks its lora_up"), "{e}");
}
