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
