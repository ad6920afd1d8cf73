//! `kind = "s3"` against a real S3 protocol server: s3s-fs (it checks SigV4 and stores
//! objects as files under `<root>/<bucket>/<key>`), on a free loopback port. The binary
//! comes from `FANOUT_S3S_FS`, which `scripts/test` installs.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

const ACCESS_KEY: &str = "fanout-test-key";
const SECRET_KEY: &str = "fanout-test-secret";
const BUCKET: &str = "events";

/// One s3s-fs process over a temporary directory, with the bucket made.
struct S3sFs {
    port: u16,
    root: tempfile::TempDir,
    child: Option<Child>,
}

impl S3sFs {
    /// Not started yet: the port is chosen and the bucket exists on disk.
    fn prepare() -> S3sFs {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        S3sFs {
            port,
            root,
            child: None,
        }
    }

    fn start() -> S3sFs {
        let mut s3 = S3sFs::prepare();
        s3.run();
        s3
    }

    fn run(&mut self) {
        let bin = common::required_path("FANOUT_S3S_FS");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -STOP` / `kill -CONT`: frozen, it answers nothing but keeps its connections.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every object in the bucket: key → its bytes.
    fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        let bucket = self.root.path().join(BUCKET);
        let mut found = BTreeMap::new();
        let mut todo = vec![bucket.clone()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    let key = path.strip_prefix(&bucket).unwrap().to_string_lossy();
                    found.insert(key.into_owned(), std::fs::read(&path).unwrap());
                }
            }
        }
        found
    }

    /// Multipart uploads s3s-fs holds that were neither completed nor aborted.
    fn open_uploads(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(".upload")
            })
            .collect()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// fanout with an `archive` destination on `endpoint`, a second source `ios`, and `extra`
/// lines in the destination.
fn fanout(endpoint: &str, secret: &str, extra: &str) -> Fanout {
    let section = format!(
        "[[sources]]\nname = \"ios\"\nwrite_keys = [\"wk_ios\"]\n\n\
         [[destinations]]\nname = \"archive\"\nkind = \"s3\"\nbucket = \"{BUCKET}\"\n\
         endpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
         access_key_id_env = \"ARCHIVE_KEY\"\nsecret_access_key_env = \"ARCHIVE_SECRET\"\n\
         retry = {{ initial_backoff = \"100ms\", max_backoff = \"500ms\" }}\n{extra}\n"
    );
    Fanout::start_with(
        Settings::default()
            .section(&section)
            .env("ARCHIVE_KEY", ACCESS_KEY)
            .env("ARCHIVE_SECRET", secret),
    )
}

async fn send(f: &Fanout, key: &str, ids: impl IntoIterator<Item = String>) {
    let batch: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"type": "track", "userId": "u", "event": "Seen", "messageId": id}))
        .collect();
    let body = json!({ "batch": batch });
    assert_success(
        f.post_as(key, "/v1/batch")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a gzip object");
    text
}

/// Polls the bucket until its objects hold `n` lines; returns key → lines.
async fn wait_archived(s3: &S3sFs, n: usize) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let archived: BTreeMap<String, Vec<String>> = s3
            .objects()
            .into_iter()
            .map(|(key, bytes)| (key, gunzip(&bytes).lines().map(String::from).collect()))
            .collect();
        let lines = archived.values().map(Vec::len).sum::<usize>();
        if lines >= n || Instant::now() > deadline {
            assert_eq!(lines, n, "lines archived: {:?}", archived.keys());
            return archived;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(lines: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["messageId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// `segment-logs/<source>/<day ms>/<yyyymmddThhmmss.mmmZ>-<32 hex>.gz`, the day being
/// that of each line's `receivedAt`.
fn assert_layout(key: &str, lines: &[String], source: &str) {
    let parts: Vec<&str> = key.split('/').collect();
    assert_eq!(parts.len(), 4, "{key}");
    assert_eq!(parts[..2], ["segment-logs", source], "{key}");
    let day_ms: i64 = parts[2].parse().unwrap();
    assert_eq!(day_ms % 86_400_000, 0, "{key}");
    for line in lines {
        let message: Value = serde_json::from_str(line).unwrap();
        let received =
            chrono::DateTime::parse_from_rfc3339(message["receivedAt"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
        assert_eq!(
            received - received.rem_euclid(86_400_000),
            day_ms,
            "{key}: {line}"
        );
    }
    let name = parts[3].strip_suffix(".gz").expect(key);
    let (time, digest) = name.split_once('-').expect(key);
    assert!(
        chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%S%.3fZ").is_ok(),
        "{key}"
    );
    assert!(
        digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
}

#[tokio::test]
async fn archives_every_message_once_in_segments_layout() {
    let s3 = S3sFs::start();
    let f = fanout(
        &s3.endpoint(),
        SECRET_KEY,
        "batch = { linger = \"300ms\" }\n",
    );
    let web: Vec<String> = (0..40).map(|i| format!("web-{i:02}")).collect();
    let ios: Vec<String> = (0..15).map(|i| format!("ios-{i:02}")).collect();
    send(&f, common::WRITE_KEY, web.clone()).await;
    send(&f, "wk_ios", ios.clone()).await;
    send(&f, common::WRITE_KEY, ["web-40".to_string()]).await;

    let archived = wait_archived(&s3, 56).await;
    f.wait_settled("archive").await;
    let mut by_source: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for (key, lines) in &archived {
        let source = if key.starts_with("segment-logs/test/") {
            "test"
        } else {
            "ios"
        };
        assert_layout(key, lines, source);
        by_source.entry(source).or_default().extend(lines);
    }
    let mut web_all = web;
    web_all.push("web-40".into());
    assert_eq!(ids(&by_source["test"]), web_all);
    assert_eq!(ids(&by_source["ios"]), ios);

    // The lines are the stored messages, byte for byte, as the file destination got them.
    let stored = std::fs::read_to_string(f.dir().join("out.jsonl")).unwrap();
    let mut stored: Vec<&str> = stored.lines().collect();
    let mut lines: Vec<&str> = archived.values().flatten().map(String::as_str).collect();
    stored.sort_unstable();
    lines.sort_unstable();
    assert_eq!(lines, stored);
    assert!(s3.open_uploads().is_empty());
}

#[tokio::test]
async fn an_upload_that_failed_is_retried_until_s3_is_up() {
    let mut s3 = S3sFs::prepare();
    let f = fanout(
        &s3.endpoint(),
        SECRET_KEY,
        "batch = { linger = \"100ms\" }\n",
    );
    send(&f, common::WRITE_KEY, (0..20).map(|i| format!("m-{i:02}"))).await;
    // Twice refused (nothing listens on the port yet): retried, not dead-lettered.
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "archive"), ("outcome", "retried")],
        |n| n >= 2.0 * 20.0,
    )
    .await;
    assert!(s3.objects().is_empty());

    s3.run();
    let archived = wait_archived(&s3, 20).await;
    let lines: Vec<&String> = archived.values().flatten().collect();
    let expected: Vec<String> = (0..20).map(|i| format!("m-{i:02}")).collect();
    assert_eq!(ids(&lines), expected);
    assert!(f.dead_letters("archive").await.is_empty());
}

#[tokio::test]
async fn wrong_credentials_dead_letter_with_the_s3_error_code() {
    let s3 = S3sFs::start();
    let f = fanout(
        &s3.endpoint(),
        "not-the-secret",
        "batch = { linger = \"100ms\" }\n",
    );
    send(&f, common::WRITE_KEY, (0..5).map(|i| format!("d-{i}"))).await;
    let letters = f
        .wait_dead_letters("archive", 5, Duration::from_secs(30))
        .await;
    assert_eq!(letters.len(), 5, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["reason"], "rejected", "{letter}");
        assert_eq!(letter["status"], 403, "{letter}");
        let response = letter["response"].as_str().unwrap();
        assert!(
            response.contains("<Code>SignatureDoesNotMatch</Code>"),
            "{letter}"
        );
    }
    assert!(s3.objects().is_empty());
}

/// Parts of 5 MiB, and one batch of exactly what `send_big` sends.
const BIG: &str = "part_size = 5242880\nbatch = { max_events = 1200, linger = \"60s\" }\n";

/// Random text barely compresses: 1 200 messages of 9 KB make an object of ~2 parts,
/// sent as one batch (`max_events` in `BIG`) however long sending them takes. Returns
/// the messageIds, sorted.
async fn send_big(f: &Fanout) -> Vec<String> {
    let mut sent = Vec::new();
    for request in 0..30 {
        let batch: Vec<Value> = (0..40)
            .map(|i| {
                let id = format!("big-{request:02}-{i:02}");
                let noise: String = (0..9000).map(|_| fastrand::alphanumeric()).collect();
                sent.push(id.clone());
                json!({"type": "track", "userId": "u", "event": "Big", "messageId": id,
                       "properties": {"noise": noise}})
            })
            .collect();
        let body = json!({ "batch": batch });
        assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
    }
    sent.sort();
    sent
}

#[tokio::test]
async fn a_large_object_goes_up_in_parts_and_only_whole() {
    let s3 = S3sFs::start();
    let f = fanout(&s3.endpoint(), SECRET_KEY, BIG);
    let sent = send_big(&f).await;
    let archived = wait_archived(&s3, sent.len()).await;
    assert_eq!(archived.len(), 1, "one batch, one object");
    let (key, _) = archived.iter().next().unwrap();
    let size = s3.objects()[key].len();
    assert!(size > 5_242_880, "{size} bytes: more than one part");
    let lines: Vec<&String> = archived.values().flatten().collect();
    assert_eq!(ids(&lines), sent);
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
}

#[tokio::test]
async fn a_crash_mid_upload_shows_no_part_of_the_object_and_the_restart_writes_it_once() {
    let s3 = S3sFs::start();
    let mut f = fanout(&s3.endpoint(), SECRET_KEY, BIG);
    let sent = send_big(&f).await;
    // Once the multipart upload exists, freeze s3s-fs (its parts stay in flight) and
    // kill fanout without a goodbye.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s3.open_uploads().iter().any(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with(".upload-") && name.ends_with(".json")
    }) {
        assert!(Instant::now() < deadline, "no multipart upload began");
        std::thread::sleep(Duration::from_millis(1));
    }
    s3.signal("-STOP");
    f.kill9();
    s3.signal("-CONT");
    // Nothing, or (when fanout was quicker than the freeze) the whole object.
    for (key, bytes) in s3.objects() {
        assert_eq!(gunzip(&bytes).lines().count(), sent.len(), "{key}");
    }

    // The same batch again after the restart: the same object, written once.
    f.restart();
    let archived = wait_archived(&s3, sent.len()).await;
    assert_eq!(archived.len(), 1, "{:?}", archived.keys());
    let lines: Vec<&String> = archived.values().flatten().collect();
    assert_eq!(ids(&lines), sent);
}

#[tokio::test]
async fn a_retried_batch_rewrites_its_stored_objects_instead_of_adding_copies() {
    let s3 = S3sFs::start();
    // A file where the `ios` folder would go: s3s-fs fails that source's uploads (500)
    // while the `test` source's object of the same batch is stored.
    let blocker = s3.root.path().join(BUCKET).join("segment-logs/ios");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"").unwrap();
    // The 20 messages make one batch, however long sending them takes.
    let f = fanout(
        &s3.endpoint(),
        SECRET_KEY,
        "batch = { max_events = 20, linger = \"60s\" }\n",
    );
    send(&f, common::WRITE_KEY, (0..10).map(|i| format!("t-{i}"))).await;
    send(&f, "wk_ios", (0..10).map(|i| format!("i-{i}"))).await;
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "archive"), ("outcome", "retried")],
        |n| n >= 3.0 * 20.0,
    )
    .await;
    std::fs::remove_file(&blocker).unwrap();

    let archived = wait_archived(&s3, 20).await;
    f.wait_settled("archive").await;
    let keys: Vec<&String> = archived.keys().collect();
    assert_eq!(keys.len(), 2, "one object per source: {keys:?}");
    assert!(f.dead_letters("archive").await.is_empty());
}

#[test]
fn fanout_check_names_the_s3_key_at_fault() {
    let config = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n\
        [[destinations]]\nname = \"archive\"\nkind = \"s3\"\nbucket = \"events\"\n\
        endpoint = \"http://127.0.0.1:9000\"\nregion = \"us-east-1\"\n\
        access_key_id_env = \"ARCHIVE_KEY\"\nsecret_access_key_env = \"ARCHIVE_SECRET\"\n";
    let check = |config: &str, env: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("ARCHIVE_KEY")
            .env_remove("ARCHIVE_SECRET")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    };
    let env = [("ARCHIVE_KEY", "k"), ("ARCHIVE_SECRET", "s")];
    let (ok, stderr) = check(config, &env);
    assert!(ok, "{stderr}");

    let cases = [
        (
            config.replace("\"events\"", "\"Events\""),
            "`destinations[0].bucket` (line 11)",
        ),
        (
            format!("{config}part_size = 1024\n"),
            "`destinations[0].part_size` (line 16)",
        ),
        (
            format!("{config}path_style = false\n"),
            "`destinations[0].path_style` (line 16)",
        ),
        (
            format!("{config}prefix = \"../x\"\n"),
            "`destinations[0].prefix` (line 16)",
        ),
        (
            format!("{config}bucket_name = \"x\"\n"),
            "destinations[0].bucket_name",
        ),
        (
            config.replace("region = \"us-east-1\"\n", ""),
            "`s3` needs `region`",
        ),
    ];
    for (bad, want) in cases {
        let (ok, stderr) = check(&bad, &env);
        assert!(!ok && stderr.contains(want), "want {want}: {stderr}");
    }
}
