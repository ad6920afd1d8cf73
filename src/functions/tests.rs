use std::time::Duration;

use serde_json::json;

use super::*;

fn options() -> Options {
    Options {
        name: "functions/test.js".into(),
        timeout: Duration::from_millis(500),
        memory_limit: 16 * 1024 * 1024,
        hosts: HostPolicy::default(),
    }
}

fn load(source: &str) -> Function {
    Function::load(source, options()).expect("loads")
}

fn call(function: &Function, handler: &'static str, event: serde_json::Value) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(function.call(
        handler,
        vec![event.to_string(), json!({"k": "v"}).to_string()],
    ))
}

fn failure(outcome: Outcome) -> Failure {
    match outcome {
        Outcome::Failed(f) => f,
        Outcome::Returned(v) => panic!("returned {v}"),
    }
}

#[test]
fn a_sloppy_script_keeps_module_state_between_calls() {
    let f = load(
        "count = 0;\n\
         async function onTrack(event, settings) { count += 1; \
           return { n: count, event: event.event, k: settings.k }; }",
    );
    assert!(f.has("onTrack"));
    assert!(!f.has("onIdentify"));
    call(&f, "onTrack", json!({"event": "A"}));
    assert_eq!(
        call(&f, "onTrack", json!({"event": "B"})),
        Outcome::Returned(json!({"n": 2, "event": "B", "k": "v"}))
    );
}

#[test]
fn thrown_errors_are_classed_by_name() {
    let f = load(
        "function onTrack(e) { throw new RetryError('later'); }\n\
         function onIdentify(e) { throw new ValidationError('no email'); }\n\
         async function onPage(e) { throw new EventNotSupported('page'); }\n\
         function onGroup(e) { null.x; }",
    );
    let retry = failure(call(&f, "onTrack", json!({})));
    assert_eq!(retry.kind, FailureKind::Retry);
    assert_eq!(retry.message, "RetryError: later");
    let invalid = failure(call(&f, "onIdentify", json!({})));
    assert_eq!(invalid.kind, FailureKind::Invalid);
    assert!(invalid.stack.unwrap().contains("functions/test.js:2"));
    assert_eq!(
        failure(call(&f, "onPage", json!({}))).kind,
        FailureKind::NotSupported
    );
    assert_eq!(
        failure(call(&f, "onAlias", json!({}))).kind,
        FailureKind::NotSupported
    );
    let other = failure(call(&f, "onGroup", json!({})));
    assert_eq!(other.kind, FailureKind::Error);
    assert!(other.message.starts_with("TypeError"), "{}", other.message);
}

#[test]
fn an_endless_loop_fails_its_call_and_the_next_call_runs() {
    let f = load(
        "function onTrack(e) { while (true) {} }\n\
         async function onPage(e) { await null; for (;;) {} }\n\
         function onIdentify(e) { return 'fine'; }",
    );
    assert_eq!(
        failure(call(&f, "onTrack", json!({}))).kind,
        FailureKind::Timeout
    );
    assert_eq!(
        failure(call(&f, "onPage", json!({}))).kind,
        FailureKind::Timeout
    );
    assert_eq!(
        call(&f, "onIdentify", json!({})),
        Outcome::Returned(json!("fine"))
    );
}

#[test]
fn an_allocation_bomb_fails_its_call_and_the_next_call_runs() {
    let f = load(
        "function onTrack(e) { const a = []; while (true) { a.push('x'.repeat(1 << 16) + a.length); } }\n\
         function onIdentify(e) { return [1, 2].map(x => x * 2); }",
    );
    let bomb = failure(call(&f, "onTrack", json!({})));
    assert_eq!(bomb.kind, FailureKind::Error);
    assert!(bomb.message.contains("out of memory"), "{}", bomb.message);
    assert_eq!(
        call(&f, "onIdentify", json!({})),
        Outcome::Returned(json!([2, 4]))
    );
}

