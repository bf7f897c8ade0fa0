//! Pillow's convolution resampling (`Image.resize` for 8-bit images), reproduced to the
//! bit: transformers resizes images with Pillow, and a parity of 1e-5 in pixel values means
//! every u8 must come out the same. The `image` crate's filters differ in coefficients and
//! rounding, so this mirrors Pillow's libImaging/Resample.c: coefficients in f64,
//! normalised to 22-bit fixed point, a horizontal pass over the needed rows, then a
//! vertical pass.
//!
//! Video frames go through torchvision instead (`resize_like_torch`): PyTorch's antialiased
//! uint8 kernels are Pillow-SIMD's, with the same filters but int16 weights at a precision
//! chosen per axis, and always horizontal first. Their results differ from Pillow's by a
//! level here and there, so both are kept.

use image::DynamicImage;

/// Pillow's resampling filters, by the numbers `resample` uses in preprocessor configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// PIL's `Resampling` codes; NEAREST (0) is not a convolution and is not supported.
    pub fn from_pil_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Lanczos),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            4 => Some(Self::Box),
            5 => Some(Self::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => (1.0 - x.abs()).max(0.0),
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Self::Bicubic => bicubic(x, |x| (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A),
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }

    /// PyTorch's `aa_filter`s: the same functions, but its bicubic evaluates the outer
    /// piece in another order (`cubic_convolution2`), which can move the last bit.
    fn torch_weight(self, x: f64) -> f64 {
        const A: f64 = BICUBIC_A;
        match self {
            Self::Bicubic => bicubic(x, |x| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A),
            _ => self.weight(x),
        }
    }
}

/// Keys' cubic constant, as Pillow and PyTorch's antialiased kernels use it.
const BICUBIC_A: f64 = -0.5;

/// Keys' cubic; `outer` evaluates the piece for 1 <= |x| < 2, whose operation order is where
/// Pillow and PyTorch differ.
fn bicubic(x: f64, outer: impl Fn(f64) -> f64) -> f64 {
    const A: f64 = BICUBIC_A;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        outer(x)
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index, how many inputs, and their fixed-point weights
/// (`precision` fractional bits).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    precision: u32,
}

/// Which implementation's coefficients: Pillow's or PyTorch's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Pillow,
    Torch,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter, flavour: Flavour) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut real = vec![0f64; out_size * ksize];
    let mut wt_max = 0f64;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = (((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin).min(ksize);
        let k = &mut real[xx * ksize..][..xmax];
        let mut ww = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            let at = ((x + xmin) as f64 - center + 0.5) * ss;
            *w = match flavour {
                Flavour::Pillow => filter.weight(at),
                Flavour::Torch => filter.torch_weight(at),
            };
            ww += *w;
        }
        if ww != 0.0 {
            for w in k.iter_mut() {
                *w /= ww;
                wt_max = wt_max.max(*w);
            }
        }
        bounds.push((xmin, xmax));
    }
    let precision = match flavour {
        Flavour::Pillow => PRECISION_BITS,
        // The most bits that keep the largest weight within int16 (`_compute_index_ranges_int16_weights`).
        Flavour::Torch => (0..22)
            .find(|p| (0.5 + wt_max * (1i64 << (p + 1)) as f64) as i64 >= 1 << 15)
            .unwrap_or(22),
    };
    let scale = (1i64 << precision) as f64;
    let weights = real
        .iter()
        .map(|&w| {
            let fixed = w * scale;
            if fixed < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            }
        })
        .collect();
    Coefficients {
        ksize,
        bounds,
        weights,
        precision,
    }
}

#[inline]
fn clip8(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// An interleaved 8-bit image with `channels` samples per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// Resizes like Pillow's `Image.resize((width, height), filter)` on an 8-bit image
/// (Pillow 13: the vertical pass goes first when the height shrinks more than twice as
/// much as the width, which changes the rounding of the intermediate image).
pub fn resize(src: &Image8, width: usize, height: usize, filter: Filter) -> Image8 {
    let need_horizontal = width != src.width;
    let shrink_h = src.height as i64 - height as i64;
    let shrink_w = src.width as i64 - width as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > shrink_w * 2);
    let vertical = coefficients(src.height, height, filter, Flavour::Pillow);
    if !horizontal_first {
        let tall = vertical_pass(src, height, 0, &vertical);
        return if need_horizontal {
            let coeffs = coefficients(src.width, width, filter, Flavour::Pillow);
            horizontal(&tall, width, 0, height, &coeffs)
        } else {
            tall
        };
    }
    separable(src, width, height, filter, Flavour::Pillow)
}

