//! Runs inputs (files, or every file in a directory) through the fuzz target's body without
//! libFuzzer or sanitizers: reproduces a finding on any toolchain.
//!
//!     cargo run --example replay -- artifacts-found/<file> [MORE...]

use std::path::Path;

fn replay(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for e in entries {
            replay(&e.path())?;
        }
        return Ok(());
    }
    let data = std::fs::read(path)?;
    eprintln!("{}: {} bytes", path.display(), data.len());
    weir_fuzz::fuzz_one(&data);
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: replay FILE_OR_DIR...");
        std::process::exit(2);
    }
    for a in args {
        replay(Path::new(&a))?;
    }
    eprintln!("done: no panic");
    Ok(())
}
