//! Column names of key paths, remembered: the same few hundred paths (`context_userAgent`,
//! `properties.orderId`, …) come in every message, and snake-casing one that is not
//! snake case already costs more than looking it up.

use std::cell::RefCell;
use std::collections::HashMap;

use super::snake::{identifier, is_snakecase, MAX_IDENTIFIER};

/// Paths remembered per thread; when full the memo starts over, so a source sending
/// ever new keys cannot grow it.
const MEMO_ENTRIES: usize = 4096;
/// Longer paths are snake-cased each time: they are rare, and this bounds the memo's
/// memory (about 1 MB per thread at most).
const MEMO_PATH_BYTES: usize = 128;

thread_local! {
    // Per thread, not per destination: the name is a pure function of the path, so
    // sharing is safe, and no lock is taken per column.
    static MEMO: RefCell<HashMap<Box<str>, Option<Box<str>>>> = RefCell::new(HashMap::new());
}

/// `identifier(path)`, from the memo when the path is not snake case already.
pub fn column_name(path: &str) -> Option<String> {
    if is_snakecase(path) && path.len() <= MAX_IDENTIFIER {
        return (!path.is_empty()).then(|| path.to_owned());
    }
    if path.len() > MEMO_PATH_BYTES {
        return identifier(path);
    }
    MEMO.with_borrow_mut(|memo| {
        if let Some(name) = memo.get(path) {
            return name.as_deref().map(str::to_owned);
        }
        let name = identifier(path);
        if memo.len() >= MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(path.into(), name.as_deref().map(Box::from));
        name
    })
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
                assert_eq!(column_name(path), identifier(path), "{path:?}");
            }
        }
    }

    #[test]
    fn a_full_memo_starts_over() {
        for n in 0..MEMO_ENTRIES + 10 {
            let path = format!("key{n}X");
            assert_eq!(column_name(&path), identifier(&path));
        }
        MEMO.with_borrow(|memo| assert!(memo.len() <= MEMO_ENTRIES));
        assert_eq!(column_name("key1X"), Some("key1_x".to_owned()));
    }
}