/// torchvision's `resize(..., antialias=True)` of a uint8 image on a CPU with AVX2
/// (PyTorch's `upsample_avx_bilinear_bicubic_uint8` and its Lanczos sibling).
pub fn resize_like_torch(src: &Image8, width: usize, height: usize, filter: Filter) -> Image8 {
    separable(src, width, height, filter, Flavour::Torch)
}

/// Horizontal pass over the rows the vertical pass reads, then the vertical pass.
fn separable(src: &Image8, width: usize, height: usize, filter: Filter, flavour: Flavour) -> Image8 {
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;
    let vertical = coefficients(src.height, height, filter, flavour);
    let mut current = None;
    let mut row_offset = 0;
    if need_horizontal {
        // Only the rows the vertical pass reads are resampled horizontally.
        let first = vertical.bounds[0].0;
        let (last_min, last_len) = vertical.bounds[height - 1];
        let coeffs = coefficients(src.width, width, filter, flavour);
        current = Some(horizontal(src, width, first, last_min + last_len - first, &coeffs));
        row_offset = first;
    }
    if need_vertical {
        let input = current.as_ref().unwrap_or(src);
        current = Some(vertical_pass(input, height, row_offset, &vertical));
    }
    current.unwrap_or_else(|| src.clone())
}

fn horizontal(src: &Image8, width: usize, first_row: usize, rows: usize, coeffs: &Coefficients) -> Image8 {
    let c = src.channels;
    let mut data = vec![0u8; width * rows * c];
    let in_rows = src.data[first_row * src.width * c..].chunks_exact(src.width * c);
    for (in_row, out_row) in in_rows.zip(data.chunks_exact_mut(width * c)) {
        // RGB (every video frame, most images) with the channel count known to the compiler.
        match c {
            3 => horizontal_row::<3>(in_row, out_row, coeffs),
            4 => horizontal_row::<4>(in_row, out_row, coeffs),
            1 => horizontal_row::<1>(in_row, out_row, coeffs),
            2 => horizontal_row::<2>(in_row, out_row, coeffs),
            _ => unreachable!("images have 1 to 4 channels"),
        }
    }
    Image8 {
        width,
        height: rows,
        channels: c,
        data,
    }
}

fn horizontal_row<const C: usize>(in_row: &[u8], out_row: &mut [u8], coeffs: &Coefficients) {
    for (xx, (&(xmin, xmax), out)) in coeffs.bounds.iter().zip(out_row.chunks_exact_mut(C)).enumerate() {
        let k = &coeffs.weights[xx * coeffs.ksize..][..xmax];
        let mut acc = [1i32 << (coeffs.precision - 1); C];
        for (px, &w) in in_row[xmin * C..].chunks_exact(C).zip(k) {
            for ch in 0..C {
                acc[ch] += px[ch] as i32 * w;
            }
        }
        for ch in 0..C {
            out[ch] = clip8(acc[ch], coeffs.precision);
        }
    }
}

fn vertical_pass(src: &Image8, height: usize, row_offset: usize, coeffs: &Coefficients) -> Image8 {
    let c = src.channels;
    let stride = src.width * c;
    let mut data = vec![0u8; stride * height];
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, ymax)) in coeffs.bounds.iter().enumerate() {
        let k = &coeffs.weights[yy * coeffs.ksize..][..ymax];
        acc.fill(1 << (coeffs.precision - 1));
        for (y, &w) in k.iter().enumerate() {
            let in_row = &src.data[(y + ymin - row_offset) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a += p as i32 * w;
            }
        }
        for (out, &a) in data[yy * stride..][..stride].iter_mut().zip(&acc) {
            *out = clip8(a, coeffs.precision);
        }
    }
    Image8 {
        width: src.width,
        height,
        channels: c,
        data,
    }
}

