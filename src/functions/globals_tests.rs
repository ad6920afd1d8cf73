//! The globals of globals.rs and prelude.js that functions call: digests, lodash, `Request`.

use std::time::Duration;

use serde_json::json;

use super::super::{Function, HostPolicy, Options, Outcome};

fn options() -> Options {
    Options {
        name: "functions/test.js".into(),
        timeout: Duration::from_secs(2),
        memory_limit: 16 * 1024 * 1024,
        hosts: HostPolicy::default(),
    }
}

fn run(source: &str, handler: &'static str, event: serde_json::Value) -> Outcome {
    let function = Function::load(source, options()).expect("loads");
    call(&function, handler, event)
}

fn call(function: &Function, handler: &'static str, event: serde_json::Value) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(function.call(handler, vec![event.to_string(), "{}".into()]))
}

#[test]
fn md5_and_sha1_hash_and_hmac_with_known_digests() {
    let outcome = run(
        "function onTrack(e) {\n\
           const fox = 'The quick brown fox jumps over the lazy dog';\n\
           return {\n\
             md5: crypto.createHash('md5').update('abc').digest('hex'),\n\
             md5b64: crypto.createHash('MD5').update('ab').update('c').digest('base64'),\n\
             sha1: crypto.createHash('sha1').update('abc').digest('hex'),\n\
             sha1b64: crypto.createHash('sha1').update('abc').digest('base64'),\n\
             sha1empty: crypto.createHash('sha1').digest('hex'),\n\
             hmacMd5: crypto.createHmac('md5', 'key').update(fox).digest('hex'),\n\
             hmacSha1: crypto.createHmac('sha1', 'key').update(fox).digest('base64'),\n\
             // Bytes in and out through Buffer: a key and data that are not UTF-8 text.\n\
             md5bytes: crypto.createHash('md5').update(Buffer.from('ff0010', 'hex')).digest().toString('hex'),\n\
             hmacBuffers: crypto.createHmac('md5', Buffer.from('0b'.repeat(20), 'hex'))\n\
               .update(Buffer.from('Hi There')).digest().toString('hex'),\n\
             fromBase64: crypto.createHash('sha1').update('YWJj', 'base64').digest('hex'),\n\
             isBuffer: Buffer.isBuffer(crypto.createHash('sha1').update('abc').digest()),\n\
           };\n\
         }",
        "onTrack",
        json!({}),
    );
    assert_eq!(
        outcome,
        Outcome::Returned(json!({
            "md5": "900150983cd24fb0d6963f7d28e17f72",
            "md5b64": "kAFQmDzST7DWlj99KOF/cg==",
            "sha1": "a9993e364706816aba3e25717850c26c9cd0d89d",
            "sha1b64": "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=",
            "sha1empty": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "hmacMd5": "80070713463e7749b90c2dc24911e275",
            "hmacSha1": "3nybhbi3iqa8ino29wqQcBydtNk=",
            "md5bytes": "6592dc931c730cb991389fe591ce9af6",
            "hmacBuffers": "5ccec34ea9656392457fa1ac27f08fbc",
            "fromBase64": "a9993e364706816aba3e25717850c26c9cd0d89d",
            "isBuffer": true,
        }))
    );
}

#[test]
fn an_unknown_digest_algorithm_throws_naming_the_supported_ones() {
    let outcome = run(
        "function onTrack(e) {\n\
           try { crypto.createHash('whirlpool'); } catch (err) { return err.message; }\n\
         }",
        "onTrack",
        json!({}),
    );
    assert_eq!(
        outcome,
        Outcome::Returned(json!(
            "crypto: digest algorithm 'whirlpool' is not supported (md5, sha1, sha256 and sha512 are)"
        ))
    );
}

/// The pin `NAME=value` in scripts/vendor-lodash.
fn pin(name: &str) -> &'static str {
    include_str!("../../scripts/vendor-lodash")
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("scripts/vendor-lodash pins no {name}"))
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_vendored_lodash_is_what_the_script_pinned() {
    assert_eq!(
        sha256_hex(include_str!("vendor/lodash.min.js")),
        pin("LODASH_MIN_SHA256"),
        "src/functions/vendor/lodash.min.js differs from what scripts/vendor-lodash brings in"
    );
    assert_eq!(
        sha256_hex(include_str!("vendor/LICENSE-lodash")),
        pin("LICENSE_SHA256")
    );
    assert!(include_str!("vendor/lodash.min.js").contains(&format!("\"{}\"", pin("VERSION"))));
}

#[test]
fn lodash_is_the_global_underscore_in_destination_functions() {
    let outcome = run(
        "function onTrack(event) {\n\
           return {\n\
             version: _.VERSION,\n\
             plan: _.get(event, 'properties.plan.name'),\n\
             missing: _.get(event, 'properties.nope.x', 'default'),\n\
             picked: _.pick(event, ['userId', 'event']),\n\
             chunks: _.chunk(event.properties.items, 2),\n\
             empty: [_.isEmpty({}), _.isEmpty([]), _.isEmpty(event.properties), _.isEmpty(null)],\n\
           };\n\
         }",
        "onTrack",
        json!({"type": "track", "userId": "u1", "event": "Order",
               "properties": {"plan": {"name": "pro"}, "items": [1, 2, 3, 4, 5]}}),
    );
    assert_eq!(
        outcome,
        Outcome::Returned(json!({
            "version": "4.17.21",
            "plan": "pro",
            "missing": "default",
            "picked": {"userId": "u1", "event": "Order"},
            "chunks": [[1, 2], [3, 4], [5]],
            "empty": [true, true, false, true],
        }))
    );
}

#[test]
fn lodash_is_there_at_the_top_level_and_in_source_functions() {
    let function = Function::load(
        "const getPath = _.get;\n\
         function onRequest(request) {\n\
           const body = request.json();\n\
           Segment.track({ userId: getPath(body, 'user.id'), event: 'Paid',\n\
             properties: _.pick(body, ['amount']) });\n\
         }",
        options(),
    )
    .expect("loads");
    let raw = json!({"method": "POST", "url": "http://localhost/", "headers": {},
                     "body": json!({"user": {"id": "u7"}, "amount": 5, "card": "x"}).to_string()});
    let emitted = match call(&function, "__sourceRequest", raw) {
        Outcome::Returned(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        emitted["messages"],
        json!([{"type": "track", "userId": "u7", "event": "Paid", "properties": {"amount": 5}}])
    );
}

#[test]
fn a_script_may_declare_its_own_underscore() {
    for script in [
        "var _ = { get: function () { return 'mine'; } };",
        "let _ = { get: function () { return 'mine'; } };",
        "_ = { get: function () { return 'mine'; } };",
        "function _() {} _.get = function () { return 'mine'; };",
    ] {
        let source = format!("{script}\nfunction onTrack(e) {{ return _.get(e, 'x'); }}");
        assert_eq!(
            run(&source, "onTrack", json!({"x": 1})),
            Outcome::Returned(json!("mine")),
            "{script}"
        );
    }
    // A script's own `module` and `exports` do not take lodash away from `_`.
    assert_eq!(
        run(
            "var module = { exports: {} }; var exports = module.exports;\n\
             function onTrack(e) { return [typeof _.get, typeof module.exports.get]; }",
            "onTrack",
            json!({}),
        ),
        Outcome::Returned(json!(["function", "undefined"]))
    );
}
