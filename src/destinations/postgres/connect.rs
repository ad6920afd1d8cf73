//! The connection pool: the URL from `url_env`, TLS through rustls unless
//! `sslmode=disable`.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long opening one connection (TCP, TLS, authentication) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of up to `size` connections to `url` (a `postgres://` URL or key=value string),
/// on which a statement, or waiting for a connection, takes at most `timeout`. The error
/// never quotes the URL: it holds the password.
pub fn pool(url: &str, size: usize, timeout: Duration) -> anyhow::Result<Pool> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::anyhow!("not a Postgres URL: {e}"))?;
    if config.get_dbname().is_none() {
        anyhow::bail!("the Postgres URL names no database");
    }
    config.connect_timeout(CONNECT_TIMEOUT);
    // A server that stops answering mid-load fails the batch (retried) rather than
    // holding it forever.
    config.tcp_user_timeout(timeout);
    let statement_timeout = format!("-c statement_timeout={}", timeout.as_millis());
    let options = match config.get_options() {
        Some(given) => format!("{given} {statement_timeout}"),
        None => statement_timeout,
    };
    config.options(&options);
    config.application_name("fanout");
    let manager = Manager::from_config(
        config,
        MakeRustlsConnect::new(tls_config()?),
        ManagerConfig {
            // A connection that broke is found out by the next statement's error, which
            // is retried; checking each one before use would cost a round trip a batch.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()?)
}

/// The server's certificate is checked against the system's roots (as reqwest does);
/// only used when the URL asks for TLS (`sslmode=require`, or `prefer`, the default,
/// when the server offers it).
fn tls_config() -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot read is skipped, as reqwest does.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
