//! A full disk, for real: the data dir on a small tmpfs (`mount -t tmpfs -o size=…`, so
//! the tests run as root, as CI does), filled until ENOSPC. Ingest answers 503 and
//! `/ready` turns 503; fanout starts (also after `kill -9`) on the full disk; once space
//! is freed it recovers by itself, and every acknowledged message is delivered once.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, Fanout, Settings};
use serde_json::json;

/// A tmpfs of `size` mounted at a path, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed: these tests need root (CI runs them as root)"
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a filler file until the filesystem refuses (ENOSPC).
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Whatever partial page is left: take it too.
        while file.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn ready(f: &Fanout) -> u16 {
    client()
        .get(f.url("/ready"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_ready(f: &Fanout, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = ready(f).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "/ready still {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends one track; returns the status (and checks a 503's Retry-After).
async fn track(f: &Fanout, id: &str) -> u16 {
    let body = json!({"userId": "u1", "event": "Disk", "messageId": id,
                      "properties": {"pad": "p".repeat(2000)}});
    let response = f.post("/v1/track").json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    if status == 503 {
        assert!(response.headers().contains_key("retry-after"));
        let (_, body) = common::status_json(response).await;
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_then_recovers_by_itself_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("data"), "12m");
    let mut f = Fanout::start_in(tmp, Settings::default().server("segment_bytes = 1048576"));
    let mut accepted = HashSet::new();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("m{n}")
    };
    for _ in 0..20 {
        let id = next_id();
        assert_eq!(track(&f, &id).await, 200);
        accepted.insert(id);
    }
    wait_ready(&f, 200, Duration::from_secs(1)).await;

    let filler = disk.fill();
    // What still fits in pages the log already has is taken; then 503s.
    let mut refused = false;
    for _ in 0..2000 {
        let id = next_id();
        match track(&f, &id).await {
            200 => {
                accepted.insert(id);
            }
            503 => {
                refused = true;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused, "no 503 on a full disk");
    wait_ready(&f, 503, Duration::from_secs(3)).await;

    // Killed and started again while the disk is full: it starts, and knows it is full.
    f.kill9();
    f.restart();
    wait_ready(&f, 503, Duration::from_secs(3)).await;
    assert_eq!(track(&f, &next_id()).await, 503);
    // And after a clean stop too (SQLite's dead-letter store then has no -shm file).
    assert!(f.terminate().success());
    f.restart();
    wait_ready(&f, 503, Duration::from_secs(3)).await;

    // Space comes back: no restart needed.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&f, 200, Duration::from_secs(5)).await;
    for _ in 0..20 {
        let id = next_id();
        assert_eq!(track(&f, &id).await, 200);
        accepted.insert(id);
    }

    let delivered = f.wait_delivered(accepted.len()).await;
    let ids: Vec<String> = common::receiver::ids(&delivered);
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "delivered twice");
    assert_eq!(unique, accepted, "acknowledged and delivered differ");
    drop(f);
    drop(disk);
}
