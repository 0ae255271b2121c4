//! Capture files on disk, as TiProxy lays them out
//! (pingcap/tiproxy `pkg/sqlreplay/store/{const,rotate,encrypt,compress,meta}.go`):
//!
//! - files `traffic-<2006-01-02T15-04-05.999>.log`, `.log.gz` when
//!   compressed, ordered by the time in the name; a new file once one
//!   holds `file_size` bytes of records (TiProxy: 300 MiB);
//! - AES-256-CTR (`aes256-ctr`): a random 16-byte IV first, then the
//!   records XORed with the key stream; the key is the first 32 bytes of
//!   `security.encryption-key-path`;
//! - gzip outside the encryption (TiProxy chains rotate -> encrypt ->
//!   compress -> file);
//! - a `meta` file written last, JSON `{"Version":"v1","Duration":<ns>,
//!   "Cmds":N,"FilteredCmds":N,"EncryptMethod":"aes256-ctr"}`; a capture
//!   refuses a directory that already holds one.
//!
//! File names use UTC (TiProxy uses local time; only the order matters).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aes::cipher::{KeyIvInit, StreamCipher};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// TiProxy's default size of one capture file.
pub const FILE_SIZE: u64 = 300 << 20;
/// The encryption method's name.
pub const AES256_CTR: &str = "aes256-ctr";
/// The meta file's name.
pub const META: &str = "meta";

/// The `meta` file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Meta {
    /// `v1`.
    pub version: String,
    /// The capture's length in nanoseconds (Go's `time.Duration`).
    pub duration: u64,
    /// Commands written.
    pub cmds: u64,
    /// Commands left out (statements with passwords).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub filtered_cmds: u64,
    /// `aes256-ctr`, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encrypt_method: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Reads the AES-256 key: the file's first 32 bytes, as TiProxy does.
pub fn load_key(method: &str, path: &str) -> Result<Option<[u8; 32]>, String> {
    match method.to_ascii_lowercase().as_str() {
        "" | "plaintext" => Ok(None),
        AES256_CTR => {
            if path.is_empty() {
                return Err("security.encryption-key-path is not set".into());
            }
            let k = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            if k.len() < 32 {
                return Err(format!(
                    "invalid aes-256 key length in {path}: {}, expecting 32",
                    k.len()
                ));
            }
            let mut key = [0; 32];
            key.copy_from_slice(&k[..32]);
            Ok(Some(key))
        }
        other => Err(format!("unsupported encrypt method: {other}")),
    }
}

/// Where a file's bytes go: plain, or encrypted; inside gzip or not.
enum Sink {
    Plain(BufWriter<File>),
    Gzip(GzEncoder<BufWriter<File>>),
}

impl Sink {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(b),
            Sink::Gzip(w) => w.write_all(b),
        }
    }

    fn finish(self) -> io::Result<()> {
        let mut w = match self {
            Sink::Plain(w) => w,
            Sink::Gzip(g) => g.finish()?,
        };
        w.flush()?;
        w.get_ref().sync_data()
    }
}

struct OpenFile {
    sink: Sink,
    cipher: Option<Aes256Ctr>,
    written: u64,
}

/// Writes records to rotating files.
pub struct RotateWriter {
    dir: PathBuf,
    file_size: u64,
    compress: bool,
    key: Option<[u8; 32]>,
    cur: Option<OpenFile>,
    last_name: String,
    /// Scratch for encryption (the caller's buffer stays intact).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for RotateWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateWriter")
            .field("dir", &self.dir)
            .field("file_size", &self.file_size)
            .field("compress", &self.compress)
            .field("encrypted", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl RotateWriter {
    /// A writer into `dir` (created if missing).
    pub fn new(
        dir: &Path,
        file_size: u64,
        compress: bool,
        key: Option<[u8; 32]>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file_size: file_size.max(1),
            compress,
            key,
            cur: None,
            last_name: String::new(),
            scratch: Vec::new(),
        })
    }