#[test]
fn a_syntax_error_names_file_and_line_without_running_the_script() {
    assert_eq!(
        check_syntax("x = 1;\nfunction onTrack(e) { return 1 }", "f.js"),
        Ok(())
    );
    let error = check_syntax(
        "x = 1;\n\nfunction onTrack(e) { return ) }",
        "functions/bad.js",
    )
    .unwrap_err();
    assert!(
        error.starts_with("functions/bad.js:3: SyntaxError"),
        "{error}"
    );
    let error = Function::load("function onTrack(e) {", options())
        .err()
        .unwrap();
    assert!(error.to_string().contains("SyntaxError"), "{error}");
    // Not run: an endless loop at the top level passes the syntax check at once.
    assert_eq!(check_syntax("while (true) {}", "f.js"), Ok(()));
    // A file that closes the block to run at load is stopped by the time limit.
    let error = check_syntax("} while (true) {} {", "f.js").unwrap_err();
    assert!(error.contains("interrupted"), "{error}");
}

#[test]
fn atob_btoa_and_console_are_there() {
    let f = load(
        "function onTrack(e) { console.log('seen', e); \
           return [btoa('user:pass'), atob('dXNlcjpwYXNz')]; }",
    );
    assert_eq!(
        call(&f, "onTrack", json!({"event": "A"})),
        Outcome::Returned(json!(["dXNlcjpwYXNz", "user:pass"]))
    );
}

#[test]
fn fetch_refuses_loopback_unless_listed_and_remaps_hosts() {
    let f = load(
        "async function onTrack(e) { const r = await fetch('http://127.0.0.1:9/x'); return r.status; }",
    );
    let refused = failure(call(&f, "onTrack", json!({})));
    assert_eq!(refused.kind, FailureKind::Error);
    assert!(
        refused.message.contains("loopback or private"),
        "{}",
        refused.message
    );

    // Listed (and nothing listening on port 9): a network error, worth a retry.
    let mut listed = options();
    listed.hosts.allow = vec!["127.0.0.1".into()];
    let f = Function::load(
        "async function onTrack(e) { const r = await fetch('http://127.0.0.1:9/x'); return r.status; }",
        listed,
    )
    .unwrap();
    assert_eq!(
        failure(call(&f, "onTrack", json!({}))).kind,
        FailureKind::Retry
    );
}

#[test]
fn public_and_private_addresses() {
    for private in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
    ] {
        assert!(!hosts::is_public(&private.parse().unwrap()), "{private}");
    }
    for public in ["8.8.8.8", "2606:4700::1111"] {
        assert!(hosts::is_public(&public.parse().unwrap()), "{public}");
    }
}

#[test]
fn settings_read_env_keys_without_their_suffix() {
    let table: BTreeMap<String, serde_json::Value> = [
        ("url_env".to_string(), json!("HOOK_URL")),
        ("channel".to_string(), json!("#a")),
    ]
    .into_iter()
    .collect();
    let lookup = |var: &str| (var == "HOOK_URL").then(|| "https://h.example".to_string());
    assert_eq!(
        settings_from(&table, lookup),
        Ok(json!({"url": "https://h.example", "channel": "#a"}))
    );
    let error = settings_from(&table, |_| None).unwrap_err();
    assert!(error.contains("`HOOK_URL`"), "{error}");
}

