//! What browsers need besides the tracking calls: the settings analytics-next fetches when
//! its `cdnURL` points at fanout, and Segment's pixel API (`<img>` tags, e-mail opens).
//! The library itself runs in a real headless Chromium (Debian `chromium`, driven by
//! `playwright-core` from npm through `tests/browser/drive.cjs`; both installed by
//! `scripts/test`, which exports `FANOUT_CHROMIUM` and `FANOUT_BROWSER_DEPS`).

mod common;

use std::collections::HashMap;
use std::process::Command;

use base64::Engine as _;
use common::receiver::{Receiver, Reply};
use common::{client, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

/// A page that loads analytics-next's UMD bundle and nothing else.
const PAGE: &str = "<!doctype html><html><head><title>fanout browser test</title>\
<script src=\"/analytics.js\"></script></head><body><h1>A site on fanout</h1></body></html>";

fn page_reply(content_type: &str, body: Vec<u8>) -> Reply {
    Reply {
        status: 200,
        headers: vec![("content-type".to_string(), content_type.to_string())],
        body,
        delay: None,
    }
}

/// analytics-next, with only `writeKey` and `cdnURL` set, in a real Chromium on a page of
/// another origin: it reads its settings from fanout and its standard calls arrive once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_next_in_chromium_sends_each_call_once_with_only_cdn_url_set() {
    let deps = common::required_path("FANOUT_BROWSER_DEPS");
    let chromium = common::required_path("FANOUT_CHROMIUM");
    let bundle = std::fs::read(deps.join("node_modules/@segment/analytics-next/dist/umd/index.js"))
        .expect("the analytics-next UMD bundle");
    let f = Fanout::start();
    let site = Receiver::start().await;
    site.respond_with(move |request| {
        Some(match request.path.as_str() {
            "/" => page_reply("text/html", PAGE.as_bytes().to_vec()),
            "/analytics.js" => page_reply("application/javascript", bundle.clone()),
            _ => Reply::status(404),
        })
    });
    let shots = tempfile::tempdir().unwrap();
    let screenshot = shots.path().join("page.png");
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/drive.cjs");
    let command = Command::new("node")
        .arg(driver)
        .env("FANOUT_BROWSER_DEPS", &deps)
        .env("FANOUT_CHROMIUM", &chromium)
        .env("PAGE_URL", site.url("/"))
        .env("CDN_URL", format!("http://{}", f.addr))
        .env("WRITE_KEY", WRITE_KEY)
        .env("SCREENSHOT", &screenshot)
        .output();
    let output = tokio::task::spawn_blocking(move || command)
        .await
        .unwrap()
        .expect("run node");
    assert!(
        output.status.success(),
        "the browser driver failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("the driver's JSON line");
    assert_eq!(result["failures"], json!([]), "{result}");
    let requests = result["requests"].as_array().unwrap();
    let settings: Vec<&Value> = requests
        .iter()
        .filter(|r| r["url"].as_str().unwrap().contains("/v1/projects/"))
        .collect();
    assert_eq!(settings.len(), 1, "{result}");
    assert_eq!(settings[0]["status"], 200);
    assert!(
        requests.iter().all(|r| r["status"] == 200),
        "every request to fanout answered 200: {result}"
    );
    assert_eq!(
        result["ids"]["pixel"],
        json!({"loaded": true, "width": 1, "height": 1}),
        "the pixel loads as a 1x1 image: {result}"
    );
    let stored = f.wait_delivered(5).await;
    let by_id: HashMap<&str, &Value> = stored
        .iter()
        .map(|m| (m["messageId"].as_str().unwrap(), m))
        .collect();
    assert_eq!(by_id.len(), 5, "each call once, and the pixel: {stored:#?}");
    assert_eq!(by_id["pixel-img-1"]["event"], "Email Opened");
    for call in ["identify", "track", "page", "group"] {
        let id = result["ids"][call].as_str().unwrap();
        let message = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{call} {id} not stored"));
        assert_eq!(message["type"], call);
        assert_eq!(message["context"]["library"]["name"], "analytics.js");
    }
    let track = by_id[result["ids"]["track"].as_str().unwrap()];
    assert_eq!(track["event"], "Browser Event");
    assert_eq!(track["userId"], "browser-user");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 0);
}

