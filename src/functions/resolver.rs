//! The DNS resolver of a function's `fetch` client. It resolves each name once and refuses
//! one with any loopback, private, link-local or shared address unless the host is listed
//! (`allow_hosts`, or a `fetch_hosts` target), and hands reqwest exactly the addresses it
//! checked: no second lookup that a rebinding DNS server could answer differently.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::hosts::{is_public, HostPolicy, PrivateAddress};

/// Resolves with the system's resolver, then checks what it found.
struct GuardedResolver {
    /// Lowercase hosts that may resolve anywhere.
    listed: Vec<String>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let listed = self.listed.contains(&host);
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !listed && found.iter().any(|a| !is_public(&a.ip())) {
                return Err(Box::new(PrivateAddress { host }) as _);
            }
            Ok(Box::new(found.into_iter()) as Addrs)
        })
    }
}

/// The `fetch` client of a function with `policy`: redirects not followed, names resolved
/// by the guarded resolver.
pub fn client(policy: &HostPolicy) -> reqwest::Result<reqwest::Client> {
    let targets = policy
        .remap
        .values()
        .filter_map(|base| reqwest::Url::parse(base).ok())
        .filter_map(|url| url.host_str().map(str::to_string));
    let listed = policy
        .allow
        .iter()
        .cloned()
        .chain(targets)
        .map(|h| h.to_ascii_lowercase())
        .collect();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fanout/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver { listed }))
        .build()
}

/// The refusal inside a reqwest error, if the resolver refused the name.
pub fn refusal(error: &reqwest::Error) -> Option<&PrivateAddress> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<PrivateAddress>() {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1 answering each connection with `200 ok` once.
    async fn loopback_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        port
    }

    fn policy(allow: &[&str]) -> HostPolicy {
        HostPolicy {
            allow: allow.iter().map(|h| h.to_string()).collect(),
            remap: Default::default(),
        }
    }

    // The client itself refuses: whatever checked the URL before, the address connected
    // to is the one this resolver checked.
    #[tokio::test]
    async fn the_client_refuses_a_name_resolving_to_loopback_unless_it_is_listed() {
        let port = loopback_server().await;
        let url = format!("http://localhost:{port}/");
        let error = client(&policy(&[]))
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap_err();
        let refused = refusal(&error).expect("refused by the resolver");
        assert_eq!(refused.host, "localhost");

        let answer = client(&policy(&["LocalHost"]))
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }

    #[tokio::test]
    async fn a_fetch_hosts_target_name_is_not_refused() {
        let port = loopback_server().await;
        let mut remapped = policy(&[]);
        remapped
            .remap
            .insert("api.example.com".into(), format!("http://localhost:{port}"));
        let answer = client(&remapped)
            .unwrap()
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }

    #[tokio::test]
    async fn a_function_s_fetch_to_localhost_is_refused_unless_listed() {
        let port = loopback_server().await;
        let script = format!(
            "async function onTrack() {{ return (await fetch('http://localhost:{port}/')).status; }}"
        );
        let call = |allow: &[&str]| {
            let function = crate::functions::Function::load(
                &script,
                crate::functions::Options {
                    name: "f.js".into(),
                    timeout: crate::functions::DEFAULT_TIMEOUT,
                    memory_limit: crate::functions::DEFAULT_MEMORY_LIMIT,
                    hosts: policy(allow),
                },
            )
            .unwrap();
            async move {
                function
                    .call("onTrack", vec!["{}".into(), "{}".into()])
                    .await
            }
        };
        match call(&[]).await {
            crate::functions::Outcome::Failed(failure) => {
                // Refused, not a network error: a retry would be refused again.
                assert_eq!(failure.kind, crate::functions::FailureKind::Error);
                assert!(failure.message.contains("loopback or private"), "{failure}");
            }
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(
            call(&["localhost"]).await,
            crate::functions::Outcome::Returned(serde_json::json!(200))
        );
    }
}
