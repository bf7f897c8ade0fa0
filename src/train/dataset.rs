//! Where training and evaluation rows come from: our JSONL (one object per line), a Parquet
//! file, a folder in the hub's dataset layout (`data/train-00000-of-00001.parquet`), or a
//! hub dataset id resolved through the Hugging Face cache (downloaded where a network
//! exists). Every row reaches its parser as a JSON object, with `--columns` renames applied
//! and `datasets`' Image structs (`{"bytes", "path"}`) turned into image URLs; an error names
//! the file and the line, or the row group and row.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use base64::Engine;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Value};

use super::data::DataError;

/// Where a row sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based, as editors count.
    Line(usize),
    /// 0-based, as `pyarrow.parquet.ParquetFile.read_row_group` counts.
    Row { group: usize, row: usize },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(line) => write!(f, "line {line}"),
            Location::Row { group, row } => write!(f, "row group {group}, row {row}"),
        }
    }
}

/// One row: its columns, where it is, and the folder its relative image paths start from.
pub struct Row<'a> {
    pub columns: Map<String, Value>,
    pub at: Location,
    pub folder: &'a Path,
}

/// `--columns ours=theirs,...`: a dataset's column names mapped onto the ones we read.
#[derive(Debug, Clone, Default)]
pub struct Columns(Vec<(String, String)>);

impl Columns {
    /// `--columns`' values, each OURS=THEIRS.
    pub fn parse(pairs: &[String]) -> Result<Self, String> {
        let pairs = (pairs.iter().filter(|p| !p.trim().is_empty()))
            .map(|pair| match pair.split_once('=') {
                Some((ours, theirs)) if !ours.trim().is_empty() && !theirs.trim().is_empty() => {
                    Ok((ours.trim().to_string(), theirs.trim().to_string()))
                }
                _ => Err(format!("`{pair}`: expected OURS=THEIRS, e.g. images=image")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Columns(pairs))
    }

    fn apply(&self, columns: &mut Map<String, Value>) -> Result<(), String> {
        for (ours, theirs) in &self.0 {
            let value =
                (columns.remove(theirs)).ok_or_else(|| format!("no column `{theirs}` (--columns {ours}={theirs})"))?;
            columns.insert(ours.clone(), value);
        }
        Ok(())
    }
}

/// A dataset named on the command line, resolved to its files.
pub struct Dataset {
    files: Vec<PathBuf>,
    parquet: bool,
    columns: Columns,
}

impl Dataset {
    /// `spec`: a JSONL file, a Parquet file, a folder in the hub's layout, or a hub id
    /// (looked up in the cache the environment names); `split` picks a folder's or a hub
    /// dataset's files.
    pub fn open(spec: &Path, split: &str, columns: &Columns) -> Result<Dataset, DataError> {
        Self::open_in(spec, split, columns, &crate::model::hub::cache_dir_from_env())
    }

    /// As `open`, with hub ids looked up in `cache_dir`.
    pub fn open_in(spec: &Path, split: &str, columns: &Columns, cache_dir: &Path) -> Result<Dataset, DataError> {
        let columns = columns.clone();
        if spec.is_dir() {
            let files = split_files(spec, split)?;
            return Ok(Dataset {
                files,
                parquet: true,
                columns,
            });
        }
        let text = spec.to_string_lossy();
        let file_like = spec
            .extension()
            .is_some_and(|e| ["jsonl", "json", "parquet"].contains(&&*e.to_string_lossy()));
        if !spec.exists() && !file_like && crate::model::hub::looks_like_hub_id(&text) {
            let dir = hub_dataset(&text, cache_dir)?;
            let files = split_files(&dir, split)?;
            return Ok(Dataset {
                files,
                parquet: true,
                columns,
            });
        }
        Ok(Dataset {
            columns,
            ..Dataset::file(spec)
        })
    }

    /// One JSONL or Parquet file, its columns as they are.
    pub fn file(path: &Path) -> Dataset {
        Dataset {
            files: vec![path.to_path_buf()],
            parquet: path.extension().is_some_and(|e| e == "parquet"),
            columns: Columns::default(),
        }
    }

    /// The first file: what errors about the dataset as a whole name.
    pub fn name(&self) -> &Path {
        &self.files[0]
    }

    /// Every row through `parse`, in file order; an error names the file and the row, and a
    /// dataset without rows is an error too.
    pub fn rows<T>(&self, mut parse: impl FnMut(Row) -> Result<T, String>) -> Result<Vec<T>, DataError> {
        let mut items = Vec::new();
        for file in &self.files {
            let folder = file.parent().unwrap_or(Path::new("."));
            let mut each = |columns: Map<String, Value>, at: Location| -> Result<(), DataError> {
                let row_error = |message| DataError::Row {
                    file: file.clone(),
                    at,
                    message,
                };
                let mut row = Row { columns, at, folder };
                self.columns.apply(&mut row.columns).map_err(row_error)?;
                items.push(parse(row).map_err(row_error)?);
                Ok(())
            };
            match self.parquet {
                true => parquet_rows(file, &mut each)?,
                false => jsonl_rows(file, &mut each)?,
            }
        }
        if items.is_empty() {
            return Err(DataError::Empty {
                file: self.name().to_path_buf(),
            });
        }
        Ok(items)
    }
}

fn io_error(file: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        file: file.to_path_buf(),
        source,
    }
}

fn jsonl_rows(
    file: &Path,
    each: &mut impl FnMut(Map<String, Value>, Location) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let text = std::fs::read_to_string(file).map_err(io_error(file))?;
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = Location::Line(index + 1);
        let columns = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(columns)) => columns,
            parsed => {
                let why = parsed.err().map(|e| format!(": {e}")).unwrap_or_default();
                return Err(DataError::Row {
                    file: file.to_path_buf(),
                    at,
                    message: format!("not a JSON object{why}"),
                });
            }
        };
        each(columns, at)?;
    }
    Ok(())
}

