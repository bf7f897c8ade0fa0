//! The built-in demo models, carried in the binary: `--model ocellus-demo` (the default) and
//! `--model ocellus-demo-clip` work wherever the binary is (copied, `cargo install`ed, in
//! another image), not only beside the checkout that built it. Their files (about 3.5 MB
//! each) are unpacked on first use into a cache folder named by their content's hash, so a
//! rebuilt binary with other weights never reads a stale copy.

use std::path::{Path, PathBuf};

/// The demo models' names, as `--model` takes them.
pub const DEMO: &str = "ocellus-demo";
pub const DEMO_CLIP: &str = "ocellus-demo-clip";

macro_rules! files {
    ($dir:literal: $($name:literal),+ $(,)?) => {
        &[$(($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/", $dir, "/", $name)) as &[u8])),+]
    };
}

const DEMO_FILES: &[(&str, &[u8])] = files!("ocellus-demo":
    "chat_template.json", "config.json", "generation_config.json", "model.safetensors",
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
);
const DEMO_CLIP_FILES: &[(&str, &[u8])] = files!("ocellus-demo-clip":
    "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
);

/// The files of the demo model `name`, if it is one.
fn files(name: &str) -> Option<&'static [(&'static str, &'static [u8])]> {
    match name {
        DEMO => Some(DEMO_FILES),
        DEMO_CLIP => Some(DEMO_CLIP_FILES),
        _ => None,
    }
}

/// Where demo models are unpacked: `$XDG_CACHE_HOME/ocellus`, else `~/.cache/ocellus`, else
/// the system's temporary folder.
pub fn cache_dir_from_env() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ocellus")
}

/// The folder of demo model `name` under `cache`, unpacked there if it is not yet; `None`
/// when `name` is no demo model.
pub fn unpack(name: &str, cache: &Path) -> std::io::Result<Option<PathBuf>> {
    let Some(files) = files(name) else {
        return Ok(None);
    };
    let mut hasher = blake3::Hasher::new();
    for (file, bytes) in files {
        hasher.update(file.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let hash = hasher.finalize().to_hex();
    let dir = cache.join("models").join(format!("{name}-{}", &hash[..16]));
    if dir.join("config.json").is_file() {
        return Ok(Some(dir));
    }
    // Written beside and renamed into place, so that a reader (another process starting at
    // the same moment) never sees a half-written folder.
    std::fs::create_dir_all(cache.join("models"))?;
    let partial = cache
        .join("models")
        .join(format!(".{name}-{}-{}", &hash[..16], std::process::id()));
    std::fs::create_dir_all(&partial)?;
    for (file, bytes) in files {
        std::fs::write(partial.join(file), bytes)?;
    }
    match std::fs::rename(&partial, &dir) {
        Ok(()) => Ok(Some(dir)),
        // Another process got there first: theirs is the same content.
        Err(_) if dir.join("config.json").is_file() => {
            std::fs::remove_dir_all(&partial)?;
            Ok(Some(dir))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demo_model_unpacks_once_into_a_folder_named_by_its_content() {
        let cache = tempfile::tempdir().unwrap();
        let dir = unpack(DEMO, cache.path()).unwrap().unwrap();
        assert!(dir.starts_with(cache.path()));
        for (file, bytes) in DEMO_FILES {
            assert_eq!(std::fs::read(dir.join(file)).unwrap(), *bytes, "{file}");
        }
        let written = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(unpack(DEMO, cache.path()).unwrap().unwrap(), dir);
        let again = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(written, again, "unpacked again");
        assert_ne!(unpack(DEMO_CLIP, cache.path()).unwrap().unwrap(), dir);
        assert!(unpack("no-such-demo", cache.path()).unwrap().is_none());
    }

    #[test]
    fn every_file_of_the_demo_folders_is_carried() {
        for (name, files) in [(DEMO, DEMO_FILES), (DEMO_CLIP, DEMO_CLIP_FILES)] {
            let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
            let mut on_disk: Vec<String> = (std::fs::read_dir(&folder).unwrap())
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            on_disk.sort();
            let mut carried: Vec<String> = files.iter().map(|(f, _)| f.to_string()).collect();
            carried.sort();
            assert_eq!(carried, on_disk, "{name}");
        }
    }
}
