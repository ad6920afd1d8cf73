//! The commands' standard output. A reader that stops early (`fanout route | head`) closes
//! the pipe: the command then ends quietly and successfully, as Unix tools do, instead of
//! panicking (`println!` does) or reporting the closed pipe as an error.

use std::fmt;
use std::io::{ErrorKind, Write};

/// Standard output's reader went away; nothing more can be shown.
#[derive(Debug)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for Closed {}

/// Writes `text` and a newline to standard output, flushed (a `tap` line is seen at once).
pub fn line(text: impl fmt::Display) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe => anyhow::Error::new(Closed),
            _ => anyhow::Error::new(e).context("cannot write to standard output"),
        })
}

/// Whether `error` is standard output closing, which ends a command without a word.
pub fn is_closed(error: &anyhow::Error) -> bool {
    error.is::<Closed>()
}
