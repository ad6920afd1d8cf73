//! Calls per second of an identity `onTrack` on a ~1 KB track through
//! `fanout::functions` (one function, calls one after another): the cost a destination
//! or insert function adds per message (issue 28's target: at most 20 µs). Then a source
//! function turning a ~1 KB webhook into one `Segment.track` per call. Then what
//! loading a function costs (once per config load or reload), without and with lodash:
//! `_` is run the first time a function reads it.
//!
//!     taskset -c 0 cargo bench --bench functions

use std::time::{Duration, Instant};

use fanout::functions::{
    Function, FunctionSandbox, HostPolicy, Options, Outcome, RawRequest, SourceFunction,
};

fn options() -> Options {
    Options {
        name: "identity.js".into(),
        timeout: Duration::from_secs(5),
        memory_limit: 64 * 1024 * 1024,
        hosts: HostPolicy::default(),
    }
}

fn main() -> anyhow::Result<()> {
    calls()?;
    source_calls()?;
    loads("an identity function", IDENTITY)?;
    loads("one that reads `_` (lodash)", "const get = _.get;\n")
}

const IDENTITY: &str = "function onTrack(event, settings) { return event; }";

fn calls() -> anyhow::Result<()> {
    let calls: u32 = 20_000;
    let function = Function::load(IDENTITY, options())?;
    let event = serde_json::json!({
        "type": "track", "userId": "user-1234567890", "event": "Order Completed",
        "messageId": "0d3c1f6e-6f0b-4c59-9d7a-4c0b8c1e2f3a",
        "timestamp": "2026-12-07T04:00:00.000Z",
        "properties": {"revenue": 42.5, "currency": "EUR", "note": "x".repeat(700)},
        "context": {"ip": "203.0.113.9", "library": {"name": "analytics.js", "version": "2"}},
    })
    .to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let started = Instant::now();
    for _ in 0..calls {
        let outcome =
            runtime.block_on(function.call("onTrack", vec![event.clone(), "{}".to_string()]));
        anyhow::ensure!(matches!(outcome, Outcome::Returned(_)), "{outcome:?}");
    }
    let elapsed = started.elapsed();
    println!(
        "{calls} calls of an identity onTrack on a {} B track: {:.0} calls/s ({:.1} µs each)",
        event.len(),
        f64::from(calls) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / f64::from(calls)
    );
    Ok(())
}

const WEBHOOK_TO_TRACK: &str = r#"
async function onRequest(request, settings) {
  const body = request.json();
  Segment.track({
    userId: body.data.object.customer,
    event: 'Charge Succeeded',
    messageId: body.id,
    timestamp: new Date(body.created * 1000).toISOString(),
    properties: { amount: body.data.object.amount / 100, currency: body.data.object.currency,
                  description: body.data.object.description },
  });
}
"#;

/// A Stripe-like webhook in, one track out: what a source function costs per request
/// before the emitted message is ingested.
fn source_calls() -> anyhow::Result<()> {
    let calls: u32 = 20_000;
    let dir = std::env::temp_dir().join(format!("fanout-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("stripe.js"), WEBHOOK_TO_TRACK)?;
    let sandbox = FunctionSandbox::file("stripe.js");
    let function =
        SourceFunction::load(&dir, &sandbox, serde_json::json!({})).map_err(anyhow::Error::msg)?;
    let body = serde_json::json!({
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "type": "charge.succeeded", "created": 1_765_000_000,
        "data": {"object": {"id": "ch_3NG8Du2eZvKYlo2C1", "amount": 4250, "currency": "eur",
                            "customer": "cus_9s6XKzkNRiz8i3", "description": "x".repeat(700)}},
    })
    .to_string();
    let request = RawRequest {
        method: "POST",
        url: "http://127.0.0.1:8088/v1/functions/key".into(),
        headers: [("content-type".to_string(), "application/json".to_string())].into(),
        body,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let started = Instant::now();
    for _ in 0..calls {
        let emitted = runtime
            .block_on(function.run(&request))
            .map_err(|f| anyhow::anyhow!("{f:?}"))?;
        anyhow::ensure!(emitted.messages.len() == 1);
    }
    let elapsed = started.elapsed();
    std::fs::remove_dir_all(&dir)?;
    println!(
        "{calls} calls of a source function, {} B webhook → one track: {:.0} calls/s ({:.1} µs each)",
        request.body.len(),
        f64::from(calls) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / f64::from(calls)
    );
    Ok(())
}

/// Loads per second of `source` (each a new runtime, its top level run, then dropped).
fn loads(what: &str, source: &str) -> anyhow::Result<()> {
    let loads: u32 = 100;
    let started = Instant::now();
    for _ in 0..loads {
        let function = Function::load(source, options())?;
        drop(function);
    }
    let elapsed = started.elapsed();
    println!(
        "{loads} loads of {what}: {:.2} ms each",
        elapsed.as_secs_f64() * 1e3 / f64::from(loads)
    );
    Ok(())
}