pub fn as_rgb8(image: &DynamicImage) -> Image8 {
    let rgb = image.to_rgb8();
    Image8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        channels: 3,
        data: rgb.into_raw(),
    }
}

/// transformers' `convert_to_rgb` on a PIL image: images with alpha are composited on
/// opaque white with Pillow's integer `alpha_composite`; others are converted directly.
pub fn to_rgb(image: &DynamicImage) -> Image8 {
    if !image.color().has_alpha() {
        return as_rgb8(image);
    }
    let rgba = image.to_rgba8();
    let (width, height) = (rgba.width() as usize, rgba.height() as usize);
    let mut data = Vec::with_capacity(width * height * 3);
    for px in rgba.pixels() {
        let [r, g, b, a] = px.0;
        data.extend([r, g, b].map(|s| composite_on_white(s, a)));
    }
    Image8 {
        width,
        height,
        channels: 3,
        data,
    }
}

/// Pillow's ImagingAlphaComposite for one channel of `src` over opaque white.
pub fn composite_on_white(src: u8, alpha: u8) -> u8 {
    const PRECISION: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let (s, a) = (src as u32, alpha as u32);
    let blend = 255 * (255 - a);
    let out_a255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION) / out_a255;
    let coef2 = 255 * (1 << PRECISION) - coef1;
    let tmp = s * coef1 + 255 * coef2 + (0x80 << PRECISION);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> Image8 {
        let data = (0..width * height * 3).map(|i| ((i * 37) % 251) as u8).collect();
        Image8 {
            width,
            height,
            channels: 3,
            data,
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = gradient(7, 5);
        assert_eq!(resize(&img, 7, 5, Filter::Lanczos), img);
    }

    #[test]
    fn constant_images_stay_constant_under_every_filter() {
        let img = Image8 {
            width: 9,
            height: 4,
            channels: 3,
            data: vec![200; 9 * 4 * 3],
        };
        for filter in [
            Filter::Lanczos,
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Box,
            Filter::Hamming,
        ] {
            let out = resize(&img, 23, 11, filter);
            assert_eq!((out.width, out.height), (23, 11));
            assert!(out.data.iter().all(|&v| v == 200), "{filter:?}");
        }
    }

    /// Horizontal-then-vertical would give 150, 89, 161, ... instead.
    const EXPECTED_VERTICAL_FIRST: [u8; 18] = [
        133, 108, 149, 88, 160, 100, 146, 107, 111, 158, 90, 156, 112, 130, 137, 110, 168, 96,
    ];

    #[test]
    fn a_height_shrinking_much_more_than_the_width_runs_the_vertical_pass_first() {
        // PIL 13: Image.frombytes("RGB", (4, 12), bytes((i * 53) % 256 for i in range(144)))
        //   .resize((3, 2), Image.LANCZOS)
        let src = Image8 {
            width: 4,
            height: 12,
            channels: 3,
            data: (0..144).map(|i| ((i * 53) % 256) as u8).collect(),
        };
        let out = resize(&src, 3, 2, Filter::Lanczos);
        assert_eq!(out.data, EXPECTED_VERTICAL_FIRST);
    }

    #[test]
    fn matches_pillow_on_a_small_upscale() {
        // PIL: Image.frombytes("RGB", (4, 2), bytes(range(0, 240, 10))).resize((6, 3), Image.LANCZOS)
        let src = Image8 {
            width: 4,
            height: 2,
            channels: 3,
            data: (0..24).map(|i| (i * 10) as u8).collect(),
        };
        let out = resize(&src, 6, 3, Filter::Lanczos);
        let expected: Vec<u8> = vec![
            0, 0, 3, 0, 6, 16, 21, 31, 41, 39, 49, 59, 64, 74, 84, 77, 87, 97, 59, 68, 78, 71, 81, 91, 96, 106, 116,
            114, 124, 134, 139, 149, 159, 152, 162, 172, 133, 143, 153, 146, 156, 166, 171, 181, 191, 189, 199, 209,
            214, 224, 234, 227, 237, 247,
        ];
        assert_eq!(out.data, expected);
    }
}
