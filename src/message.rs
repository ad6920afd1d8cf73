//! What every stage may know of a message without reading its JSON: its Segment call
//! type, its dedupe key, and the tag the log keeps beside it.

/// The six Segment call types (lowercase in config, as in messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Identify => "identify",
            MessageType::Track => "track",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Group => "group",
            MessageType::Alias => "alias",
        }
    }

    pub fn parse(s: &str) -> Option<MessageType> {
        Some(match s {
            "identify" => MessageType::Identify,
            "track" => MessageType::Track,
            "page" => MessageType::Page,
            "screen" => MessageType::Screen,
            "group" => MessageType::Group,
            "alias" => MessageType::Alias,
            _ => return None,
        })
    }
}

/// 96 bits of xxh3-128 over (source, messageId): collisions are out of reach
/// (about 1 in 10^21 per lookup with 10 million keys held).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupeKey(pub [u32; 3]);

impl DedupeKey {
    pub fn of(source: &str, message_id: &str) -> DedupeKey {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(source.as_bytes());
        // A byte that cannot occur in UTF-8 separates the parts unambiguously.
        h.update(&[0xff]);
        h.update(message_id.as_bytes());
        let v = h.digest128();
        let key = [v as u32, (v >> 32) as u32, (v >> 64) as u32];
        // All-zero means "no key" in the log's tags.
        DedupeKey(if key == [0; 3] { [1, 0, 0] } else { key })
    }
}

/// What the log keeps about a message besides its JSON: its dedupe key (all zero when
/// it has none, e.g. a server-assigned messageId) and when it was accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tag {
    pub key: [u32; 3],
    /// Unix seconds.
    pub accepted_at: u32,
}

impl Tag {
    pub fn has_key(&self) -> bool {
        self.key != [0; 3]
    }
}

/// The user a message is about, for per-user ordering: a hash of its anonymousId, else of
/// its userId; 0 if it has neither (as non-empty strings). anonymousId first, because
/// browsers send it on every message, before and after identify, so one visitor's
/// messages share one key. Ingest partitions the shared log by it and delivery keeps
/// each key's messages in order, so both use this one function.
pub fn user_key(anonymous_id: Option<&str>, user_id: Option<&str>) -> u64 {
    [anonymous_id, user_id]
        .into_iter()
        .flatten()
        .find(|id| !id.is_empty())
        .map_or(0, |id| xxhash_rust::xxh3::xxh3_64(id.as_bytes()).max(1))
}

/// What ingest hands the queue about each message it frames: the tag the log keeps, and
/// the message's user key (not kept; the shared log picks a partition by it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub tag: Tag,
    pub user: u64,
}

impl From<Tag> for Stamp {
    fn from(tag: Tag) -> Stamp {
        Stamp { tag, user: 0 }
    }
}