fn pixel_url(f: &Fanout, call: &str, message: &Value) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(message.to_string());
    f.url(&format!("/v1/pixel/{call}?data={}", urlencode(&data)))
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn settings_point_the_browser_library_back_at_fanout() {
    let f = Fanout::start();
    let answer = client()
        .get(f.url(&format!("/v1/projects/{WRITE_KEY}/settings")))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        answer
            .headers()
            .get("access-control-allow-origin")
            .is_some(),
        "a cross-origin GET from the page"
    );
    let body: Value = answer.json().await.unwrap();
    let segment = &body["integrations"]["Segment.io"];
    assert_eq!(segment["apiKey"], WRITE_KEY);
    assert_eq!(segment["apiHost"], format!("{}/v1", f.addr));
    assert_eq!(segment["protocol"], "http");
    assert!(segment.get("deliveryStrategy").is_none(), "{body}");
    assert_eq!(body["remotePlugins"], json!([]));
    assert_eq!(body["plan"]["track"]["__default"]["enabled"], true);

    let unknown = client()
        .get(f.url("/v1/projects/nope/settings"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["code"], "unknown_write_key");
}

#[tokio::test]
async fn settings_follow_the_browser_section_and_the_source() {
    let f = Fanout::start_with(
        Settings::default()
            .section("[browser]\napi_host = \"events.example.com\"\nprotocol = \"https\"\n")
            .section(
                "[[sources]]\nname = \"web\"\nwrite_keys = [\"wk_web\"]\n\
                 browser = { batching = { size = 10, timeout = \"5s\" } }\n",
            ),
    );
    let answer = client()
        .get(f.url("/v1/projects/wk_web/settings"))
        .header("x-forwarded-host", "attacker.example")
        .send()
        .await
        .unwrap();
    // Nothing the request sent shaped it: a shared cache may keep it.
    assert_eq!(answer.headers()["cache-control"], "max-age=60");
    let body: Value = answer.json().await.unwrap();
    let segment = &body["integrations"]["Segment.io"];
    assert_eq!(segment["apiHost"], "events.example.com/v1");
    assert_eq!(segment["protocol"], "https");
    assert_eq!(
        segment["deliveryStrategy"],
        json!({"strategy": "batching", "config": {"size": 10, "timeout": 5000}})
    );
}

