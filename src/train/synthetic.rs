//! The demo task: small images of coloured shapes and digits, drawn with the `image` crate,
//! each with one question whose answer is one word: a shape's colour, its kind, how many
//! there are, where one is, which digit is written. Seeded: the same seed draws the same
//! set, so a held-out set can be regenerated exactly.

use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Side of every image, in pixels.
pub const SIDE: u32 = 64;

const COLOURS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [40, 60, 220]),
    ("yellow", [235, 200, 20]),
    ("purple", [140, 40, 170]),
];
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COUNTS: [&str; 4] = ["one", "two", "three", "four"];
const PLACES: [&str; 4] = ["left", "right", "top", "bottom"];

/// 3x5 digits, a row per entry, the high bit on the left.
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b001, 0b001, 0b001],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// The kinds of question, as the evaluation reports them.
pub const KINDS: [&str; 5] = ["colour", "shape", "count", "position", "digit"];

pub struct Sample {
    pub kind: &'static str,
    pub image: RgbImage,
    pub question: &'static str,
    pub answer: String,
    /// What the image shows, in words ("two red squares", "the digit 7").
    pub caption: String,
    /// Captions that differ from `caption` in the asked attribute only, `caption` among them
    /// (the labels of zero-shot classification).
    pub alternatives: Vec<String>,
}

/// "a red square", "three red squares", "a red square on the left", "the digit 7".
fn caption(colour: &str, shape: &str, count: Option<usize>, place: Option<usize>) -> String {
    match (count, place) {
        (Some(1), _) => format!("one {colour} {shape}"),
        (Some(n), _) => format!("{} {colour} {shape}s", COUNTS[n - 1]),
        (None, Some(p)) => {
            let at = if p < 2 { "on the" } else { "at the" };
            format!("a {colour} {shape} {at} {}", PLACES[p])
        }
        (None, None) => format!("a {colour} {shape}"),
    }
}

/// A shape's caption and the captions that differ from it in the attribute `kind` asks
/// about.
fn labels(kind: &str, colour: &str, shape: &str, count: Option<usize>, place: Option<usize>) -> (String, Vec<String>) {
    let alternatives = match kind {
        "colour" => COLOURS.iter().map(|c| caption(c.0, shape, None, None)).collect(),
        "shape" => SHAPES.iter().map(|s| caption(colour, s, None, None)).collect(),
        "count" => (1..=COUNTS.len())
            .map(|k| caption(colour, shape, Some(k), None))
            .collect(),
        _ => (0..PLACES.len())
            .map(|p| caption(colour, shape, None, Some(p)))
            .collect(),
    };
    (caption(colour, shape, count, place), alternatives)
}

fn digit_caption(digit: usize) -> String {
    format!("the digit {digit}")
}

/// One sample of each kind in turn, `index` choosing the kind.
pub fn sample(rng: &mut ChaCha8Rng, index: usize) -> Sample {
    let kind = KINDS[index % KINDS.len()];
    let mut image = RgbImage::from_pixel(SIDE, SIDE, Rgb([255, 255, 255]));
    let colour = COLOURS[rng.random_range(0..COLOURS.len())];
    let shape = rng.random_range(0..SHAPES.len());
    let (name, shape_name) = (colour.0, SHAPES[shape]);
    let mut captions = (String::new(), Vec::new());
    let (question, answer) = match kind {
        "colour" | "shape" => {
            let size = rng.random_range(16..26);
            let (x, y) = (
                rng.random_range(size..SIDE as i32 - size),
                rng.random_range(size..SIDE as i32 - size),
            );
            draw_shape(&mut image, shape, x, y, size, colour.1);
            captions = labels(kind, name, shape_name, None, None);
            if kind == "colour" {
                ("What colour is the shape?", colour.0.to_string())
            } else {
                ("What shape is this?", SHAPES[shape].to_string())
            }
        }
        "count" => {
            let n = rng.random_range(1..=COUNTS.len());
            // One shape per quadrant, in random quadrants: they never overlap.
            let mut quadrants = [0, 1, 2, 3];
            for i in (1..4).rev() {
                quadrants.swap(i, rng.random_range(0..=i));
            }
            for &q in &quadrants[..n] {
                let (cx, cy) = (16 + 32 * (q % 2), 16 + 32 * (q / 2));
                let size = rng.random_range(8..12);
                let jitter = |rng: &mut ChaCha8Rng| rng.random_range(-3..=3);
                draw_shape(&mut image, shape, cx + jitter(rng), cy + jitter(rng), size, colour.1);
            }
            captions.0 = caption(name, shape_name, Some(n), None);
            captions.1 = (1..=COUNTS.len())
                .map(|k| caption(name, shape_name, Some(k), None))
                .collect();
            ("How many shapes are there?", COUNTS[n - 1].to_string())
        }
        "position" => {
            let place = rng.random_range(0..PLACES.len());
            let size = rng.random_range(8..12);
            let along = rng.random_range(20..44);
            let across = rng.random_range(10..14);
            let (x, y) = match place {
                0 => (across, along),
                1 => (SIDE as i32 - across, along),
                2 => (along, across),
                _ => (along, SIDE as i32 - across),
            };
            draw_shape(&mut image, shape, x, y, size, colour.1);
            captions.0 = caption(name, shape_name, None, Some(place));
            captions.1 = (0..PLACES.len())
                .map(|p| caption(name, shape_name, None, Some(p)))
                .collect();
            ("Where is the shape?", PLACES[place].to_string())
        }
        _ => {
            let digit = rng.random_range(0..10);
            let scale = rng.random_range(6..9);
            let (w, h) = (3 * scale, 5 * scale);
            let x = rng.random_range(2..SIDE as i32 - w - 2);
            let y = rng.random_range(2..SIDE as i32 - h - 2);
            draw_digit(&mut image, digit, x, y, scale, [20, 20, 20]);
            captions = (digit_caption(digit), (0..10).map(digit_caption).collect());
            ("What number is written?", digit.to_string())
        }
    };
    Sample {
        kind,
        image,
        question,
        answer,
        caption: captions.0,
        alternatives: captions.1,
    }
}

