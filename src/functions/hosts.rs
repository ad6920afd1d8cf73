//! Which hosts a function's `fetch` may reach (`allow_hosts`), where some of them really
//! go (`fetch_hosts`), and what counts as a public address: the policy that both the
//! request (`fetch.rs`) and the client's resolver (`resolver.rs`) apply.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Where `fetch` may go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPolicy {
    /// Hosts `fetch` may reach; empty: any host whose addresses are all public.
    pub allow: Vec<String>,
    /// Host → base URL its requests are sent to instead (the script still sees its own
    /// URL): staging, an egress proxy, tests.
    pub remap: BTreeMap<String, String>,
}

impl HostPolicy {
    /// The URL to request for `url`, or why it is refused. A remapped host is the
    /// operator's choice, so its target is not checked; any other host must be listed
    /// (when a list is set) and, unless listed, be a public address. A name's addresses
    /// are checked by the client's resolver (`resolver.rs`), where it connects.
    pub(super) async fn target(&self, url: &reqwest::Url) -> Result<reqwest::Url, String> {
        let host = url
            .host_str()
            .ok_or_else(|| "fetch: the URL has no host".to_string())?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("fetch: scheme `{}` is not allowed", url.scheme()));
        }
        if let Some(base) = self.remap.get(&host) {
            let base = reqwest::Url::parse(base)
                .map_err(|e| format!("fetch_hosts: `{host}` maps to a bad URL: {e}"))?;
            let mut target = base.clone();
            let path = format!("{}{}", base.path().trim_end_matches('/'), url.path());
            target.set_path(&path);
            target.set_query(url.query());
            return Ok(target);
        }
        let listed = self.allow.iter().any(|h| h.eq_ignore_ascii_case(&host));
        if !self.allow.is_empty() && !listed {
            return Err(format!("fetch: host `{host}` is not in allow_hosts"));
        }
        // An address in the URL is never resolved: checked here.
        if let (false, Ok(ip)) = (listed, host.parse::<IpAddr>()) {
            if !is_public(&ip) {
                return Err(PrivateAddress { host }.to_string());
            }
        }
        Ok(url.clone())
    }
}

/// Whether `ip` is reachable on the public internet (not loopback, private, link-local,
/// shared or unspecified).
pub fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(&IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// A name refused for resolving to a non-public address; `fetch` reports it as refused
/// (not worth a retry), never as a network error.
#[derive(Debug)]
pub struct PrivateAddress {
    pub host: String,
}

impl std::fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fetch: host `{}` is a loopback or private address; list it in allow_hosts to \
             allow it",
            self.host
        )
    }
}

impl std::error::Error for PrivateAddress {}
