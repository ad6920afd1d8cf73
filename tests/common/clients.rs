//! The official Segment libraries, Python (segment-analytics-python) and Node
//! (@segment/analytics-node), driven against a running fanout by the scripts in
//! `../shared/clients`. `scripts/test` installs them into `target/segclients` (or
//! `FANOUT_CLIENTS_DIR`); without them the tests that use them fail, they never skip.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Fanout;

/// How long one client run may take before it is killed.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The installed clients, or a failure that says how to install them.
pub fn clients_dir() -> PathBuf {
    let dir = std::env::var_os("FANOUT_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/segclients"));
    for needed in ["venv/bin/python", "node_modules/@segment/analytics-node"] {
        assert!(
            dir.join(needed).exists(),
            "the Segment clients are not installed: {} is missing. Run `scripts/test` \
             (it installs them with ../shared/clients/setup.sh), or set FANOUT_CLIENTS_DIR",
            dir.join(needed).display()
        );
    }
    dir
}

/// What a finished client run printed.
pub struct Run {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` in the clients directory, killing it after `CLIENT_TIMEOUT`; fails
/// unless it exits with 0 and prints the `errors=0` summary line.
pub async fn run_client(program: PathBuf, args: Vec<String>) -> Run {
    let dir = clients_dir();
    let shown = format!("{} {}", program.display(), args.join(" "));
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
        let readers = [
            drain(child.stdout.take().expect("stdout")),
            drain(child.stderr.take().expect("stderr")),
        ];
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for client") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let [stdout, stderr] = readers.map(|r| r.join().expect("pipe reader"));
        let run = Run { stdout, stderr };
        let Some(status) = status else {
            panic!(
                "{shown}: still running after {CLIENT_TIMEOUT:?}, killed\nstdout:\n{}\nstderr:\n{}",
                run.stdout, run.stderr
            );
        };
        assert!(
            status.success(),
            "{shown}: {status}\nstdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stdout
                .lines()
                .any(|l| l.trim_end().ends_with("errors=0")),
            "{shown}: no `errors=0` line\nstdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        run
    })
    .await
    .expect("client task")
}

/// Reads a pipe to its end on a thread of its own.
pub fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs the Python driver (write key `wk_segment_python`) against `f` with `extra` args.
pub async fn run_python(f: &Fanout, extra: &[&str]) -> Run {
    let python = clients_dir().join("venv/bin/python");
    run_driver(python, "segment_python.py", "wk_segment_python", f, extra).await
}

/// Runs the Node driver (write key `wk_segment_node`) against `f` with `extra` args.
pub async fn run_node(f: &Fanout, extra: &[&str]) -> Run {
    run_driver(
        PathBuf::from("node"),
        "segment_node.mjs",
        "wk_segment_node",
        f,
        extra,
    )
    .await
}

/// Runs `program script --host <f> --write-key key extra...` with `run_client`.
async fn run_driver(
    program: PathBuf,
    script: &str,
    write_key: &str,
    f: &Fanout,
    extra: &[&str],
) -> Run {
    let mut args = vec![
        script.to_string(),
        "--host".to_string(),
        format!("http://{}", f.addr),
        "--write-key".to_string(),
        write_key.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_client(program, args).await
}
