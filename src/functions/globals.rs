//! Native hooks behind the prelude's `URL`, `Buffer` and `crypto`: parsing, encodings and
//! digests are done here with the crates fanout already trusts, not re-implemented in JS.

use base64::Engine as _;
use hmac::{Mac, SimpleHmac};
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{CatchResultExt, CaughtError, Ctx, Exception, Function, Value};
use sha2::{Digest, Sha256, Sha512};

/// lodash 4 (vendored by scripts/vendor-lodash), wrapped so that the names its UMD
/// header looks for are undefined: it then sets the global `_`, whatever a function
/// declared (a script's own `module` or `exports` would otherwise receive it).
const LODASH: &str = concat!(
    "(function (module, exports, define, global, self) {\n",
    include_str!("vendor/lodash.min.js"),
    "\n}).call(globalThis);"
);

pub(super) fn install(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let globals = ctx.globals();
    globals.set(
        "__lodash",
        Function::new(ctx.clone(), |ctx: Ctx<'_>| {
            let mut options = EvalOptions::default();
            options.global = true;
            options.strict = false;
            options.filename = Some("lodash.min.js".into());
            ctx.eval_with_options::<(), _>(LODASH, options)
        })?,
    )?;
    globals.set(
        "__url",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'_>, href: String, base: Option<String>| {
                parse_url(&href, base.as_deref())
                    .map(|parts| parts.to_string())
                    .map_err(|e| Exception::throw_type(&ctx, &e))
            },
        )?,
    )?;
    globals.set(
        "__decode",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'_>, text: String, encoding: String| {
                decode(&text, &encoding).map_err(|e| Exception::throw_type(&ctx, &e))
            },
        )?,
    )?;
    globals.set(
        "__encode",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'_>, bytes: Vec<u8>, encoding: String| {
                encode(&bytes, &encoding).map_err(|e| Exception::throw_type(&ctx, &e))
            },
        )?,
    )?;
    globals.set(
        "__digest",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'_>, algorithm: String, key: Option<Vec<u8>>, data: Vec<u8>| {
                digest(&algorithm, key.as_deref(), &data)
                    .map_err(|e| Exception::throw_message(&ctx, &e))
            },
        )?,
    )?;
    let start = Instant::now();
    globals.set(
        "__now",
        Function::new(ctx.clone(), move || start.elapsed().as_secs_f64() * 1000.0)?,
    )?;
    globals.set(
        "__uuid",
        Function::new(ctx.clone(), || uuid::Uuid::new_v4().to_string())?,
    )?;
    Ok(())
}

/// The WHATWG parts of `href` (resolved against `base`), as the JSON `URL` reads.
fn parse_url(href: &str, base: Option<&str>) -> Result<serde_json::Value, String> {
    let parsed = match base {
        Some(base) => url::Url::parse(base).and_then(|b| b.join(href)),
        None => url::Url::parse(href),
    }
    .map_err(|e| format!("Invalid URL: {href}: {e}"))?;
    let port = parsed.port().map(|p| p.to_string()).unwrap_or_default();
    let hostname = parsed.host_str().unwrap_or_default().to_string();
    let host = if port.is_empty() {
        hostname.clone()
    } else {
        format!("{hostname}:{port}")
    };
    let with_prefix = |prefix: &str, part: Option<&str>| match part {
        Some(p) if !p.is_empty() => format!("{prefix}{p}"),
        _ => String::new(),
    };
    Ok(serde_json::json!({
        "protocol": format!("{}:", parsed.scheme()),
        "username": parsed.username(),
        "password": parsed.password().unwrap_or_default(),
        "hostname": hostname,
        "port": port,
        "host": host,
        "pathname": parsed.path(),
        "search": with_prefix("?", parsed.query()),
        "hash": with_prefix("#", parsed.fragment()),
        "origin": parsed.origin().ascii_serialization(),
        // `href` up to the query, so the JS side can rebuild it when `searchParams` change.
        "beforeQuery": &parsed[..url::Position::AfterPath],
    }))
}

