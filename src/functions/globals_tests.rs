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

/// A receiver on loopback answering each request with what it got, as JSON
/// `{method, path, x_token, x_other, body}`; its base URL. Ends with the test process.
fn echo_receiver() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_string());
            }
            let header = |name: &str| {
                head.iter().skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut first = head[0].split(' ');
            let answer = json!({
                "method": first.next(), "path": first.next(),
                "x_token": header("x-token"), "x_other": header("x-other"),
                "body": String::from_utf8_lossy(&body),
            })
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    base
}

fn remapped_to(base: &str) -> Options {
    Options {
        hosts: HostPolicy {
            allow: vec!["api.example.com".into()],
            remap: [("api.example.com".to_string(), base.to_string())].into(),
        },
        ..options()
    }
}

#[test]
fn a_request_holds_url_method_headers_and_body() {
    let outcome = run(
        "async function onTrack(e) {\n\
           const r = new Request('https://api.example.com/v1/items?x=1',\n\
             { method: 'post', headers: { 'X-Token': 't' }, body: JSON.stringify({ a: 1 }) });\n\
           const copy = new Request(r, { method: 'PATCH' });\n\
           const errors = [];\n\
           try { new Request('/relative'); } catch (err) { errors.push(err.name); }\n\
           try { new Request('https://x.example.com/', { body: 'b' }); } catch (err) { errors.push(err.name); }\n\
           return { url: r.url, method: r.method, token: r.headers.get('x-token'),\n\
             isHeaders: r.headers instanceof Headers, text: await r.text(), json: await r.json(),\n\
             copy: [copy.url, copy.method, copy.headers.get('x-token'), await copy.text()],\n\
             bare: [new Request(new URL('https://x.example.com')).url, new Request('https://x.example.com').method],\n\
             errors };\n\
         }",
        "onTrack",
        json!({}),
    );
    assert_eq!(
        outcome,
        Outcome::Returned(json!({
            "url": "https://api.example.com/v1/items?x=1",
            "method": "POST",
            "token": "t",
            "isHeaders": true,
            "text": "{\"a\":1}",
            "json": {"a": 1},
            "copy": ["https://api.example.com/v1/items?x=1", "PATCH", "t", "{\"a\":1}"],
            "bare": ["https://x.example.com/", "GET"],
            "errors": ["TypeError", "TypeError"],
        }))
    );
}

#[test]
fn fetch_takes_a_request_and_init_over_it_under_the_host_policy() {
    let base = echo_receiver();
    let function = Function::load(
        "async function onTrack(e) {\n\
           const r = new Request('https://api.example.com/v1/items?x=1',\n\
             { method: 'POST', headers: { 'X-Token': 't' }, body: 'hello' });\n\
           const first = await fetch(r);\n\
           const second = await fetch(r, { method: 'PUT', headers: { 'X-Other': 'o' } });\n\
           const refused = [];\n\
           for (const url of ['https://other.example.com/', 'http://127.0.0.1:9/']) {\n\
             try { await fetch(new Request(url)); } catch (err) { refused.push(err.message); }\n\
           }\n\
           return { first: await first.json(), url: first.url, second: await second.json(), refused };\n\
         }",
        remapped_to(&base),
    )
    .expect("loads");
    let returned = match call(&function, "onTrack", json!({})) {
        Outcome::Returned(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        returned["first"],
        json!({"method": "POST", "path": "/v1/items?x=1", "x_token": "t", "x_other": null,
               "body": "hello"})
    );
    assert_eq!(returned["url"], "https://api.example.com/v1/items?x=1");
    assert_eq!(
        returned["second"],
        json!({"method": "PUT", "path": "/v1/items?x=1", "x_token": null, "x_other": "o",
               "body": "hello"})
    );
    let refused = returned["refused"].as_array().unwrap();
    assert!(
        refused[0].as_str().unwrap().contains("not in allow_hosts"),
        "{refused:?}"
    );
    assert!(
        refused[1].as_str().unwrap().contains("not in allow_hosts"),
        "{refused:?}"
    );
}

#[test]
fn a_request_to_loopback_is_refused_unless_listed() {
    let outcome = run(
        "async function onTrack(e) {\n\
           try { await fetch(new Request('http://127.0.0.1:9/x', { method: 'DELETE' })); }\n\
           catch (err) { return err.message; }\n\
         }",
        "onTrack",
        json!({}),
    );
    let Outcome::Returned(message) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        message.as_str().unwrap().contains("loopback or private"),
        "{message}"
    );
}

#[test]
fn fetched_lists_what_fetch_did_with_the_remapped_url() {
    let base = echo_receiver();
    let function = Function::load(
        "async function onTrack(e) {\n\
           await fetch('https://api.example.com/a?b=1', { method: 'post', body: 'x' });\n\
           try { await fetch('https://other.example.com/'); } catch (err) {}\n\
         }",
        remapped_to(&base),
    )
    .expect("loads");
    assert_eq!(
        call(&function, "onTrack", json!({})),
        Outcome::Returned(json!(null))
    );
    let Outcome::Returned(fetched) = call(&function, "__fetched", json!({})) else {
        panic!("__fetched failed")
    };
    assert_eq!(fetched[0]["method"], "POST");
    assert_eq!(fetched[0]["url"], "https://api.example.com/a?b=1");
    assert_eq!(fetched[0]["sent_to"], format!("{base}/a?b=1"));
    assert_eq!(fetched[0]["status"], 200);
    assert_eq!(fetched[1]["url"], "https://other.example.com/");
    assert!(fetched[1].get("sent_to").is_none(), "{fetched}");
    assert!(
        fetched[1]["refused"]
            .as_str()
            .unwrap()
            .contains("not in allow_hosts"),
        "{fetched}"
    );
    // Taken: a second ask finds none.
    assert_eq!(
        call(&function, "__fetched", json!({})),
        Outcome::Returned(json!([]))
    );
}

#[test]
fn a_lodash_that_cannot_load_fails_the_read_and_is_tried_again_later() {
    // 1 MiB holds the prelude and this script, not lodash.
    let tight = Options {
        memory_limit: 1024 * 1024,
        ..options()
    };
    let function = Function::load(
        "function onTrack(e) {\n\
           try { return _.VERSION; } catch (err) {\n\
             return ['threw', typeof Object.getOwnPropertyDescriptor(globalThis, '_').get];\n\
           }\n\
         }",
        tight,
    )
    .expect("loads");
    let outcome = call(&function, "onTrack", json!({}));
    assert_eq!(outcome, Outcome::Returned(json!(["threw", "function"])));
}
