//! `identities.jsonl`: the memory backend's entries as they were learned, one JSON line
//! each (`{"a":anonymousId,"t":learned_at,"u":…,"e":…,"p":…}`, the whole merged entry),
//! so a restart keeps them. Read back in order (a later line wins), rewritten from the
//! live entries when it has grown past twice their number.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::message::Known;

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line {
    #[serde(rename = "a")]
    pub anonymous_id: String,
    /// Unix seconds when it was last taught.
    #[serde(rename = "t")]
    pub learned_at: u32,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

impl Line {
    pub fn new(anonymous_id: &str, known: &Known, learned_at: u32) -> Line {
        Line {
            anonymous_id: anonymous_id.to_string(),
            learned_at,
            user_id: known.user_id.clone(),
            email: known.email.clone(),
            phone: known.phone.clone(),
        }
    }

    pub fn known(self) -> (String, Known, u32) {
        let known = Known {
            user_id: self.user_id,
            email: self.email,
            phone: self.phone,
        };
        (self.anonymous_id, known, self.learned_at)
    }
}

pub struct Journal {
    path: PathBuf,
    /// The open file and how many lines it holds.
    file: Mutex<(File, u64)>,
}

impl Journal {
    /// Opens (creating) `<dir>/identities.jsonl` and hands `each` every whole line.
    pub fn open(dir: &Path, mut each: impl FnMut(Line)) -> io::Result<Journal> {
        let path = dir.join("identities.jsonl");
        fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| at(&path, e))?;
        let mut lines = 0;
        for line in BufReader::new(File::open(&path).map_err(|e| at(&path, e))?).lines() {
            let line = line.map_err(|e| at(&path, e))?;
            // A torn last line (a crash mid-append) does not parse and is passed over.
            if let Ok(entry) = serde_json::from_str::<Line>(&line) {
                each(entry);
                lines += 1;
            }
        }
        Ok(Journal {
            path,
            file: Mutex::new((file, lines)),
        })
    }

    /// Appends lines in one write (to the OS, not synced: a power cut may lose the
    /// latest, a process crash does not). Returns the lines the journal now holds.
    pub fn append(&self, lines: &[Line]) -> io::Result<u64> {
        let mut bytes = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut bytes, line).expect("writing to a Vec cannot fail");
            bytes.push(b'\n');
        }
        let mut file = self.file.lock().expect("identity journal poisoned");
        file.0.write_all(&bytes).map_err(|e| at(&self.path, e))?;
        file.1 += lines.len() as u64;
        Ok(file.1)
    }

    /// Replaces the journal with `lines` (write, fsync, rename).
    pub fn rewrite(&self, lines: impl Iterator<Item = Line>) -> io::Result<()> {
        let mut file = self.file.lock().expect("identity journal poisoned");
        let tmp = self.path.with_extension("tmp");
        let mut count = 0;
        let written = (|| {
            let mut fresh = io::BufWriter::new(File::create(&tmp)?);
            for line in lines {
                serde_json::to_writer(&mut fresh, &line)?;
                fresh.write_all(b"\n")?;
                count += 1;
            }
            fresh.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(at(&tmp, e));
        }
        let reopened = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(|e| at(&self.path, e))?;
        *file = (reopened, count);
        Ok(())
    }
}

/// The error with the path it is about.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
