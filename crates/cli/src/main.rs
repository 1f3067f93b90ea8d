//! `imprint`: personalize Stable Diffusion. A thin command line over the library crates.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "imprint",
    version,
    about = "Teach Stable Diffusion a new concept from a few images, and generate with it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a concept (textual-inversion / ti).
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Generate images from a prompt (txt2img, or img2img with --init-image).
    Generate(commands::generate::GenerateArgs),
    /// Make a concept in seconds: one pass of an encoder from `imprint train encoder` over the
    /// concept's images (and optionally up to 15 Textual Inversion steps).
    Personalize(commands::personalize::PersonalizeArgs),
    /// Parity and inspection commands (tokenize, forward, sample).
    #[command(subcommand)]
    Debug(commands::debug::DebugCommand),
    /// Time one UNet step of a mode (forward, ti, ...) and print one JSON line.
    Bench(commands::bench::BenchArgs),
    /// Concept files: inspect, convert between formats.
    #[command(subcommand)]
    Concept(commands::concept::ConceptCommand),
    /// Quality metrics of generated images: CLIP-I, CLIP-T and DINO (DreamBench).
    Eval(commands::eval::EvalArgs),
    /// The toy world: train its base model and evaluators, write held-out concepts, bench methods.
    #[command(subcommand)]
    World(commands::world::WorldCommand),
    /// Model folders (init: random weights in a real architecture).
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel.
///
/// A UNet step allocates and frees thousands of multi-megabyte activations. glibc serves blocks
/// over its mmap threshold (at most 32 MiB) with fresh mappings, so every such tensor paid for
/// zero-filled page faults on first touch (6–15 % of a training step in `perf`). With the
/// threshold raised and trimming off, freed blocks are reused from the heap; the peak is the same
/// live set, so peak memory does not grow.
///
/// One arena for every thread: the command runs on a pool worker ([`on_pool_worker`]), and glibc
/// gives each thread other than the main one its own arena of 64 MiB heaps, where a block larger
/// than a heap is mmapped and unmapped again whatever the threshold. With one arena a
/// DreamBooth step kept its speed and peak (SD 1.5, 256 px: 7.4 s and 7.8 GB, against 9.7 s and
/// 9.2 GB with per-thread arenas).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// candle's element-wise thread pool spins 25,000 times after each op before its worker parks; on
/// a small machine that worker then competes with the gemm threads for the same cores (8 % of a
/// training step's samples were that spin loop). Parking sooner made a textual-inversion step
/// about 4 % faster on 2 cores, back to back. An explicit setting is left alone.
fn park_idle_workers_sooner() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Before any thread exists, so nothing reads the environment concurrently.
        std::env::set_var(VAR, "1000");
    }
}

/// Runs the command on a worker thread of rayon's global pool instead of the main thread.
///
/// A parallel op (gemm, the conv and attention kernels) started from outside the pool injects
/// its work into the pool and sleeps on a lock until a worker has run it: a futex wake and wait
/// per op, and the main thread idle meanwhile. A training step makes thousands of such calls; on
/// the toy world's small UNet (batch 16, 16×16 latents) those hand-offs and the threads' fight
/// for 2 cores took half the CPU time (`perf`: futex and scheduler samples, 50 % system time).
/// Started from a worker, an op runs in place and the other workers steal from it. Workers get a
/// main-thread-sized stack: candle's backward walks the graph recursively.
fn on_pool_worker<R: Send>(command: impl FnOnce() -> R + Send) -> R {
    const STACK_BYTES: usize = 64 << 20;
    // Fails only if a pool exists already, which then runs the command as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK_BYTES)
        .build_global();
    rayon::scope(|_| command())
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`imprint concept inspect F | head`)
/// panics in `println!`. A command-line tool should end quietly there, as `cat` does.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    quiet_on_closed_pipe();
    keep_freed_memory();
    park_idle_workers_sooner();
    let cli = Cli::parse();
    let result = on_pool_worker(move || match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Personalize(a) => commands::personalize::personalize(a),
        Command::Train(c) => commands::train::run(c),
        Command::Debug(c) => commands::debug::run(c),
        Command::Model(c) => commands::model::run(c),
        Command::Concept(c) => commands::concept::run(c),
        Command::Bench(a) => commands::bench::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::World(c) => commands::world::run(c),
    });
    if let Err(e) = result {
        // One line: the context chain from outer to inner.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