fn parquet_rows(
    file: &Path,
    each: &mut impl FnMut(Map<String, Value>, Location) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let parquet_error = |at: Option<Location>, e: parquet::errors::ParquetError| match at {
        Some(at) => DataError::Row {
            file: file.to_path_buf(),
            at,
            message: e.to_string(),
        },
        None => DataError::Format {
            file: file.to_path_buf(),
            message: e.to_string(),
        },
    };
    let reader =
        SerializedFileReader::new(File::open(file).map_err(io_error(file))?).map_err(|e| parquet_error(None, e))?;
    for group in 0..reader.num_row_groups() {
        let start = Some(Location::Row { group, row: 0 });
        let group_reader = reader.get_row_group(group).map_err(|e| parquet_error(start, e))?;
        let rows = group_reader.get_row_iter(None).map_err(|e| parquet_error(start, e))?;
        for (row, fields) in rows.enumerate() {
            let at = Location::Row { group, row };
            let fields = fields.map_err(|e| parquet_error(Some(at), e))?;
            let columns = (fields.into_columns().into_iter())
                .map(|(name, field)| (name, json(field)))
                .collect();
            each(columns, at)?;
        }
    }
    Ok(())
}

/// A Parquet value as JSON. `datasets` stores an image as a struct of its encoded `bytes`
/// and its `path`: it becomes a `data:` URI (the bytes) or the path, as our JSONL names
/// images. Other binary values become base64 strings.
fn json(field: Field) -> Value {
    match field {
        Field::Group(row) => {
            let mut object: Map<String, Value> = (row.into_columns().into_iter())
                .map(|(name, field)| (name, json(field)))
                .collect();
            let is_image = object.len() == 2 && object.contains_key("bytes") && object.contains_key("path");
            match (is_image, object.remove("bytes")) {
                (true, Some(Value::String(uri))) if uri.starts_with("data:") => Value::String(uri),
                (true, Some(Value::Null)) => object.remove("path").unwrap_or(Value::Null),
                (_, Some(bytes)) => {
                    object.insert("bytes".into(), bytes);
                    Value::Object(object)
                }
                (_, None) => Value::Object(object),
            }
        }
        Field::ListInternal(list) => Value::Array(list.elements().iter().cloned().map(json).collect()),
        Field::MapInternal(map) => Value::Object(
            (map.entries().iter().cloned())
                .map(|(key, value)| match json(key) {
                    Value::String(key) => (key, json(value)),
                    other => (other.to_string(), json(value)),
                })
                .collect(),
        ),
        Field::Bytes(bytes) => {
            let data = bytes.data();
            let encoded = base64::engine::general_purpose::STANDARD.encode(data);
            match image::guess_format(data) {
                Ok(format) => Value::String(format!("data:{};base64,{encoded}", format.to_mime_type())),
                Err(_) => Value::String(encoded),
            }
        }
        other => other.to_json_value(),
    }
}

