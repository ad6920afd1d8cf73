use chrono::TimeZone;
use serde_json::json;

use super::*;

fn at(s: &str) -> DateTime<Utc> {
    crate::timestamp::parse(s).unwrap()
}

/// go-snakecase's own test table (snake_test.go), the facts ported as they are.
#[test]
fn snakecase_matches_go_snakecase() {
    let cases = [
        ("sample text", "sample_text"),
        ("sample-text", "sample_text"),
        ("sample_text", "sample_text"),
        ("sample___text", "sample_text"),
        ("sampleText", "sample_text"),
        (
            "inviteYourCustomersAddInvites",
            "invite_your_customers_add_invites",
        ),
        ("sample 2 Text", "sample_2_text"),
        ("   sample   2    Text   ", "sample_2_text"),
        ("   $#$sample   2    Text   ", "sample_2_text"),
        ("SAMPLE 2 TEXT", "sample_2_text"),
        ("___$$Base64Encode", "base64_encode"),
        ("FOO:BAR$BAZ", "foo_bar_baz"),
        ("FOO#BAR#BAZ", "foo_bar_baz"),
        ("something.com", "something_com"),
        ("$something%", "something"),
        ("•¶§ƒ˚foo˙∆˚¬", "foo"),
        ("CStringRef", "cstring_ref"),
        ("5test", "5test"),
        ("test5", "test5"),
        ("THE5r", "the5r"),
        ("5TEst", "5test"),
        ("_5TEst", "5test"),
        ("@%#&5TEst", "5test"),
        ("edf_6N", "edf_6n"),
        ("f_pX9", "f_p_x9"),
        ("p_z9Rg", "p_z9_rg"),
        ("2FA Enabled", "2fa_enabled"),
        ("Enabled 2FA", "enabled_2fa"),
        ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
        ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
        ("samPLE text", "sam_ple_text"),
        (
            "here\nis\na\nmultiline\nstring",
            "here_is_a_multiline_string",
        ),
        ("\"hello world\"", "hello_world"),
        // The warehouse docs' own examples.
        ("accountType", "account_type"),
        ("Signed Up", "signed_up"),
        ("", ""),
        ("$%", ""),
    ];
    for (input, want) in cases {
        assert_eq!(snakecase(input), want, "from {input:?}");
    }
}

#[test]
fn track_makes_tracks_and_event_rows() {
    let message = json!({
        "type": "track", "event": "Signed Up", "messageId": "m-1",
        "userId": "u-1", "anonymousId": "a-1",
        "properties": {"accountType": "pro", "userId": "x", "seats": 3},
        "context": {"page": {"url": "https://x.test/"}},
        "timestamp": "2026-01-01T00:00:00.000Z",
        "receivedAt": "2026-01-01T00:00:01.000Z",
    });
    let loaded = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 2).unwrap();
    let rows = rows(&message, loaded).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].table, "tracks");
    assert_eq!(rows[1].table, "signed_up");
    assert_eq!(rows[0].get("account_type"), None);
    assert_eq!(
        rows[1].get("account_type"),
        Some(&Value::Text("pro".into()))
    );
    assert_eq!(rows[1].get("user_id"), Some(&Value::Text("u-1".into())));
    assert_eq!(rows[1].get("seats"), Some(&Value::BigInt(3)));
    assert_eq!(
        rows[0].get("context_page_url"),
        Some(&Value::Text("https://x.test/".into()))
    );
    assert_eq!(
        rows[0].get("original_timestamp"),
        Some(&Value::Timestamp(at("2026-01-01T00:00:00Z")))
    );
    assert_eq!(rows[0].get("uuid_ts"), Some(&Value::Timestamp(loaded)));
}
