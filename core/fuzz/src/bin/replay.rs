//! Runs the fuzz checks on stable, without libFuzzer.
//!
//! ```text
//! replay [PATH...]            check every file (directories: their files);
//!                             default: seeds/parse and corpus/parse
//! replay --random N [PATH...] also check N random mutations of those inputs
//! ```

use std::path::{Path, PathBuf};
use std::{env, fs, process};

fn main() {
    let mut args = env::args().skip(1).peekable();
    let mut random = 0u64;
    if args.peek().map(String::as_str) == Some("--random") {
        args.next();
        random = args
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage());
    }
    let mut paths: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if paths.is_empty() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        paths = vec![here.join("seeds/parse"), here.join("corpus/parse")];
    }
    let mut inputs = Vec::new();
    for path in &paths {
        collect(path, &mut inputs);
    }
    for (path, data) in &inputs {
        run(&path.display().to_string(), data);
    }
    println!("replayed {} inputs", inputs.len());
    if random > 0 {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ random);
        let seeds: Vec<&[u8]> = inputs.iter().map(|(_, d)| &d[..]).collect();
        for n in 0..random {
            let data = mutate(&mut rng, &seeds);
            run(&format!("random input {n}"), &data);
        }
        println!("checked {random} random inputs");
    }
}

fn usage() -> ! {
    eprintln!("usage: replay [--random N] [PATH...]");
    process::exit(2);
}

fn collect(path: &Path, inputs: &mut Vec<(PathBuf, Vec<u8>)>) {
    if path.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(path)
            .expect("readable directory")
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            collect(&entry, inputs);
        }
    } else if path.is_file() {
        inputs.push((path.to_owned(), fs::read(path).expect("readable file")));
    }
}

fn run(name: &str, data: &[u8]) {
    if std::panic::catch_unwind(|| tidemark_core_fuzz::check_parse(data)).is_err() {
        let file = env::temp_dir().join("tidemark-fuzz-failure");
        fs::write(&file, data).expect("writable temp dir");
        eprintln!(
            "check failed on {name}; input written to {}",
            file.display()
        );
        process::exit(1);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&[u8]] = &[
    b"data:",
    b"data: ",
    b"id:",
    b"id: ",
    b"event:",
    b"retry: ",
    b":",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\xEF\xBB\xBF",
    b"\0",
    b"\xFF",
    b"\xF0\x9F",
    b"\x1E",
    b"\x1F",
    "🌊".as_bytes(),
];

/// A seed (or nothing) with a few random edits: byte flips, inserted tokens,
/// deletions, and splices of another seed.
fn mutate(rng: &mut Rng, seeds: &[&[u8]]) -> Vec<u8> {
    let mut data = if seeds.is_empty() {
        Vec::new()
    } else {
        seeds[rng.below(seeds.len())].to_vec()
    };
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(4) {
            0 if at < data.len() => data[at] = rng.next() as u8,
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            2 if at < data.len() => {
                let end = (at + 1 + rng.below(8)).min(data.len());
                data.drain(at..end);
            }
            _ if !seeds.is_empty() => {
                let other = seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(64)).min(other.len());
                data.splice(at..at, other[from..to].iter().copied());
            }
            _ => data.push(rng.next() as u8),
        }
    }
    data
}
