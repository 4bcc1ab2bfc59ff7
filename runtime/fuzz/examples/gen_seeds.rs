//! Writes the seed corpus: one valid request frame per file (no size prefix).
//!
//!     cargo run --example gen_seeds -- [DIR]     (default: seeds/request_frame)

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/request_frame"))
        });
    std::fs::create_dir_all(&dir)?;
    let seeds = weir_fuzz::seed_frames();
    for (name, frame) in &seeds {
        std::fs::write(dir.join(name), frame)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