#[tokio::test]
async fn a_pixel_is_stored_like_a_post_and_answered_with_a_gif() {
    let f = Fanout::start();
    let message = json!({"writeKey": WRITE_KEY, "userId": "u-px", "event": "Email Opened",
                         "messageId": "px-1", "properties": {"campaign": "c+1/2"}});
    let answer = client()
        .get(pixel_url(&f, "track", &message))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "image/gif");
    let gif = answer.bytes().await.unwrap();
    assert!(gif.starts_with(b"GIF89a"), "{gif:?}");
    let stored = f.wait_delivered(1).await;
    assert_eq!(stored[0]["messageId"], "px-1");
    assert_eq!(stored[0]["type"], "track");
    assert_eq!(stored[0]["event"], "Email Opened");
    assert_eq!(stored[0]["properties"]["campaign"], "c+1/2");
    assert!(
        stored[0].get("writeKey").is_none(),
        "the key is not stored: {}",
        stored[0]
    );

    // An unescaped `+` of the base64 (a space once decoded) still works.
    let raw = json!({"writeKey": WRITE_KEY, "userId": "u-px", "event": ">>>", "messageId": "px-2"});
    let data = base64::engine::general_purpose::STANDARD.encode(raw.to_string());
    assert!(data.contains('+') || data.contains('/'), "{data}");
    let answer = client()
        .get(f.url(&format!("/v1/pixel/track?data={data}")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    f.wait_delivered(2).await;
}

#[tokio::test]
async fn a_bad_pixel_gets_a_gif_with_a_4xx_status() {
    let f = Fanout::start();
    let cases = [
        (f.url("/v1/pixel/track"), 400),
        (f.url("/v1/pixel/track?data=%%%not-base64"), 400),
        (
            pixel_url(
                &f,
                "track",
                &json!({"writeKey": "nope", "userId": "u", "event": "E"}),
            ),
            401,
        ),
        (
            pixel_url(
                &f,
                "track",
                &json!({"writeKey": WRITE_KEY, "event": "no user"}),
            ),
            400,
        ),
        (
            pixel_url(
                &f,
                "teleport",
                &json!({"writeKey": WRITE_KEY, "userId": "u"}),
            ),
            404,
        ),
    ];
    for (url, status) in cases {
        let answer = client().get(&url).send().await.unwrap();
        assert_eq!(answer.status(), status, "{url}");
        assert_eq!(answer.headers()["content-type"], "image/gif", "{url}");
        assert!(answer.bytes().await.unwrap().starts_with(b"GIF89a"));
    }
    let identify = json!({"writeKey": WRITE_KEY, "userId": "u-ok", "traits": {"plan": "pro"}});
    let answer = client()
        .get(pixel_url(&f, "identify", &identify))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let stored = f.wait_delivered(1).await;
    assert_eq!(
        stored.len(),
        1,
        "only the good pixel was stored: {stored:?}"
    );
    assert_eq!(stored[0]["type"], "identify");
}

/// GET settings with forwarded headers naming another host: (apiHost, protocol,
/// Cache-Control, Vary's names in lower case).
async fn settings_with_forwarded_headers(f: &Fanout) -> (Value, Value, String, Vec<String>) {
    let answer = client()
        .get(f.url(&format!("/v1/projects/{WRITE_KEY}/settings")))
        .header("origin", "https://shop.example")
        .header("x-forwarded-host", "attacker.example")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let cache = answer.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    let vary = answer
        .headers()
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let body: Value = answer.json().await.unwrap();
    let segment = &body["integrations"]["Segment.io"];
    (
        segment["apiHost"].clone(),
        segment["protocol"].clone(),
        cache,
        vary,
    )
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    // A shared cache keyed on the URL once kept an answer sending every visitor's events
    // to the host a request named in X-Forwarded-Host.
    let f = Fanout::start();
    let (host, protocol, cache, vary) = settings_with_forwarded_headers(&f).await;
    assert_eq!(host, format!("{}/v1", f.addr));
    assert_eq!(protocol, "http");
    assert_eq!(cache, "private, no-store");
    assert!(vary.contains(&"host".to_string()), "{vary:?}");
    assert!(vary.contains(&"origin".to_string()), "{vary:?}");
    assert!(!vary.contains(&"x-forwarded-host".to_string()), "{vary:?}");
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_used() {
    let f = Fanout::start_with(Settings::default().server("trusted_proxies = [\"127.0.0.0/8\"]"));
    let (host, protocol, cache, vary) = settings_with_forwarded_headers(&f).await;
    assert_eq!(host, "attacker.example/v1");
    assert_eq!(protocol, "https");
    assert_eq!(cache, "private, no-store");
    for shaped in ["host", "x-forwarded-host", "x-forwarded-proto"] {
        assert!(vary.contains(&shaped.to_string()), "{shaped}: {vary:?}");
    }
}

#[tokio::test]
async fn a_head_of_a_pixel_stores_nothing() {
    let f = Fanout::start();
    let probe = json!({"writeKey": WRITE_KEY, "userId": "u-head", "event": "Probe",
                       "messageId": "head-1"});
    let answer = client()
        .head(pixel_url(&f, "track", &probe))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "image/gif");
    assert_eq!(answer.headers()["cache-control"], "no-store");
    // Stored after the HEAD: had the HEAD been stored, it would be delivered first.
    let opened = json!({"writeKey": WRITE_KEY, "userId": "u-head", "event": "Opened",
                        "messageId": "get-1"});
    let answer = client()
        .get(pixel_url(&f, "track", &opened))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let stored = f.wait_delivered(1).await;
    let ids: Vec<&Value> = stored.iter().map(|m| &m["messageId"]).collect();
    assert_eq!(ids, [&json!("get-1")], "only the GET was stored");
}