#[test]
fn fetch_hosts_keep_the_path_and_query_under_the_base() {
    let policy = HostPolicy {
        allow: vec!["api.example.com".into()],
        remap: [(
            "api.example.com".to_string(),
            "http://127.0.0.1:9000/stage/".to_string(),
        )]
        .into_iter()
        .collect(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = reqwest::Url::parse("https://API.example.com/v1/items?x=1&y=2").unwrap();
    let target = runtime.block_on(policy.target(&url)).unwrap();
    assert_eq!(
        target.as_str(),
        "http://127.0.0.1:9000/stage/v1/items?x=1&y=2"
    );
    // Not listed: refused before any lookup.
    let other = reqwest::Url::parse("https://other.example.com/").unwrap();
    let refused = runtime.block_on(policy.target(&other)).unwrap_err();
    assert!(refused.contains("not in allow_hosts"), "{refused}");
    let ftp = reqwest::Url::parse("ftp://api.example.com/x").unwrap();
    assert!(runtime.block_on(policy.target(&ftp)).is_err());
}

#[test]
fn segment_calls_are_shaped_as_segments_shim_does_and_a_throw_emits_nothing() {
    let f = load(
        r#"
        function onRequest(request, settings) {
          const body = request.json();
          Segment.track({ userId: 'u', event: 'E', properties: body, extra: 1, traits: null,
                          context: { q: request.url.searchParams.get('q') } });
          Segment.set({ collection: 'c', id: '1' });
          if (request.headers.get('X-Fail')) Segment.alias({ userId: 'u' });
        }
        "#,
    );
    let request = |fail: bool| {
        json!({
            "method": "POST",
            "url": "http://h/v1/functions/k?q=a+b%21",
            "headers": if fail { json!({"x-fail": "1"}) } else { json!({}) },
            "body": "{\"n\":1}",
        })
    };
    let emitted = match call(&f, "__sourceRequest", request(false)) {
        Outcome::Returned(v) => v,
        other => panic!("{other:?}"),
    };
    // Spec fields only, falsy ones left out, `type` from the method.
    assert_eq!(
        emitted,
        json!({"messages": [{"type": "track", "userId": "u", "event": "E",
                             "properties": {"n": 1}, "context": {"q": "a b!"}}],
               "sets": 1})
    );
    // alias without previousId throws; the track before it is not emitted either.
    let failed = failure(call(&f, "__sourceRequest", request(true)));
    assert_eq!(failed.kind, FailureKind::Invalid, "{failed:?}");
    assert!(failed.message.contains("previousId"), "{failed:?}");
}

#[test]
fn url_and_search_params_follow_whatwg() {
    let f = load(
        "function onTrack(e) {\n\
           const u = new URL('/a/b?x=1&y=two+words&x=3#top', 'https://user@Example.com:8443/base');\n\
           const before = u.href;\n\
           u.searchParams.set('z', 'a&b');\n\
           u.searchParams.append('x', '4');\n\
           u.searchParams.delete('y');\n\
           const seen = [];\n\
           u.searchParams.forEach(function (v, k) { seen.push(k + ':' + v); });\n\
           const fromObject = new URLSearchParams({ a: 'one two', b: '2' });\n\
           let bad = null;\n\
           try { new URL('not a url'); } catch (err) { bad = err.name; }\n\
           return { before, protocol: u.protocol, host: u.host, hostname: u.hostname, port: u.port,\n\
             pathname: u.pathname, hash: u.hash, origin: u.origin, y: new URL(before).searchParams.get('y'),\n\
             x: u.searchParams.getAll('x'), hasY: u.searchParams.has('y'), missing: u.searchParams.get('q'),\n\
             search: u.search, href: String(u), seen, fromObject: fromObject.toString(),\n\
             fromString: new URLSearchParams('?k=v%21').get('k'), bad };\n\
         }",
    );
    assert_eq!(
        call(&f, "onTrack", json!({})),
        Outcome::Returned(json!({
            "before": "https://user@example.com:8443/a/b?x=1&y=two+words&x=3#top",
            "protocol": "https:",
            "host": "example.com:8443",
            "hostname": "example.com",
            "port": "8443",
            "pathname": "/a/b",
            "hash": "#top",
            "origin": "https://example.com:8443",
            "y": "two words",
            "x": ["1", "3", "4"],
            "hasY": false,
            "missing": null,
            "search": "?x=1&x=3&z=a%26b&x=4",
            "href": "https://user@example.com:8443/a/b?x=1&x=3&z=a%26b&x=4#top",
            "seen": ["x:1", "x:3", "z:a&b", "x:4"],
            "fromObject": "a=one+two&b=2",
            "fromString": "v!",
            "bad": "TypeError",
        }))
    );
}

#[test]
fn buffer_converts_utf8_base64_and_hex() {
    let f = load(
        "function onTrack(e) {\n\
           const b = Buffer.from('héllo', 'utf8');\n\
           return { length: b.length, byteLength: Buffer.byteLength('héllo'),\n\
             base64: b.toString('base64'), hex: b.toString('hex'),\n\
             back: Buffer.from(b.toString('base64'), 'base64').toString(),\n\
             fromHex: Buffer.from('6869', 'hex').toString('utf8'),\n\
             basic: Buffer.from('user:pass').toString('base64'),\n\
             isBuffer: Buffer.isBuffer(b),\n\
             concat: Buffer.concat([Buffer.from('a'), Buffer.from('b')]).toString() };\n\
         }",
    );
    assert_eq!(
        call(&f, "onTrack", json!({})),
        Outcome::Returned(json!({
            "length": 6,
            "byteLength": 6,
            "base64": "aMOpbGxv",
            "hex": "68c3a96c6c6f",
            "back": "héllo",
            "fromHex": "hi",
            "basic": "dXNlcjpwYXNz",
            "isBuffer": true,
            "concat": "ab",
        }))
    );
}

#[test]
fn crypto_hashes_hmacs_and_uuids() {
    let f = load(
        "function onTrack(e) {\n\
           let unsupported = null;\n\
           try { crypto.createHash('sha3-256'); } catch (err) { unsupported = err.message; }\n\
           const id = crypto.randomUUID();\n\
           return { sha256: crypto.createHash('sha256').update('ab').update('c').digest('hex'),\n\
             b64: crypto.createHash('sha256').update('abc').digest('base64'),\n\
             hmac: crypto.createHmac('sha256', 'key')\n\
               .update('The quick brown fox jumps over the lazy dog').digest('hex'),\n\
             unsupported, uuid: /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(id),\n\
             distinct: id !== crypto.randomUUID() };\n\
         }",
    );
    assert_eq!(
        call(&f, "onTrack", json!({})),
        Outcome::Returned(json!({
            "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "b64": "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=",
            "hmac": "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            "unsupported": "crypto: digest algorithm 'sha3-256' is not supported (md5, sha1, sha256 and sha512 are)",
            "uuid": true,
            "distinct": true,
        }))
    );
}

#[test]
fn a_source_request_url_is_a_url_even_under_an_odd_host() {
    let f = load(
        "function onRequest(request) {\n\
           const u = request.url;\n\
           Segment.track({ userId: 'u', event: 'E', properties: { isUrl: u instanceof URL,\n\
             pathname: u.pathname, mode: u.searchParams.get('mode') } });\n\
         }",
    );
    for (url, host) in [
        ("http://h:9/v1/functions/k?mode=a", "h:9"),
        ("http://bad host/v1/functions/k?mode=a", "odd"),
    ] {
        let raw = json!({"method": "GET", "url": url, "headers": {}, "body": ""});
        let emitted = match call(&f, "__sourceRequest", raw) {
            Outcome::Returned(v) => v,
            other => panic!("{host}: {other:?}"),
        };
        assert_eq!(
            emitted["messages"][0]["properties"],
            json!({"isUrl": true, "pathname": "/v1/functions/k", "mode": "a"}),
            "{host}"
        );
    }
}

#[test]
fn set_timeout_runs_while_the_handler_waits_and_late_timers_are_dropped() {
    let f = load(
        "let late = 0;\n\
         async function onTrack(e) {\n\
           const order = [];\n\
           setTimeout(function (x) { order.push(x); }, 20, 'second');\n\
           const cancelled = setTimeout(function () { order.push('cancelled'); }, 5);\n\
           clearTimeout(cancelled);\n\
           setTimeout(function () { late += 1; }, 60000);\n\
           order.push('sync');\n\
           await new Promise(function (resolve) { setTimeout(function () { order.push('first'); resolve(); }, 10); });\n\
           await new Promise(function (resolve) { setTimeout(resolve, 30); });\n\
           return { order, late };\n\
         }\n\
         function onPage(e) { setTimeout(function () { late += 1; }, 0); return 'sync'; }\n\
         function onIdentify(e) { return new Promise(function (resolve) { setTimeout(resolve, 60000); }); }",
    );
    let expected = json!({"order": ["sync", "first", "second"], "late": 0});
    assert_eq!(
        call(&f, "onTrack", json!({})),
        Outcome::Returned(expected.clone())
    );
    // A timer still queued when its call ended (here a synchronous one) never fires later.
    assert_eq!(
        call(&f, "onPage", json!({})),
        Outcome::Returned(json!("sync"))
    );
    assert_eq!(call(&f, "onTrack", json!({})), Outcome::Returned(expected));
    // A promise waiting on a timer past the time limit fails the call, without the wait.
    let failed = failure(call(&f, "onIdentify", json!({})));
    assert_eq!(failed.kind, FailureKind::Timeout, "{failed:?}");
}
