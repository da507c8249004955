//! Reading tensors from safetensors files with every check a hostile or careless file needs, and
//! writing outputs atomically (a temporary file renamed into place), so a failed run never leaves
//! a partial output file behind.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use spotlight::Tensor;

/// Largest input file read into memory (inputs beyond this are refused before reading).
const MAX_FILE_BYTES: u64 = 16 << 30;

/// Reads the whole file, refusing absurd sizes before allocating.
pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if meta.len() > MAX_FILE_BYTES {
        bail!(
            "{} is {} bytes, more than the {} bytes spotlight reads",
            path.display(),
            meta.len(),
            MAX_FILE_BYTES
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The tensors of one file, looked up by name with an optional prefix.
pub struct Tensors<'a> {
    st: SafeTensors<'a>,
    bytes: &'a [u8],
    prefix: String,
    path: String,
}

impl<'a> Tensors<'a> {
    pub fn parse(bytes: &'a [u8], path: &Path, prefix: &str) -> anyhow::Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file: {e} (expected an 8-byte header length, a JSON header, then the tensor data)",
                path.display()
            )
        })?;
        Ok(Tensors {
            st,
            bytes,
            prefix: prefix.to_string(),
            path: path.display().to_string(),
        })
    }

    /// The file's `__metadata__` (empty when it has none).
    pub fn metadata(&self) -> std::collections::HashMap<String, String> {
        match SafeTensors::read_metadata(self.bytes) {
            Ok((_, m)) => m
                .metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            Err(_) => Default::default(),
        }
    }

    /// The tensor `prefix + name`, if present.
    pub fn get(&self, name: &str) -> Option<(String, TensorView<'a>)> {
        let full = format!("{}{name}", self.prefix);
        self.st.tensor(&full).ok().map(|t| (full, t))
    }

    /// The tensor `prefix + name`, or an error naming what exists.
    pub fn require(&self, name: &str) -> anyhow::Result<(String, TensorView<'a>)> {
        self.get(name).ok_or_else(|| {
            let mut names = self.st.names();
            names.sort();
            anyhow::anyhow!(
                "{} has no tensor '{}{name}' (it has: {})",
                self.path,
                self.prefix,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }
}

/// A float tensor (f32, f16 or bf16) as a [`Tensor`].
pub fn float_tensor(name: &str, t: &TensorView<'_>) -> anyhow::Result<Tensor> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => Tensor::F32(bytemuck::pod_collect_to_vec(d)),
        Dtype::F16 => Tensor::F16(bytemuck::pod_collect_to_vec(d)),
        Dtype::BF16 => Tensor::Bf16(bytemuck::pod_collect_to_vec(d)),
        other => bail!("tensor {name} has dtype {other:?}; expected F32, F16 or BF16"),
    })
}

/// An f32 tensor.
pub fn f32_tensor(name: &str, t: &TensorView<'_>) -> anyhow::Result<Vec<f32>> {
    match t.dtype() {
        Dtype::F32 => Ok(bytemuck::pod_collect_to_vec(t.data())),
        other => bail!("tensor {name} has dtype {other:?}; expected F32"),
    }
}

/// A boolean mask (u8 or bool; nonzero = visible).
pub fn mask_tensor(name: &str, t: &TensorView<'_>) -> anyhow::Result<Vec<u8>> {
    match t.dtype() {
        Dtype::U8 | Dtype::BOOL => Ok(t.data().to_vec()),
        other => {
            bail!("tensor {name} has dtype {other:?}; expected U8 or BOOL (nonzero = visible)")
        }
    }
}

/// An i32 tensor.
pub fn i32_tensor(name: &str, t: &TensorView<'_>) -> anyhow::Result<Vec<i32>> {
    match t.dtype() {
        Dtype::I32 => Ok(bytemuck::pod_collect_to_vec(t.data())),
        other => bail!("tensor {name} has dtype {other:?}; expected I32"),
    }
}

/// One output tensor: name, dtype, shape, little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    pub fn from_tensor(name: &str, shape: Vec<usize>, t: &Tensor) -> Self {
        let (dtype, bytes) = match t {
            Tensor::F32(x) => (Dtype::F32, bytemuck::cast_slice(x).to_vec()),
            Tensor::F16(x) => (Dtype::F16, bytemuck::cast_slice(x).to_vec()),
            Tensor::Bf16(x) => (Dtype::BF16, bytemuck::cast_slice(x).to_vec()),
        };
        OutTensor {
            name: name.to_string(),
            dtype,
            shape,
            bytes,
        }
    }
}