fn draw_shape(image: &mut RgbImage, shape: usize, cx: i32, cy: i32, r: i32, colour: [u8; 3]) {
    for y in (cy - r).max(0)..(cy + r).min(SIDE as i32) {
        for x in (cx - r).max(0)..(cx + r).min(SIDE as i32) {
            let (dx, dy) = (x - cx, y - cy);
            let inside = match shape {
                0 => dx * dx + dy * dy <= r * r,
                1 => dx.abs() * 10 <= r * 8 && dy.abs() * 10 <= r * 8,
                // Apex up: the half-width grows from 0 at the top to r at the bottom.
                _ => dy >= -r && dy < r && 2 * dx.abs() <= dy + r,
            };
            if inside {
                image.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
}

fn draw_digit(image: &mut RgbImage, digit: usize, x0: i32, y0: i32, scale: i32, colour: [u8; 3]) {
    for (row, bits) in DIGITS[digit].iter().enumerate() {
        for col in 0..3 {
            if bits & (0b100 >> col) == 0 {
                continue;
            }
            for dy in 0..scale {
                for dx in 0..scale {
                    let (x, y) = (x0 + col * scale + dx, y0 + row as i32 * scale + dy);
                    image.put_pixel(x as u32, y as u32, Rgb(colour));
                }
            }
        }
    }
}

/// Draws `count` samples from `seed`, saves each image as `DIR/images/NAME-I.png` and
/// writes `DIR/FILE` with one JSON line per sample, made by `line` from the sample and its
/// image's path (relative to `DIR`).
fn write_samples(
    dir: &Path,
    name: &str,
    file: &str,
    count: usize,
    seed: u64,
    mut line: impl FnMut(&Sample, &str) -> serde_json::Value,
) -> anyhow::Result<()> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).with_context(|| images.display().to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lines = String::new();
    for i in 0..count {
        let sample = sample(&mut rng, i);
        let image = format!("images/{name}-{i}.png");
        sample.image.save(dir.join(&image)).with_context(|| image.clone())?;
        lines.push_str(&line(&sample, &image).to_string());
        lines.push('\n');
    }
    let path = dir.join(file);
    std::fs::write(&path, lines).with_context(|| path.display().to_string())?;
    Ok(())
}

/// The question about a sample's image, as a user message.
fn question(sample: &Sample, image: &str) -> serde_json::Value {
    serde_json::json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": sample.question},
    ]})
}

/// Writes `count` samples as `DIR/NAME.jsonl` (chat conversations, each with its `kind`)
/// and their images under `DIR/images/NAME-*.png`.
pub fn write_split(dir: &Path, name: &str, count: usize, seed: u64) -> anyhow::Result<()> {
    write_samples(dir, name, &format!("{name}.jsonl"), count, seed, |sample, image| {
        serde_json::json!({
            "kind": sample.kind,
            "messages": [question(sample, image), {"role": "assistant", "content": sample.answer}],
        })
    })
}

/// Writes `count` samples as image/caption pairs, `DIR/NAME-captions.jsonl` (each line
/// `{"kind", "image", "text", "labels", "label"}`: the caption, the captions that differ in
/// the asked attribute and the caption's index among them), images under `DIR/images`.
pub fn write_caption_split(dir: &Path, name: &str, count: usize, seed: u64) -> anyhow::Result<()> {
    write_samples(
        dir,
        name,
        &format!("{name}-captions.jsonl"),
        count,
        seed,
        |sample, image| {
            let label = (sample.alternatives.iter())
                .position(|c| *c == sample.caption)
                .expect("the caption is among its alternatives. This is a bug.");
            serde_json::json!({
                "kind": sample.kind,
                "image": image,
                "text": sample.caption,
                "labels": sample.alternatives,
                "label": label,
            })
        },
    )
}

