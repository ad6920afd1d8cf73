//! Column names of key paths, remembered: the same few hundred paths (`context_userAgent`,
//! `properties.orderId`, …) come in every message, and snake-casing one that is not
//! snake case already costs more than looking it up.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use super::snake::identifier;

/// Paths remembered per thread; when full the memo starts over, so a source sending
/// ever new keys cannot grow it.
const MEMO_ENTRIES: usize = 4096;
/// Longer paths are snake-cased each time: they are rare, and this bounds the memo's
/// memory (about 1 MB per thread at most).
const MEMO_PATH_BYTES: usize = 128;

/// Bytes of names kept for the life of the process (`intern`): a few thousand of the
/// longest names, tens of thousands of typical ones. Past it names are reference counted.
const INTERNED_BYTES: usize = 1 << 20;

/// Every name interned so far, each once, and their bytes.
static INTERNED: Mutex<Option<(HashSet<&'static str>, usize)>> = Mutex::new(None);

thread_local! {
    // Per thread, not per destination: the name is a pure function of the path, so
    // sharing is safe, and no lock is taken per column.
    static MEMO: RefCell<Memo> = RefCell::new(Memo::new());
}

/// Paths by their xxh3, keyed per thread: one short hash and one comparison a column
/// (SipHash costs several times more on names this short), and the random key keeps
/// crafted paths from colliding on purpose. Two paths of one hash take turns.
struct Memo {
    key: u64,
    names: HashMap<u64, (Box<str>, Option<Name>), BuildHasherDefault<Hashed>>,
}

impl Memo {
    fn new() -> Memo {
        Memo {
            key: RandomState::new().hash_one(0u8),
            names: HashMap::default(),
        }
    }
}

/// The map's keys are hashes already.
#[derive(Default)]
struct Hashed(u64);

impl Hasher for Hashed {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `identifier(path)`, from the memo: the rows of a batch share one `Name` per column
/// (snake-case paths too), which later steps tell apart by address.
pub fn column_name(path: &str) -> Option<Name> {
    if path.len() > MEMO_PATH_BYTES {
        return identifier(path).map(Name::from);
    }
    MEMO.with_borrow_mut(|memo| {
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(path.as_bytes(), memo.key);
        if let Some((known, name)) = memo.names.get(&hash) {
            if **known == *path {
                return name.clone();
            }
        }
        let name = identifier(path).map(intern);
        if memo.names.len() >= MEMO_ENTRIES {
            memo.names.clear();
        }
        memo.names.insert(hash, (path.into(), name.clone()));
        name
    })
}

/// `name` as one string for the rest of the process, the same for every thread: a row's
/// names then cost no reference count to make and drop (one per column otherwise, a
/// tenth of a row's mapping), and compare by address. Leaked on purpose, at most
/// `INTERNED_BYTES`; past that a source sending ever new keys gets counted names.
fn intern(name: String) -> Name {
    let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
    let (names, bytes) = interned.get_or_insert_with(Default::default);
    if let Some(&known) = names.get(name.as_str()) {
        return Name::Static(known);
    }
    if *bytes + name.len() > INTERNED_BYTES {
        return Name::from(name);
    }
    let kept: &'static str = Box::leak(name.into_boxed_str());
    *bytes += kept.len();
    names.insert(kept);
    Name::Static(kept)
}

/// A column name: the standard ones and those interned (`intern`) static, others
/// reference counted. Either way a row's names cost no allocation, and the same name
/// from the memo is the same string, compared by address first.
#[derive(Clone)]
pub enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Name {
    pub fn as_str(&self) -> &str {
        match self {
            Name::Static(s) => s,
            Name::Shared(s) => s,
        }
    }
}

impl std::ops::Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Name {
    fn from(name: &'static str) -> Name {
        Name::Static(name)
    }
}

impl From<String> for Name {
    fn from(name: String) -> Name {
        Name::Shared(name.into())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        let (a, b) = (self.as_str(), other.as_str());
        // The same name from the memo (or the same static) is the same string.
        std::ptr::eq(a, b) || a == b
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_names_are_the_identifiers_of_their_paths() {
        let long_camel = "a".repeat(40) + "B" + &"c".repeat(100);
        let paths = [
            "context_userAgent",
            "context_page_url",
            "shippingAddress_postalCode",
            "$%",
            "",
            "_",
            "ALL_CAPS",
            &long_camel,
            &"x".repeat(70),
        ];
        // Twice: the second time from the memo.
        for _ in 0..2 {
            for path in paths {
                assert_eq!(
                    column_name(path).map(|n| n.to_string()),
                    identifier(path),
                    "{path:?}"
                );
            }
        }
    }

    #[test]
    fn a_full_memo_starts_over() {
        for n in 0..MEMO_ENTRIES + 10 {
            let path = format!("key{n}X");
            assert_eq!(column_name(&path).map(|n| n.to_string()), identifier(&path));
        }
        MEMO.with_borrow(|memo| assert!(memo.names.len() <= MEMO_ENTRIES));
        assert_eq!(column_name("key1X").unwrap(), "key1_x");
    }

    #[test]
    fn a_name_is_one_string_for_every_thread_within_the_budget() {
        let here = column_name("context_interned_acrossThreads").unwrap();
        let there = std::thread::spawn(|| column_name("context_interned_acrossThreads"))
            .join()
            .unwrap()
            .unwrap();
        assert!(matches!(here, Name::Static(_)));
        assert!(std::ptr::eq(here.as_str(), there.as_str()));
        // Past the budget names are still right, only counted.
        let long = "k".repeat(40);
        let mut last = None;
        for n in 0..INTERNED_BYTES / 40 + 10 {
            let path = format!("{long}{n}");
            last = Some((column_name(&path).unwrap(), path));
        }
        let (name, path) = last.unwrap();
        assert!(matches!(name, Name::Shared(_)));
        assert_eq!(Some(name.to_string()), identifier(&path));
        assert!(std::ptr::eq(
            column_name("context_interned_acrossThreads")
                .unwrap()
                .as_str(),
            here.as_str()
        ));
    }
}
