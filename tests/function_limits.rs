//! The sandbox keys of insert functions and source functions (`settings`, `allow_hosts`,
//! `fetch_hosts`, `timeout`, `memory_limit`), given as a table in place of the file name,
//! run by a real fanout process against a real receiver on loopback.

mod common;

use common::receiver::Receiver;
use common::{assert_success, Fanout, Settings};
use serde_json::json;

/// A temporary directory holding `functions/{name}` = `script` for each pair.
fn with_functions(files: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    for (name, script) in files {
        std::fs::write(tmp.path().join("functions").join(name), script).unwrap();
    }
    tmp
}

#[tokio::test]
async fn an_insert_function_gets_its_settings_from_the_environment() {
    let tmp = with_functions(&[(
        "tag.js",
        "function onTrack(event, settings) {\n\
           event.properties = { tag: settings.tag, plan: settings.plan };\n\
           return event;\n\
         }\n",
    )]);
    let path = tmp.path().join("tagged.jsonl");
    let section = format!(
        "[[destinations]]\nname = \"tagged\"\nkind = \"file\"\npath = \"{}\"\n\
         insert_function = {{ file = \"functions/tag.js\", \
         settings = {{ tag_env = \"FANOUT_TEST_TAG\", plan = \"pro\" }} }}\n",
        path.display()
    );
    let f = Fanout::start_in(
        tmp,
        Settings::default()
            .section(&section)
            .env("FANOUT_TEST_TAG", "from-env"),
    );
    assert_success(
        f.post("/v1/track")
            .json(&json!({"userId": "u1", "event": "E", "messageId": "m1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let lines = common::wait_file_lines(&path, 1).await;
    assert_eq!(lines[0]["messageId"], "m1");
    assert_eq!(lines[0]["properties"]["tag"], "from-env", "{}", lines[0]);
    assert_eq!(lines[0]["properties"]["plan"], "pro", "{}", lines[0]);
}

/// `onRequest` that fetches the receiver and emits a track saying what it answered.
fn pinger(port: u16) -> String {
    format!(
        "async function onRequest(request, settings) {{\n\
           const res = await fetch('http://127.0.0.1:{port}/ping');\n\
           Segment.track({{ userId: 'u1', event: 'Pinged', properties: {{ status: res.status }} }});\n\
         }}\n"
    )
}

#[tokio::test]
async fn a_source_function_reaches_a_loopback_receiver_only_when_it_is_in_allow_hosts() {
    let receiver = Receiver::start().await;
    let tmp = with_functions(&[("ping.js", &pinger(receiver.port()))]);
    let listed = "[[sources]]\nname = \"listed\"\nwrite_keys = [\"wk_listed\"]\n\
                  function = { file = \"functions/ping.js\", allow_hosts = [\"127.0.0.1\"] }\n";
    let f = Fanout::start_in(
        tmp,
        Settings::default()
            .source("function = { file = \"functions/ping.js\" }")
            .section(listed),
    );

    // Not listed: the fetch is refused, the handler fails, nothing reaches the receiver.
    let body = common::expect_error(
        common::client()
            .post(f.url(&format!("/v1/functions/{}", common::WRITE_KEY)))
            .body("{}")
            .send()
            .await
            .unwrap(),
        500,
        "internal",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("loopback or private"), "{body}");
    assert!(receiver.requests().is_empty());

    assert_success(
        common::client()
            .post(f.url("/v1/functions/wk_listed"))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(receiver.requests().len(), 1);
    let delivered = f.wait_delivered(1).await;
    assert_eq!(delivered[0]["event"], "Pinged");
    assert_eq!(delivered[0]["properties"]["status"], 200);
}

#[tokio::test]
async fn a_source_function_over_its_own_timeout_answers_504() {
    // Waits 3 s: within the default 5 s, past this source's 300 ms.
    let tmp = with_functions(&[(
        "slow.js",
        "async function onRequest(request) {\n\
           await new Promise((resolve) => setTimeout(resolve, 3000));\n\
           Segment.track({ userId: 'u1', event: 'Late' });\n\
         }\n",
    )]);
    let f = Fanout::start_in(
        tmp,
        Settings::default()
            .source("function = { file = \"functions/slow.js\", timeout = \"300ms\" }"),
    );
    common::expect_error(
        common::client()
            .post(f.url(&format!("/v1/functions/{}", common::WRITE_KEY)))
            .body("{}")
            .send()
            .await
            .unwrap(),
        504,
        "function_timeout",
    )
    .await;
    // The server goes on.
    assert_success(
        f.post("/v1/track")
            .json(&json!({"userId": "u", "event": "After"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let delivered = f.wait_delivered(1).await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["event"], "After");
}

/// `fanout check` on a config with `section` appended and `functions/f.js` = `script`;
/// it must refuse it. Returns what it said.
fn check_refuses(script: &str, section: &str) -> String {
    let tmp = with_functions(&[("f.js", script)]);
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[sources]]\nname = \"web\"\n\
             write_keys = [\"k\"]\n\n{section}"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    stderr
}

#[test]
fn check_names_a_source_function_s_sandbox_key() {
    let stderr = check_refuses(
        "function onRequest() {}\n",
        "[[sources]]\nname = \"hooks\"\nwrite_keys = [\"k2\"]\n\
         function = { file = \"functions/f.js\", memory_limit = 10 }\n",
    );
    assert!(
        stderr.contains("sources[1].function.memory_limit"),
        "{stderr}"
    );
}