/// Where an output named on the command line really goes, checked before any GPU work.
///
/// Decided behaviour (README, "Limits and guarantees"):
/// - a symbolic link is written *through*: the file it points to is replaced (atomically, by a
///   rename beside the target), the link stays a link;
/// - an existing regular file keeps its permission bits;
/// - an existing path that is not a regular file (a directory, a device such as /dev/full, a
///   FIFO, a socket) is refused, as is a missing parent directory.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    /// The regular file that will be replaced or created.
    pub path: PathBuf,
    /// Permissions of the file it replaces, if one exists.
    pub permissions: Option<std::fs::Permissions>,
}

/// Resolves and checks an output path (see [`OutputTarget`]).
pub fn check_output(path: &Path) -> anyhow::Result<OutputTarget> {
    let mut target = path.to_path_buf();
    // Follow links (bounded, like the kernel's own limit) to the path that will be written.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&target)
                    .with_context(|| format!("cannot read the link {}", target.display()))?;
                target = match target.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            Ok(m) => {
                if !m.file_type().is_file() {
                    bail!(
                        "output {} is {}, not a regular file: expected a file path to create or replace",
                        path.display(),
                        describe_kind(&m.file_type())
                    );
                }
                return Ok(OutputTarget {
                    path: target,
                    permissions: Some(m.permissions()),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = match target.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                if !dir.is_dir() {
                    bail!(
                        "cannot write output {}: directory {} does not exist",
                        path.display(),
                        dir.display()
                    );
                }
                return Ok(OutputTarget {
                    path: target,
                    permissions: None,
                });
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot use output path {}", path.display()));
            }
        }
    }
    bail!(
        "output {} is a chain of more than 40 symbolic links",
        path.display()
    )
}

fn describe_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Writes the tensors to `path` atomically: a temporary file beside the real target (through a
/// symbolic link), given the replaced file's permissions, synced, and renamed into place. On any
/// failure (a full disk included) the temporary file is removed and nothing at `path` changes.
pub fn write_atomic(path: &Path, tensors: &[OutTensor]) -> anyhow::Result<()> {
    let target = check_output(path)?;
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| anyhow::anyhow!("output tensor {}: {e}", t.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None).context("serialising the outputs")?;
    write_bytes_atomic(&target, &bytes)
}

/// Writes `bytes` to a checked target atomically (see [`write_atomic`]).
pub fn write_bytes_atomic(target: &OutputTarget, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let (tmp, mut f) = create_temp(&target.path)?;
    let result = (|| -> anyhow::Result<()> {
        // The replaced file's permissions before any data goes in (a 0600 file stays private).
        if let Some(perm) = &target.permissions {
            f.set_permissions(perm.clone())
                .with_context(|| format!("cannot set the permissions of {}", tmp.display()))?;
        }
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &target.path)
            .with_context(|| format!("cannot move the output into {}", target.path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks `path` as an output ([`check_output`]) and writes `bytes` to it atomically: for
/// files the CLI writes whole (JSON, PNG), so a failure leaves the old file or none, never a
/// partial one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_bytes_atomic(&check_output(path)?, bytes)
}

/// A new temporary file beside `path`, created exclusively (`create_new`: an existing entry of
/// that name, a symbolic link planted there included, is never opened or followed; the next
/// name is tried instead).
fn create_temp(path: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let pid = std::process::id();
    let mut last = None;
    for n in 0..64 {
        let tmp = path.with_file_name(format!(".{name}.spotlight-{pid}-{n}.tmp"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(tmp),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", tmp.display()));
            }
        }
    }
    anyhow::bail!(
        "cannot create a temporary file beside {}: {} and 63 other names are taken",
        path.display(),
        last.map_or_else(String::new, |p| p.display().to_string())
    )
}

#[cfg(all(test, unix))]
mod temp_file_tests {
    /// A symbolic link planted where the temporary file would go is neither followed nor
    /// written through: the file it points to stays as it was, and the output lands whole.
    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("spotlight-tmp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let out = dir.join("out.json");
        let planted = dir.join(format!(".out.json.spotlight-{}-0.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        super::write_file_atomic(&out, b"{\"ok\": true}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(std::fs::read(&out).unwrap(), b"{\"ok\": true}");
        assert!(
            std::fs::symlink_metadata(&planted)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && !n.ends_with("-0.tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
