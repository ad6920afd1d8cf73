use super::*;

async fn open(dir: &Path) -> Arc<Regulations> {
    let store = Store::Local(Arc::new(SqliteStore::open(dir).unwrap()));
    let clock = Clock::following_tokio(DateTime::from_timestamp(1_900_000_000, 0).unwrap());
    Regulations::load(store, clock, Erasers::default())
        .await
        .unwrap()
}

fn user(id: &str) -> SubjectId {
    SubjectId::UserId(id.into())
}

fn track(user_id: &str) -> Vec<u8> {
    format!(r#"{{"type":"track","userId":"{user_id}"}}"#).into_bytes()
}

#[tokio::test(start_paused = true)]
async fn a_suppression_holds_until_an_unsuppress_and_again_after_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let regulations = open(dir.path()).await;
    let suppression = regulations.suppression();
    assert!(!suppression.load().matches(&track("u1")));
    let (first, created) = regulations.add(Kind::Suppress, user("u1")).await.unwrap();
    assert!(created);
    assert!(suppression.load().matches(&track("u1")));
    assert!(!suppression.load().matches(&track("u2")));
    let (again, created) = regulations.add(Kind::Suppress, user("u1")).await.unwrap();
    assert!(!created, "already suppressed: the same regulation");
    assert_eq!(again, first);
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    regulations.add(Kind::Unsuppress, user("u1")).await.unwrap();
    assert!(!suppression.load().matches(&track("u1")), "lifted");
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    let (_, created) = regulations.add(Kind::Suppress, user("u1")).await.unwrap();
    assert!(created);
    assert!(suppression.load().matches(&track("u1")), "suppressed again");
    assert_eq!(regulations.list().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn regulations_survive_reopening_and_a_removed_one_no_longer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let regulations = open(dir.path()).await;
    let (kept, _) = regulations
        .add(Kind::Suppress, SubjectId::Email("a@example.com".into()))
        .await
        .unwrap();
    let (removed, _) = regulations.add(Kind::Suppress, user("u1")).await.unwrap();
    assert_eq!(
        regulations.remove(&removed.id).await.unwrap(),
        Some(removed.clone())
    );
    assert_eq!(regulations.remove(&removed.id).await.unwrap(), None);
    drop(regulations);
    let reopened = open(dir.path()).await;
    assert_eq!(reopened.list(), [kept]);
    let now = reopened.suppression().load_full();
    assert!(now.matches(br#"{"type":"identify","traits":{"email":"A@example.com"}}"#));
    assert!(!now.matches(&track("u1")));
}

#[tokio::test(start_paused = true)]
async fn a_change_from_a_stale_copy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let regulations = open(dir.path()).await;
    let (regulation, _) = regulations
        .add(Kind::SuppressWithDelete, user("u1"))
        .await
        .unwrap();
    let (_, revision) = regulations.held(&regulation.id).unwrap();
    let mut claimed = regulation.clone();
    claimed.claim = Some(Claim {
        owner: "one".into(),
        until: stamp(regulations.clock.now()),
    });
    assert!(regulations
        .save(&claimed, revision)
        .await
        .unwrap()
        .is_some());
    claimed.claim = Some(Claim {
        owner: "two".into(),
        until: stamp(regulations.clock.now()),
    });
    assert_eq!(regulations.save(&claimed, revision).await.unwrap(), None);
    let (held, _) = regulations.held(&regulation.id).unwrap();
    assert_eq!(held.claim.unwrap().owner, "one");
}

#[test]
fn a_regulation_reads_as_segment_names_it() {
    let regulation = Regulation {
        id: "reg_1".into(),
        kind: Kind::SuppressWithDelete,
        subject: SubjectId::AnonymousId("a1".into()),
        created_at: "2026-12-07T08:00:00.000000Z".into(),
        destinations: Some(BTreeMap::from([
            ("hook".to_string(), Report::NotSupported),
            (
                "klaviyo".to_string(),
                Report::Failed {
                    message: "403".into(),
                    attempts: 1,
                },
            ),
        ])),
        claim: None,
    };
    let json = serde_json::to_value(&regulation).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "id": "reg_1",
            "type": "suppress_with_delete",
            "anonymousId": "a1",
            "created_at": "2026-12-07T08:00:00.000000Z",
            "destinations": {
                "hook": {"status": "not supported"},
                "klaviyo": {"status": "failed", "message": "403", "attempts": 1},
            },
        })
    );
    assert_eq!(
        serde_json::from_value::<Regulation>(json).unwrap(),
        regulation
    );
}
