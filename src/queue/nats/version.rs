//! The oldest nats-server fanout works with. Its consumers pull in a priority group
//! (`pinned_client`), which servers before 2.11 do not know: they answer the consumer
//! requests with errors the client cannot even parse ("untagged enum Response"), so an
//! older server is refused at connect with its version named.

/// Priority groups arrived in nats-server 2.11.
const LEAST: (u64, u64) = (2, 11);

/// `major.minor` of a server's version string ("2.11.4", "2.12.0-RC.2", "v2.10.7").
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Refuses a server older than 2.11. A version that cannot be read is let through (the
/// JetStream requests then say what is wrong).
pub(super) fn check(version: &str) -> anyhow::Result<()> {
    match major_minor(version) {
        Some((major, minor)) if (major, minor) < LEAST => anyhow::bail!(
            "nats-server {major}.{minor} found, fanout needs ≥ {}.{} (priority groups); \
             upgrade the servers in queue.servers",
            LEAST.0,
            LEAST.1
        ),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(
                version,
                "cannot read the NATS server's version; fanout needs ≥ 2.11"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_as_major_and_minor() {
        assert_eq!(major_minor("2.11.4"), Some((2, 11)));
        assert_eq!(major_minor("2.12.0-RC.2"), Some((2, 12)));
        assert_eq!(major_minor("v2.10.7"), Some((2, 10)));
        assert_eq!(major_minor("2.9"), Some((2, 9)));
        assert_eq!(major_minor("3.0.0"), Some((3, 0)));
        assert_eq!(major_minor(""), None);
        assert_eq!(major_minor("dev"), None);
    }

    #[test]
    fn servers_older_than_2_11_are_refused_with_their_version() {
        let error = check("2.9.25").unwrap_err().to_string();
        assert!(
            error.starts_with("nats-server 2.9 found, fanout needs ≥ 2.11 (priority groups)"),
            "{error}"
        );
        assert!(check("2.10.29").is_err());
        // Minor versions compare as numbers, not text.
        assert!(check("2.11.0").is_ok());
        assert!(check("2.12.1").is_ok());
        assert!(check("10.0.0").is_ok());
        assert!(check("unknown").is_ok());
    }
}
