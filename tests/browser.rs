//! What browsers need besides the tracking calls: the settings analytics-next fetches when
//! its `cdnURL` points at fanout, and Segment's pixel API (`<img>` tags, e-mail opens).

mod common;

use base64::Engine as _;
use common::{client, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

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
    let body: Value = client()
        .get(f.url("/v1/projects/wk_web/settings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