/// Writes `count` samples as preference pairs, `DIR/NAME-pairs.jsonl` (each line
/// `{"prompt", "chosen", "rejected"}`: the question about the image, its answer, and a wrong
/// one: a 2's or 5's mirror image (the digits its 3x5 font draws as mirrors of each other),
/// another digit's nearest glyph, else another answer of the same kind drawn from `seed`),
/// images under `DIR/images` as `write_split` names them.
pub fn write_pair_split(dir: &Path, name: &str, count: usize, seed: u64) -> anyhow::Result<()> {
    let mut wrong = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    write_samples(
        dir,
        name,
        &format!("{name}-pairs.jsonl"),
        count,
        seed,
        |sample, image| {
            serde_json::json!({
                "prompt": [question(sample, image)],
                "chosen": sample.answer,
                "rejected": wrong_answer(sample.kind, &sample.answer, &mut wrong),
            })
        },
    )
}

/// A wrong answer to a question of `kind` whose answer is `answer`.
fn wrong_answer(kind: &str, answer: &str, rng: &mut ChaCha8Rng) -> String {
    match (kind, answer) {
        ("digit", "2") => return "5".into(),
        ("digit", "5") => return "2".into(),
        _ => {}
    }
    if kind == "digit"
        && let Ok(digit) = answer.parse::<usize>()
        && digit < 10
    {
        // The digits whose glyph differs from this one's in the fewest pixels: the ones a
        // model confuses it with.
        let distance = |d: usize| -> u32 { (0..5).map(|r| (DIGITS[d][r] ^ DIGITS[digit][r]).count_ones()).sum() };
        let nearest = (0..10).filter(|&d| d != digit).map(distance).min().unwrap_or(0);
        let closest: Vec<usize> = (0..10).filter(|&d| d != digit && distance(d) == nearest).collect();
        return closest[rng.random_range(0..closest.len())].to_string();
    }
    let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let answers: Vec<&str> = match kind {
        "colour" => COLOURS.iter().map(|c| c.0).collect(),
        "shape" => SHAPES.to_vec(),
        "count" => COUNTS.to_vec(),
        "position" => PLACES.to_vec(),
        _ => digits.iter().map(String::as_str).collect(),
    };
    let others: Vec<&str> = answers.into_iter().filter(|a| *a != answer).collect();
    others[rng.random_range(0..others.len())].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_answers_are_wrong_and_of_the_same_kind_and_2_and_5_swap() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(wrong_answer("digit", "2", &mut rng), "5");
        assert_eq!(wrong_answer("digit", "5", &mut rng), "2");
        for _ in 0..50 {
            // 9's glyph is one pixel from 8's, 5's and 3's.
            let digit = wrong_answer("digit", "9", &mut rng);
            assert!(["8", "5", "3"].contains(&digit.as_str()), "{digit}");
            let colour = wrong_answer("colour", "red", &mut rng);
            assert!(colour != "red" && COLOURS.iter().any(|c| c.0 == colour), "{colour}");
            assert_ne!(wrong_answer("position", "left", &mut rng), "left");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_samples_and_every_kind_comes_in_turn() {
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..10).map(|i| sample(&mut rng, i)).collect::<Vec<_>>()
        };
        let (a, b, c) = (draw(1), draw(1), draw(2));
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.image == y.image && x.answer == y.answer)
        );
        assert!(a.iter().zip(&c).any(|(x, y)| x.image != y.image));
        let kinds: Vec<&str> = a.iter().map(|s| s.kind).collect();
        assert_eq!(kinds[..5], KINDS);
        // Every caption is one of its labels, and the labels differ.
        for s in &a {
            assert!(
                s.alternatives.contains(&s.caption),
                "{}: {:?}",
                s.caption,
                s.alternatives
            );
            let mut labels = s.alternatives.clone();
            labels.dedup();
            assert_eq!(labels.len(), s.alternatives.len());
        }
        assert_eq!(a[2].caption.split(' ').count(), 3, "{}", a[2].caption);
    }

    #[test]
    fn a_count_question_shows_that_many_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for i in 0..40 {
            let s = sample(&mut rng, i);
            if s.kind != "count" {
                continue;
            }
            // Coloured pixels per quadrant: a shape sits wholly in one.
            let filled = (0..4)
                .filter(|q| {
                    let (x0, y0) = (32 * (q % 2), 32 * (q / 2));
                    (0..32).any(|y| (0..32).any(|x| s.image.get_pixel(x0 + x, y0 + y).0 != [255, 255, 255]))
                })
                .count();
            assert_eq!(COUNTS[filled - 1], s.answer);
        }
    }
}
