//! The embedded destinations read the queue from their own cursors: each gets every
//! message, and after a restart each continues where it stopped, without gaps or repeats.

mod common;

use std::time::Duration;

use common::{assert_success, Fanout, Settings};
use serde_json::json;

async fn send(f: &Fanout, ids: &[&str]) {
    for id in ids {
        let body = json!({"userId": "u", "event": "Seen", "messageId": id});
        assert_success(f.post("/v1/track").json(&body).send().await.unwrap()).await;
    }
}

#[tokio::test]
async fn stdout_and_file_each_get_everything_and_resume_after_restart() {
    let settings = Settings::default()
        .capture_stdout()
        .section("[[destinations]]\nname = \"console\"\nkind = \"stdout\"\n");
    let mut f = Fanout::start_with(settings);
    send(&f, &["s-1", "s-2", "s-3"]).await;
    let first = f.wait_stdout(3).await;
    assert_eq!(common::receiver::ids(&first), ["s-1", "s-2", "s-3"]);
    assert_eq!(first[0]["type"], "track");

    let exit = f.terminate();
    assert!(exit.success(), "{exit:?}");
    f.restart();
    send(&f, &["s-4", "s-5"]).await;
    let second = f.wait_stdout(2).await;
    // Settled: a replay of the old lines would have come by now.
    f.wait_settled("console").await;
    let second_all = f.wait_stdout(2).await;
    assert_eq!(common::receiver::ids(&second), ["s-4", "s-5"]);
    assert_eq!(
        second_all.len(),
        2,
        "nothing from before the restart is printed again"
    );
    assert_eq!(
        common::receiver::ids(&f.wait_delivered(5).await),
        ["s-1", "s-2", "s-3", "s-4", "s-5"]
    );
}

const OLD_LINES: &str = "{\"old\":1}\n{\"old\":2}\n";

/// A running fanout with a file destination `archive` whose file already held two lines
/// before fanout first started (the temp dir must outlive the test).
fn archive_with_old_lines() -> (tempfile::TempDir, std::path::PathBuf, Fanout) {
    let other = tempfile::tempdir().unwrap();
    let path = other.path().join("archive.jsonl");
    std::fs::write(&path, OLD_LINES).unwrap();
    let settings = Settings::default().section(&format!(
        "[[destinations]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n",
        path.display()
    ));
    (other, path, Fanout::start_with(settings))
}

/// Sends `id`; the file ends up as the two old lines followed by it.
async fn assert_old_lines_kept(f: &Fanout, path: &std::path::Path, id: &str) {
    send(f, &[id]).await;
    f.wait_delivered(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(path).unwrap();
        if text.lines().count() == 3 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.starts_with(OLD_LINES),
        "earlier lines survive: {text:?}"
    );
    assert_eq!(text.lines().count(), 3, "{text:?}");
}

#[tokio::test]
async fn a_file_that_already_has_lines_keeps_them_across_restarts() {
    let (_other, path, mut f) = archive_with_old_lines();
    let exit = f.terminate();
    assert!(exit.success(), "{exit:?}");
    f.restart();
    assert_old_lines_kept(&f, &path, "a-1").await;
}

#[tokio::test]
async fn a_mark_saved_for_another_output_never_cuts_this_file() {
    let (_other, path, mut f) = archive_with_old_lines();
    assert!(f.terminate().success());
    // As if `archive` had been a webhook (mark 0) or had pointed at another file.
    let saved = fanout::queue::saved_checkpoint(&f.dir().join("data"), "archive")
        .unwrap()
        .expect("a saved cursor");
    // Written in the JSON form of earlier versions, which is still read.
    let foreign = json!({"position": saved.position, "sink_offset": 0, "sink_id": 0});
    let cursor = f.dir().join("data/cursors/archive.cursor");
    std::fs::write(&cursor, foreign.to_string()).unwrap();
    f.restart();
    assert_old_lines_kept(&f, &path, "b-1").await;
}