fn decode(text: &str, encoding: &str) -> Result<Vec<u8>, String> {
    match encoding {
        "utf8" | "utf-8" => Ok(text.as_bytes().to_vec()),
        "base64" => {
            let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(compact.trim_end_matches('='))
                .map_err(|_| "Buffer.from: not base64".to_string())
        }
        "hex" => {
            if !text.len().is_multiple_of(2) || !text.is_ascii() {
                return Err("Buffer.from: not hex".into());
            }
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
                .collect::<Result<_, _>>()
                .map_err(|_| "Buffer.from: not hex".to_string())
        }
        "latin1" | "binary" => Ok(text.chars().map(|c| c as u32 as u8).collect()),
        other => Err(format!("unknown encoding: {other}")),
    }
}

fn encode(bytes: &[u8], encoding: &str) -> Result<String, String> {
    match encoding {
        "utf8" | "utf-8" => Ok(String::from_utf8_lossy(bytes).into_owned()),
        "base64" => Ok(base64::engine::general_purpose::STANDARD.encode(bytes)),
        "hex" => Ok(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        "latin1" | "binary" => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        other => Err(format!("unknown encoding: {other}")),
    }
}

/// A digest of `data` (md5, sha1, sha256 or sha512), or its HMAC when `key` is given.
fn digest(algorithm: &str, key: Option<&[u8]>, data: &[u8]) -> Result<Vec<u8>, String> {
    match algorithm.to_ascii_lowercase().as_str() {
        "md5" => digest_with::<md5::Md5>(key, data),
        "sha1" => digest_with::<sha1::Sha1>(key, data),
        "sha256" => digest_with::<Sha256>(key, data),
        "sha512" => digest_with::<Sha512>(key, data),
        other => Err(format!(
            "crypto: digest algorithm '{other}' is not supported (md5, sha1, sha256 and sha512 are)"
        )),
    }
}

fn digest_with<D>(key: Option<&[u8]>, data: &[u8]) -> Result<Vec<u8>, String>
where
    D: Digest + hmac::digest::core_api::BlockSizeUser + Clone,
{
    match key {
        None => Ok(D::digest(data).to_vec()),
        Some(key) => {
            let mut mac = <SimpleHmac<D> as Mac>::new_from_slice(key)
                .map_err(|_| "crypto: bad HMAC key".to_string())?;
            mac.update(data);
            Ok(mac.finalize().into_bytes().to_vec())
        }
    }
}

/// Settles what a handler returned. While its promise is pending, the `setTimeout` timers
/// run in due order, each after its delay, as long as it falls within the time limit
/// (`left`); one due past it ends the call as over the limit (`overran`), without the
/// wait. Timers still queued when the call ends are dropped.
pub(super) fn settle<'js>(
    ctx: &Ctx<'js>,
    returned: Value<'js>,
    left: impl Fn() -> Duration,
    overran: impl Fn(),
) -> Result<Value<'js>, CaughtError<'js>> {
    let settled = match returned.as_promise() {
        None => Ok(returned),
        Some(promise) => loop {
            match promise.finish::<Value>().catch(ctx) {
                Err(CaughtError::Error(rquickjs::Error::WouldBlock)) => {}
                other => break other,
            }
            let next: f64 = timer_hook(ctx, "__nextTimer")?.call(()).catch(ctx)?;
            let wait = Duration::from_secs_f64(next.max(0.0) / 1000.0);
            if next < 0.0 {
                break Err(CaughtError::Error(rquickjs::Error::WouldBlock));
            }
            if wait > left() {
                overran();
                break Err(CaughtError::Error(rquickjs::Error::WouldBlock));
            }
            std::thread::sleep(wait);
            timer_hook(ctx, "__fireTimer")?
                .call::<_, ()>(())
                .catch(ctx)?;
        },
    };
    let dropped = timer_hook(ctx, "__dropTimers").and_then(|f| f.call::<_, ()>(()).catch(ctx));
    let value = settled?;
    dropped.map(|()| value)
}

fn timer_hook<'js>(ctx: &Ctx<'js>, name: &str) -> Result<Function<'js>, CaughtError<'js>> {
    ctx.globals().get(name).catch(ctx)
}

#[cfg(test)]
#[path = "globals_tests.rs"]
mod tests;
