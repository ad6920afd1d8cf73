//! Vendor request validators for the destination presets: `tests/vendors/<vendor>.py`,
//! run with the venv `scripts/test` creates from `tests/vendors/requirements.txt` (the
//! vendors' official SDKs; `FANOUT_VENDORS_PYTHON`, default
//! `target/vendors-venv/bin/python`). Each reads the requests as JSON lines and fails,
//! with the reason, on one the vendor would not take.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::receiver::ReceivedRequest;

/// The Python of the vendors' venv; fails (never skips) when it is missing.
pub fn python() -> PathBuf {
    super::venv_python(
        "FANOUT_VENDORS_PYTHON",
        "vendors-venv",
        "the vendors' SDKs (tests/vendors/requirements.txt) are",
    )
}

/// A request as the validators read it.
pub fn line(request: &ReceivedRequest) -> Value {
    let headers: serde_json::Map<String, Value> = request
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.to_string(), Value::String(value))
        })
        .collect();
    json!({
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": headers,
        "body": request.json(),
    })
}

/// Runs `tests/vendors/<vendor>.py` over `requests`; panics with its reason when it
/// refuses one.
pub async fn validate(vendor: &str, requests: &[ReceivedRequest]) {
    assert!(!requests.is_empty(), "no {vendor} request to validate");
    let input: String = requests.iter().map(|r| format!("{}\n", line(r))).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/vendors/{vendor}.py"));
    let python = python();
    let output = tokio::task::spawn_blocking(move || super::run_python(&python, &script, input))
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{vendor} would refuse a request: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        requests
            .iter()
            .map(|r| line(r).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
