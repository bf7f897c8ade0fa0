//! A video's frames preprocessed while they are decoded: the decoder hands frames over one
//! at a time and the family's `preprocess_frame` runs on every core, so that only a few
//! full-size frames are held at once (64 4K frames would be 1.6 GB).

use ::image::RgbImage;

use crate::model::VideoProcessor;

/// Each frame's values, in order (`count`: how many were sampled); the first error of
/// `frames` stops it.
pub fn preprocess_frames<E>(
    family: &dyn VideoProcessor,
    frames: impl Iterator<Item = Result<RgbImage, E>>,
    count: usize,
) -> Result<Vec<Vec<f32>>, E> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (frames_in, frames_out) = crossbeam_channel::bounded::<(usize, RgbImage)>(threads);
    let (values_in, values_out) = crossbeam_channel::unbounded::<(usize, Vec<f32>)>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (frames_out, values_in) = (frames_out.clone(), values_in.clone());
            scope.spawn(move || {
                for (i, frame) in frames_out {
                    // The receiver lives until the scope ends.
                    let _ = values_in.send((i, family.preprocess_frame(&frame, count)));
                }
            });
        }
        let fed = frames.enumerate().try_for_each(|(i, frame)| {
            frames_in
                .send((i, frame?))
                .expect("the workers run until the sender is dropped. This is a bug.");
            Ok(())
        });
        drop(frames_in);
        fed
    })?;
    drop(values_in);
    let mut values: Vec<(usize, Vec<f32>)> = values_out.into_iter().collect();
    values.sort_by_key(|(i, _)| *i);
    Ok(values.into_iter().map(|(_, v)| v).collect())
}
