//! Real NATS JetStream servers for the shared-log tests: one node, or a three-node
//! cluster, on free loopback ports with temporary store directories, `sync_interval:
//! always` (what docs/several-instances.md recommends). The binary comes from `FANOUT_NATS_SERVER`
//! (set by `scripts/test`, which installs it) or `PATH`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The nats-server binary. Missing is a failure, never a skip: `scripts/test` installs it.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(path) = std::env::var("FANOUT_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    found.expect(
        "nats-server not found: run the tests with scripts/test (it installs it), or set \
         FANOUT_NATS_SERVER",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One nats-server process (restartable on the same ports and store).
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    config: PathBuf,
    /// Its JetStream store directory.
    store: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.config.with_extension("log")).expect("log file");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    /// SIGKILL: the node is gone without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the node stops answering; what clients send waits in its socket.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`: it reads and handles what was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts it again on the same ports and store directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn();
    }

    /// Deletes its JetStream store (it must be stopped): every stream and consumer on it
    /// is gone when it starts again.
    pub fn wipe_store(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        std::fs::remove_dir_all(&self.store).expect("wipe the store");
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The monitoring endpoint's JSON at `path`, if it answers.
    pub fn monitor(&self, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.http_port);
        let output = Command::new("curl")
            .args(["-sf", "--max-time", "2", &url])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).ok())
            .flatten()
    }

    fn healthy(&self) -> bool {
        self.monitor("/healthz?js-enabled-only=true").is_some()
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One or three nodes, with JetStream, in a directory that goes with them.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// A single node.
    pub fn single() -> NatsCluster {
        NatsCluster::start(1)
    }

    /// `size` nodes in one cluster (routes to each other), each with JetStream.
    pub fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..size {
            let name = format!("n{i}");
            let (port, http_port) = (free_port(), free_port());
            let store = dir.path().join(&name);
            let cluster = if size > 1 {
                let routes: Vec<String> = cluster_ports
                    .iter()
                    .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect();
                format!(
                    "cluster {{\n  name: fanout_test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    cluster_ports[i],
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = dir.path().join(format!("{name}.conf"));
            // A fixed store limit: by default the server takes 75 % of the free disk, and
            // the tests' streams (10 GiB each, the default budget) running in parallel
            // would be refused on a fuller disk.
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
                     jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n  max_file_store: 1TB\n}}\n{cluster}",
                    store.display()
                ),
            )
            .expect("write nats config");
            let mut node = NatsNode {
                name,
                port,
                http_port,
                config,
                store,
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_ready();
        cluster
    }

    /// Every running node answers its health check with JetStream on, and (clustered)
    /// the cluster has a meta leader.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running: Vec<&NatsNode> = self.nodes.iter().filter(|n| n.running()).collect();
            let healthy = running.iter().all(|n| n.healthy());
            let led = self.nodes.len() == 1
                || running.iter().any(|n| {
                    n.monitor("/jsz")
                        .and_then(|j| j["meta_cluster"]["leader"].as_str().map(str::to_string))
                        .is_some_and(|l| !l.is_empty())
                });
            if healthy && led {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "NATS did not become ready (logs beside {})",
                self.nodes[0].config.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `servers = [...]` for fanout's `[queue]`.
    pub fn servers_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// A `[queue]` section for this cluster, with extra lines.
    pub fn queue_section(&self, extra: &str) -> String {
        format!(
            "[queue]\nbackend = \"nats\"\nservers = {}\n{extra}\n",
            self.servers_toml()
        )
    }

    /// The node leading `stream`'s Raft group, if the cluster knows one.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.running()) {
            let jsz = node.monitor("/jsz?streams=true")?;
            for account in jsz["account_details"].as_array().into_iter().flatten() {
                for detail in account["stream_detail"].as_array().into_iter().flatten() {
                    if detail["name"] == stream {
                        let leader = detail["cluster"]["leader"].as_str()?;
                        return self.nodes.iter().position(|n| n.name == leader);
                    }
                }
            }
        }
        None
    }

    /// Where node `i` logs.
    pub fn log_of(&self, i: usize) -> PathBuf {
        self.nodes[i].config.with_extension("log")
    }
}
