//! Test harness: runs the real `fanout` binary on a free loopback port with a file
//! destination, and reads what it delivered.
#![allow(dead_code)]
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod captures;
pub mod clients;
pub mod klaviyo;
pub mod nats;
pub mod postgres;
pub mod receiver;
pub mod regulations;
pub mod sse;
pub mod vendors;

/// Write keys every test config accepts (the captures' keys among them).
pub const WRITE_KEY: &str = "wk_test";
pub const KEYS: &str = r#"["wk_test", "wk_segment_python", "wk_segment_node", "test-write-key"]"#;

/// Extra config: lines added to `[server]`, and whole sections appended.
#[derive(Default, Clone)]
pub struct Settings {
    pub server: String,
    /// Lines added to the harness's `test` source.
    pub source: String,
    pub sections: String,
    /// Keep fanout's standard output (for the stdout destination) instead of discarding it.
    pub capture_stdout: bool,
    /// Extra environment variables for fanout (secrets are read from the environment).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments for the server (e.g. `--log-format json`).
    pub args: Vec<String>,
    /// Run the server with this open-file limit (soft and hard), through `prlimit`.
    pub open_files: Option<u64>,
}

impl Settings {
    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    pub fn source(mut self, lines: &str) -> Self {
        self.source.push_str(lines);
        self.source.push('\n');
        self
    }

    pub fn capture_stdout(mut self) -> Self {
        self.capture_stdout = true;
        self
    }