/// The Parquet files of `split` in a dataset folder, in the layouts the hub uses:
/// `data/{split}-*.parquet` (what `push_to_hub` writes), `{split}/*.parquet` and
/// `data/{split}/*.parquet` (the hub's converted datasets), `{split}-*.parquet`; and, as
/// the hub reads a dataset whose files name no split, every Parquet file of the folder (or
/// its `data/`) as `train`.
fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>, DataError> {
    let mut candidates = vec![
        (dir.join("data"), format!("{split}-")),
        (dir.join(split), String::new()),
        (dir.join("data").join(split), String::new()),
        (dir.to_path_buf(), format!("{split}-")),
        (dir.to_path_buf(), format!("{split}.")),
    ];
    if split == "train" && !names_a_split(dir) {
        candidates.extend([(dir.to_path_buf(), String::new()), (dir.join("data"), String::new())]);
    }
    for (folder, prefix) in candidates {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        let mut files: Vec<PathBuf> = (entries.filter_map(Result::ok))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .filter(|p| (p.file_name().and_then(|n| n.to_str())).is_some_and(|n| n.starts_with(&prefix)))
            .collect();
        if !files.is_empty() {
            files.sort();
            return Ok(files);
        }
    }
    Err(DataError::Format {
        file: dir.to_path_buf(),
        message: format!(
            "no Parquet files of split `{split}` (looked for data/{split}-*.parquet, {split}/*.parquet, \
             data/{split}/*.parquet, {split}-*.parquet)"
        ),
    })
}

/// Whether any Parquet file of `dir` or `dir/data` names a split, or a split folder exists.
fn names_a_split(dir: &Path) -> bool {
    const SPLITS: &[&str] = &["train", "test", "validation", "valid", "dev", "eval"];
    [dir.to_path_buf(), dir.join("data")].iter().any(|folder| {
        let Ok(entries) = std::fs::read_dir(folder) else {
            return false;
        };
        (entries.filter_map(Result::ok)).any(|e| {
            let name = e.file_name().to_string_lossy().to_lowercase();
            SPLITS
                .iter()
                .any(|s| name == *s || name.starts_with(&format!("{s}-")) || name.starts_with(&format!("{s}.")))
        })
    })
}

/// A hub dataset's snapshot folder: the cached one, else downloaded (its Parquet files).
fn hub_dataset(id: &str, cache_dir: &Path) -> Result<PathBuf, DataError> {
    let hub_error = |message: String| DataError::Format {
        file: PathBuf::from(id),
        message,
    };
    let repo = cache_dir.join(format!("datasets--{}", id.replace('/', "--")));
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let snapshot = repo.join("snapshots").join(commit.trim());
        if snapshot.is_dir() {
            return Ok(snapshot);
        }
    }
    if crate::model::hub::offline_from_env() {
        return Err(hub_error(format!(
            "not in the cache at {} and HF_HUB_OFFLINE is set",
            cache_dir.display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    let repo = api.dataset(id.to_string());
    let info = repo.info().map_err(|e| hub_error(e.to_string()))?;
    let mut snapshot = None;
    for file in info.siblings.iter().filter(|s| s.rfilename.ends_with(".parquet")) {
        let path = repo
            .get(&file.rfilename)
            .map_err(|e| hub_error(format!("{}: {e}", file.rfilename)))?;
        let depth = Path::new(&file.rfilename).components().count();
        snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| hub_error("the dataset has no Parquet files".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_map_their_names_onto_ours() {
        let columns = Columns::parse(&["images=image".into(), " prompt=question".into()]).unwrap();
        let mut row: Map<String, Value> =
            serde_json::from_str(r#"{"image": "a.png", "question": "Which?", "chosen": "x"}"#).unwrap();
        columns.apply(&mut row).unwrap();
        assert_eq!(Value::Object(row.clone())["images"], "a.png");
        assert_eq!(row["prompt"], "Which?");
        assert!(!row.contains_key("question"));
        assert!(columns.apply(&mut row).unwrap_err().contains("--columns images=image"));
        assert!(Columns::parse(&["images".into()]).is_err());
    }

    #[test]
    fn a_folder_in_the_hub_layout_gives_its_split_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        for name in [
            "train-00001-of-00002.parquet",
            "train-00000-of-00002.parquet",
            "test-00000-of-00001.parquet",
        ] {
            std::fs::write(dir.path().join("data").join(name), b"").unwrap();
        }
        let names = |split| -> Vec<String> {
            (split_files(dir.path(), split).unwrap().iter())
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names("train"),
            ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
        );
        assert_eq!(names("test"), ["test-00000-of-00001.parquet"]);
        let missing = split_files(dir.path(), "validation").unwrap_err().to_string();
        assert!(missing.contains("validation"), "{missing}");
        // Files that name no split are all `train`.
        let unnamed = tempfile::tempdir().unwrap();
        for name in ["RLAIF-V-Dataset_001.parquet", "RLAIF-V-Dataset_000.parquet"] {
            std::fs::write(unnamed.path().join(name), b"").unwrap();
        }
        let files = split_files(unnamed.path(), "train").unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0].ends_with("RLAIF-V-Dataset_000.parquet"));
        assert!(split_files(unnamed.path(), "test").is_err());
    }
}
