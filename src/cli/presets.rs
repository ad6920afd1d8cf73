//! `fanout presets`: the destination presets shipped in the binary, listed, or one's file
//! printed (to read its keys before overriding one).

use crate::cli::output::line;
use crate::destinations::presets;

/// One line per preset: its name and what it sends where.
pub fn list() -> anyhow::Result<()> {
    let listed = presets::list();
    let width = listed.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, description) in listed {
        line(format_args!("{name:width$}  {description}"))?;
    }
    Ok(())
}

/// The preset's file as shipped.
pub fn show(name: &str) -> anyhow::Result<()> {
    match presets::source(name) {
        Some(text) => line(text.trim_end()),
        None => {
            let known: Vec<&str> = presets::PRESETS.iter().map(|(n, _)| *n).collect();
            anyhow::bail!("unknown preset `{name}`; known: {}", known.join(", "))
        }
    }
}