    /// A file name after the last one: TiProxy's layout, a millisecond
    /// later when two files would share a name.
    fn next_name(&mut self) -> String {
        let mut t = OffsetDateTime::from(SystemTime::now());
        loop {
            let ms = t.millisecond();
            let frac = if ms == 0 {
                String::new()
            } else {
                format!(".{ms:03}").trim_end_matches('0').to_string()
            };
            let stamp = format!(
                "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}{frac}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            if stamp.as_str() > self.last_name.as_str() {
                self.last_name = stamp.clone();
                let ext = if self.compress { ".log.gz" } else { ".log" };
                return format!("traffic-{stamp}{ext}");
            }
            t += Duration::from_millis(1);
        }
    }

    fn open(&mut self) -> io::Result<OpenFile> {
        let name = self.next_name();
        let f = BufWriter::with_capacity(1 << 20, File::create(self.dir.join(name))?);
        let mut sink = if self.compress {
            // The fastest level: the writer thread's deflate was the
            // largest part of the capture's remaining CPU (profile of
            // bench/capture.sh), and records compress well at any level.
            Sink::Gzip(GzEncoder::new(f, Compression::fast()))
        } else {
            Sink::Plain(f)
        };
        let cipher = match &self.key {
            Some(key) => {
                let mut iv = [0u8; 16];
                rand::fill(&mut iv);
                sink.write_all(&iv)?;
                Some(Aes256Ctr::new(key.into(), &iv.into()))
            }
            None => None,
        };
        Ok(OpenFile {
            sink,
            cipher,
            written: 0,
        })
    }

    /// Writes whole records; a file is closed once it reaches the size.
    pub fn write(&mut self, records: &[u8]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if self.cur.is_none() {
            self.cur = Some(self.open()?);
        }
        let f = self.cur.as_mut().expect("opened above");
        match &mut f.cipher {
            Some(c) => {
                self.scratch.clear();
                self.scratch.extend_from_slice(records);
                c.apply_keystream(&mut self.scratch);
                f.sink.write_all(&self.scratch)?;
            }
            None => f.sink.write_all(records)?,
        }
        f.written += records.len() as u64;
        if f.written >= self.file_size {
            self.close_file()?;
        }
        Ok(())
    }

    fn close_file(&mut self) -> io::Result<()> {
        match self.cur.take() {
            Some(f) => f.sink.finish(),
            None => Ok(()),
        }
    }

    /// Closes the open file.
    pub fn finish(mut self) -> io::Result<()> {
        self.close_file()
    }
}

/// The capture files of `dir`, in capture order.
pub fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stamp = name
                .strip_prefix("traffic-")?
                .strip_suffix(".gz")
                .unwrap_or(name.strip_prefix("traffic-")?)
                .strip_suffix(".log")?
                .to_string();
            Some((sort_key(&stamp), e.path()))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// `2006-01-02T15-04-05.9` sorts by time once the fraction is padded.
fn sort_key(stamp: &str) -> String {
    match stamp.split_once('.') {
        Some((s, frac)) => format!("{s}.{frac:0<3}"),
        None => format!("{stamp}.000"),
    }
}

/// Opens one capture file for reading its plain records.
pub fn open_file(path: &Path, key: Option<&[u8; 32]>) -> io::Result<Box<dyn io::BufRead + Send>> {
    let f = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut r: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    if let Some(key) = key {
        let mut iv = [0u8; 16];
        r.read_exact(&mut iv)?;
        r = Box::new(CtrReader {
            inner: r,
            cipher: Aes256Ctr::new(key.into(), &iv.into()),
        });
    }
    Ok(Box::new(BufReader::with_capacity(1 << 16, r)))
}

struct CtrReader {
    inner: Box<dyn Read + Send>,
    cipher: Aes256Ctr,
}

impl Read for CtrReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.cipher.apply_keystream(&mut buf[..n]);
        Ok(n)
    }
}

/// Reads the `meta` file of `dir`.
pub fn read_meta(dir: &Path) -> Result<Meta, String> {
    let p = dir.join(META);
    let b = std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display()))
}

/// Writes the `meta` file of `dir`.
pub fn write_meta(dir: &Path, m: &Meta) -> io::Result<()> {
    let b = serde_json::to_vec(m).map_err(io::Error::other)?;
    std::fs::write(dir.join(META), b)
}
