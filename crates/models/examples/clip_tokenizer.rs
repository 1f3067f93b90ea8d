//! Development helper for checking the CLIP tokenizer against transformers
//! (see `tools/reference/tokenizer.py --check-rust`).
//!
//! `cargo run -p imprint-models --example clip_tokenizer -- write OUT_DIR` writes OUT_DIR/{sd1,sd2}
//! (vocab.json + merges.txt) and OUT_DIR/{sd1,sd2}-fast (tokenizer.json).
//! `cargo run -p imprint-models --example clip_tokenizer -- encode DIR` reads one JSON string per
//! stdin line and prints the unpadded ids of each as a JSON array.

use std::io::BufRead;

use imprint_models::tokenizer::{write_clip_tokenizer, write_clip_tokenizer_fast, ClipTokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["write", out] => {
            let out = std::path::Path::new(out);
            for (name, pad) in [("sd1", "<|endoftext|>"), ("sd2", "!")] {
                write_clip_tokenizer(&out.join(name), pad)?;
                write_clip_tokenizer_fast(&out.join(format!("{name}-fast")), pad)?;
            }
        }
        ["encode", dir] => {
            let tok = ClipTokenizer::from_dir(std::path::Path::new(dir))?;
            for line in std::io::stdin().lock().lines() {
                let text: String = serde_json::from_str(&line?)?;
                println!("{}", serde_json::to_string(&tok.encode_unpadded(&text)?)?);
            }
        }
        _ => anyhow::bail!("usage: clip_tokenizer write OUT_DIR | clip_tokenizer encode DIR"),
    }
    Ok(())
}
