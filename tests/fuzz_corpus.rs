//! The fuzz targets' short run, in CI: every committed corpus input (fuzz/corpus/TARGET) and
//! a few hundred seeded mutations of them (byte flips, insertions, truncations, splices),
//! through the same target bodies libFuzzer runs (fuzz/targets.rs; the long, coverage-guided
//! runs are scripts/fuzz.sh). An input that panics is written to target/fuzz-failures/.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    inputs
}

fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..out.len())
        };
        match rng.random_range(0..5) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.random_range(0..8),
            1 if !out.is_empty() => out[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'['][rng.random_range(0..7)],
            2 => out.insert(at, rng.random()),
            3 => out.truncate(at),
            _ => {
                // A piece of another input spliced in.
                let start = rng.random_range(0..=other.len());
                let end = rng.random_range(start..=other.len().min(start + 64));
                out.splice(at..at, other[start..end].iter().copied());
            }
        }
    }
    out
}

/// Runs `target` over the corpus and `mutations` mutations of it.
fn run(name: &str, target: fn(&[u8]), mutations: usize) {
    let inputs = corpus(name);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mutated = (0..mutations).map(|i| {
        let (a, b) = (&inputs[i % inputs.len()], &inputs[rng.random_range(0..inputs.len())]);
        mutate(&mut rng, a, b)
    });
    for input in inputs.clone().into_iter().chain(mutated) {
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{name}-{}", blake3::hash(&input).to_hex()));
            std::fs::write(&file, &input).unwrap();
            panic!(
                "{name} panicked on {} (replay: scripts/fuzz.sh builds fuzz/target/<host>/release/{name}; run it on the file)",
                file.display()
            );
        }
    }
}

#[test]
fn request_json_through_validation() {
    run("request", targets::request, 5000);
}

#[test]
fn hostile_content_through_chat_templates() {
    run("template", targets::template, 2000);
}

#[test]
fn image_headers_and_decoding() {
    run("image", targets::image, 3000);
}

#[test]
fn video_containers_and_decoding() {
    run("video", targets::video, 600);
}

#[test]
fn the_tests_sse_reader() {
    run("sse", targets::sse, 5000);
}

/// The fuzzer's find (video, 10 minutes in): a 5 x 5 GIF whose frame claims 65533 x 65530
/// pixels made the decoder allocate 17 GB. Refused now, by the pixel limit, before any
/// buffer of that size.
#[test]
fn a_gif_frame_larger_than_its_screen_is_refused() {
    use ocellus::media::{Fetched, MediaLimits, open_video};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/gif-frame-larger-than-its-screen.gif");
    let fetched = Fetched {
        bytes: std::fs::read(path).unwrap(),
        declared_type: None,
    };
    let limits = MediaLimits {
        max_image_pixels: 40_000_000,
        max_video_seconds: 60.0,
    };
    let error = open_video(&fetched, &limits).err().expect("the GIF is refused");
    assert!(
        matches!(error, ocellus::media::MediaError::CorruptVideo(_)),
        "{error:?}"
    );
}
