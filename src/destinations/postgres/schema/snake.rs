//! Table and column names as Segment's warehouses spell them: go-snakecase's rules
//! (github.com/segmentio/go-snakecase), cut to what Postgres keeps of an identifier.

/// Postgres keeps the first 63 bytes of an identifier (NAMEDATALEN - 1) and drops the
/// rest silently; cutting here makes the names we compare the names the table has.
pub const MAX_IDENTIFIER: usize = 63;

/// go-snakecase: words are runs of (upper or digit)* then (lower or digit)*, anything not
/// an ASCII letter or digit separates them; words are lowercased and joined by `_`.
/// A leading run already in snake case is kept as is, and an upper-case run right after
/// it continues the same word when no lower-case letter came before it (`5TEst` →
/// `5test`, `edf_6N` → `edf_6n`). The result holds only `[a-z0-9_]`.
pub fn snakecase(s: &str) -> String {
    let b = s.as_bytes();
    let Kept {
        len: mut i,
        has_lower,
        has_underscore,
        lower_since_underscore,
    } = kept(b);
    if i == b.len() {
        return s.to_owned();
    }
    let mut out = String::with_capacity(b.len() + 8);
    out.push_str(&s[..i]);
    if b[i].is_ascii_uppercase() && (!has_lower || has_underscore && !lower_since_underscore) {
        i = word(b, i, &mut out);
    }
    while i < b.len() {
        if !b[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        if !out.is_empty() {
            out.push('_');
        }
        i = word(b, i, &mut out);
    }
    out
}

/// The leading run go-snakecase keeps as it is, and what it holds.
struct Kept {
    len: usize,
    has_lower: bool,
    has_underscore: bool,
    lower_since_underscore: bool,
}

fn kept(b: &[u8]) -> Kept {
    let mut i = 0;
    let mut has_lower = false;
    let mut has_underscore = false;
    let mut lower_since_underscore = false;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() {
            has_lower = true;
            lower_since_underscore |= has_underscore;
        } else if c.is_ascii_digit() {
        } else if c == b'_' && i > 0 && b.get(i + 1).is_some_and(|&n| is_lower_or_digit(n)) {
            has_underscore = true;
            lower_since_underscore = false;
        } else {
            break;
        }
        i += 1;
    }
    Kept {
        len: i,
        has_lower,
        has_underscore,
        lower_since_underscore,
    }
}

fn is_lower_or_digit(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Appends the word at `i` lowercased and returns where it ends.
fn word(b: &[u8], mut i: usize, out: &mut String) -> usize {
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit()) {
        out.push(b[i].to_ascii_lowercase() as char);
        i += 1;
    }
    while i < b.len() && is_lower_or_digit(b[i]) {
        out.push(b[i] as char);
        i += 1;
    }
    i
}

/// The identifier a name becomes: snake-cased and cut to `MAX_IDENTIFIER` bytes; `None`
/// when nothing is left (`"$%"`, `""`), which the caller drops.
pub fn identifier(name: &str) -> Option<String> {
    let mut id = snakecase(name);
    // snakecase output is ASCII, so any byte length is a char boundary.
    id.truncate(MAX_IDENTIFIER);
    (!id.is_empty()).then_some(id)
}