    pub fn section(mut self, text: &str) -> Self {
        self.sections.push_str(text);
        self.sections.push('\n');
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn open_files(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    /// Sets `key=value` in fanout's environment (the server's and `Fanout::command`'s).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running fanout with its own temporary directory.
pub struct Fanout {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    settings: Settings,
    /// Lines this run of the process printed on standard output, when captured.
    stdout: Arc<Mutex<Vec<String>>>,
    /// Lines this run of the process logged on standard error.
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Fanout {
    pub fn start() -> Fanout {
        Fanout::start_with(Settings::default())
    }

    pub fn start_with(settings: Settings) -> Fanout {
        Fanout::start_in(tempfile::tempdir().expect("temp dir"), settings)
    }

    /// Starts in a directory the test prepared (its `data` subdirectory is the data dir,
    /// e.g. a small filesystem mounted there); the directory goes when the `Fanout` does.
    pub fn start_in(tmp: tempfile::TempDir, settings: Settings) -> Fanout {
        let dir = tmp.path().to_path_buf();
        let mut f = Fanout::launch(&dir, &settings);
        f._tmp = Some(tmp);
        f
    }

    fn launch(dir: &Path, settings: &Settings) -> Fanout {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{dir}/data\"\n{server}\n\
             [[sources]]\nname = \"test\"\nwrite_keys = {KEYS}\n{source}\n\
             [[destinations]]\nname = \"out\"\nkind = \"file\"\npath = \"{dir}/out.jsonl\"\n\n{sections}",
            dir = dir.display(),
            server = settings.server,
            source = settings.source,
            sections = settings.sections,
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut command = match settings.open_files {
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_fanout"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_fanout")),
        };
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .args(&settings.args)
            .env("FANOUT_LOG", "info")
            .envs(settings.env.iter().map(|(k, v)| (k, v)))
            .stdout(if settings.capture_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fanout");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    // Human logs end the line with it; JSON logs close a string after it.
                    let addr = addr.split('"').next().unwrap_or(addr);
                    let _ = tx.send(addr.trim().to_string());
                }
                eprintln!("[fanout] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        // On a busy NATS cluster start-up retries each step for up to 30 s.
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("fanout did not start (see its log above)");
            }
        };
        Fanout {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            settings: settings.clone(),
            stdout,
            stderr: log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A POST to `path` with the test write key as Basic auth.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.post_as(WRITE_KEY, path)
    }

    /// A POST to `path` with `Authorization: Basic` for `key`.
    pub fn post_as(&self, key: &str, path: &str) -> reqwest::RequestBuilder {
        client()
            .post(self.url(path))
            .header("authorization", basic(key))
    }

    /// A POST to `path` with the test write key as `Authorization: Bearer`.
    pub fn post_bearer(&self, path: &str) -> reqwest::RequestBuilder {
        client()
            .post(self.url(path))
            .header("authorization", format!("Bearer {WRITE_KEY}"))
    }

    /// A POST to `path` with `Content-Encoding: encoding` and the raw `body`.
    pub fn post_encoded(
        &self,
        path: &str,
        encoding: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        self.post(path)
            .header("content-encoding", encoding)
            .body(body)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config file this instance runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// `fanout --config <this config>` with this instance's extra environment, for
    /// subcommands run beside the server (add the subcommand's arguments).
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
        command
            .arg("--config")
            .arg(self.config_path())
            .envs(self.settings.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// Runs `fanout --config … args…` beside the server; returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut command = self.command();
        command.args(args);
        let shown = args.join(" ");
        let output = tokio::task::spawn_blocking(move || command.output().expect("run fanout cli"))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "fanout {shown}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// `fanout dead-letters list --destination DEST`, parsed.
    pub async fn dead_letters(&self, destination: &str) -> Vec<Value> {
        self.cli(&["dead-letters", "list", "--destination", destination])
            .await
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Polls the dead letters of `destination` until there are at least `n` (or `timeout`
    /// passes); returns the last list.
    pub async fn wait_dead_letters(
        &self,
        destination: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.dead_letters(destination).await;
            if rows.len() >= n || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
        child.wait().expect("wait")
    }

    /// Waits for a process that was already sent a signal to exit.
    pub fn terminate_wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        child.wait().expect("wait")
    }

    /// Starts fanout again on the same directory (same data, same output file).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let mut again = Fanout::launch(&self.dir, &self.settings);
        self.child = again.child.take();
        self.stdout = again.stdout.clone();
        self.stderr = again.stderr.clone();
        self.addr = again.addr;
    }

    /// Lines of the file destination so far, parsed.
    pub fn delivered(&self) -> Vec<Value> {
        file_lines(&self.dir.join("out.jsonl"))
    }

    /// What this run logged on standard error so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until this run printed at least `n` lines on standard output; returns them parsed.
    pub async fn wait_stdout(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.stdout.lock().unwrap().clone();
            if lines.len() >= n || Instant::now() > deadline {
                return lines
                    .iter()
                    .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the file destination holds at least `n` messages.
    pub async fn wait_delivered(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.delivered();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Posts `messages` as one `/v1/batch` and asserts the 200.
    pub async fn send_batch(&self, messages: Value) {
        assert_success(
            self.post("/v1/batch")
                .json(&serde_json::json!({ "batch": messages }))
                .send()
                .await
                .unwrap(),
        )
        .await;
    }

    /// `fanout_deliveries_total` of `destination` with `outcome` (0 when absent).
    pub async fn deliveries(&self, destination: &str, outcome: &str) -> f64 {
        self.metric(
            "fanout_deliveries_total",
            &[("destination", destination), ("outcome", outcome)],
        )
        .await
        .unwrap_or(0.0)
    }

    /// The value of one series of `/metrics`: `name` with exactly these `labels`
    /// (`[]` for none); `None` when it is not there.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let mut got: Vec<&str> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect();
            got.sort_unstable();
            let mut want: Vec<&str> = wanted.iter().map(String::as_str).collect();
            want.sort_unstable();
            (metric == name && got == want).then(|| value.parse().ok())?
        })
    }

    /// Polls `/metrics` until the series satisfies `done` (or 20 s pass: then panics).
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        done: impl Fn(f64) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.metric(name, labels).await;
            if value.is_some_and(&done) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} stayed at {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until destination `name` has settled everything accepted so far (its saved
    /// cursor is at the end of the queue): nothing more will arrive there.
    pub async fn wait_settled(&self, name: &str) {
        self.wait_metric("fanout_queue_lag_bytes", &[("destination", name)], |lag| {
            lag == 0.0
        })
        .await;
    }

    /// Sends raw bytes on a new connection and returns the status and body of the answer.
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(request).expect("send");
        read_response(&mut stream)
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads one HTTP/1.1 response (Content-Length framed) from the stream.
pub fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status line");
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).expect("read body");
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
            return (status, body);
        }
        let n = stream.read(&mut chunk).expect("read head");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The complete lines of a file destination's output so far, parsed; a line still being
/// written (no newline yet) is not delivered yet.
pub fn file_lines(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Waits until a file destination's output holds at least `n` lines (or 20 s pass).
pub async fn wait_file_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = file_lines(path);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// `Authorization: Basic base64(key:)`.
pub fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// `../shared` beside the repository (or `FANOUT_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("FANOUT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// Asserts a successful Segment answer.
pub async fn assert_success(response: reqwest::Response) {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, r#"{"success":true}"#)
    );
}

/// Asserts an error answer with `status` and error `code`; returns the parsed body.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let (got, body) = status_json(response).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    body
}

/// Runs `command` with `input` on its standard input: (exit code, stdout, stderr).
pub fn run_with_stdin(mut command: Command, input: Vec<u8>) -> (i32, String, String) {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run fanout");
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until the wall clock is in a new second and returns that second: messages
/// accepted before are stamped earlier (the local log keeps whole seconds).
pub async fn next_second() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    let next = chrono::DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap();
    tokio::time::sleep((next - now).to_std().unwrap() + Duration::from_millis(20)).await;
    next
}

/// `POST {path}` with the admin `token`: the status and the JSON answer.
pub async fn post_admin(f: &Fanout, token: &str, path: &str) -> (u16, Value) {
    let response = client()
        .post(f.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_json(response).await
}

/// `POST /admin/replay?{query}` with the admin `token`.
pub async fn post_replay(f: &Fanout, token: &str, query: &str) -> (u16, Value) {
    post_admin(f, token, &format!("/admin/replay?{query}")).await
}

/// `POST /admin/reload{query}` with the admin `token`.
pub async fn post_reload(f: &Fanout, token: &str, query: &str) -> (u16, Value) {
    post_admin(f, token, &format!("/admin/reload{query}")).await
}

/// Status and parsed JSON body.
pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

/// Posts `body` to `/event/batch` (Bearer auth), asserts a 200 and returns the report.
pub async fn event_batch(f: &Fanout, body: &Value) -> Value {
    let r = f
        .post_bearer("/event/batch")
        .json(body)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_json(r).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A real `redis-server` on a free loopback port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer { port, child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, with no persistence.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A path from the environment `scripts/test` sets up (a browser, npm packages); missing
/// is a failure, never a skip.
pub fn required_path(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with scripts/test (it installs Chromium and the npm packages)")
    });
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

/// Runs `python script` with `input` on its stdin and returns what it printed. The input
/// is written from a thread of its own: a script that answers as it reads would
/// otherwise block on a full pipe. Blocking: call it from `spawn_blocking`.
pub fn run_python(python: &Path, script: &Path, input: String) -> std::process::Output {
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} {}: {e}", python.display(), script.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    writer
        .join()
        .expect("writer")
        .unwrap_or_else(|e| panic!("write to {}: {e}", script.display()));
    output
}

/// The Python of a venv `scripts/test` creates: `$env_var`, else
/// `target/<venv>/bin/python`. Fails (never skips) when it is missing, saying `what` it
/// must hold and how to get it.
pub fn venv_python(env_var: &str, venv: &str, what: &str) -> std::path::PathBuf {
    let python = std::env::var_os(env_var)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join(venv)
                .join("bin/python")
        });
    assert!(
        python.exists(),
        "{what} not installed: {} is missing. Run `scripts/test` (it creates target/{venv}), \
         or set {env_var} to a python that has it",
        python.display()
    );
    python
}
