//! Rows that are the start of another row of their message, moved into their table from
//! that row's staging table instead of copied twice: a track's `tracks` row is the start
//! of its event row (`Order Completed` → `order_completed`), which has each of its
//! columns and the event's properties after them. A track batch's COPY data so shrinks
//! by its `tracks` rows, two fifths of it.
//!
//! Only where the rows come out the same: every row of the event table starts with its
//! message's row of the other table, and each column of that row is in both tables with
//! one type and needs no conversion. Otherwise both tables' rows are copied as ever.

use std::collections::{BTreeMap, HashSet};

use super::{Copy, RowOf};
use crate::destinations::postgres::encoded::Shape;
use crate::destinations::postgres::load::Also;
use crate::destinations::postgres::schema::{Name, Span};

/// The tables whose staging rows give another table rows (by name): for each, that
/// table and the columns it takes.
pub(super) type Starts<'t> = BTreeMap<&'t str, (&'t str, Vec<Name>)>;

type Copies<'t> = BTreeMap<&'t str, (Copy<'t>, Vec<RowOf<'t>>)>;

/// Every table of `copies` whose rows start with the rows of another.
pub(super) fn starts<'t>(copies: &Copies<'t>) -> Starts<'t> {
    let mut found: Starts<'t> = copies
        .keys()
        .filter_map(|&table| Some((table, start_of(copies, table)?)))
        .collect();
    // A table whose staging rows another table takes must hold all of its own: one whose
    // rows would come from a third table's staging rows gives none.
    let parts: HashSet<&str> = found.values().map(|(part, _)| *part).collect();
    found.retain(|whole, _| !parts.contains(whole));
    found
}

/// The table whose rows all of `table`'s rows start with, as it has them, and the
/// columns those rows have.
fn start_of<'t>(copies: &Copies<'t>, table: &'t str) -> Option<(&'t str, Vec<Name>)> {
    let (whole, rows) = &copies[table];
    let mut part: Option<(&'t str, &Copy<'t>)> = None;
    let mut names: HashSet<&Name> = HashSet::new();
    // A row of each shape says it for all of that shape's (a `Span` is in its shape).
    let mut seen: HashSet<*const Span> = HashSet::new();
    for &(message, span) in rows {
        if !seen.insert(span) {
            continue;
        }
        let shape: &Shape = message.shape();
        let first = starting(shape, span)?;
        let (name, copy) = match part {
            Some((name, copy)) if name == first.table.as_str() => (name, copy),
            Some(_) => return None,
            None => {
                let name = first.table.as_str();
                let (copy, _) = copies.get(name)?;
                (name, copy)
            }
        };
        if name == table || !copy.plan(shape, first).steps.is_empty() {
            return None;
        }
        for column in &shape.columns[first.columns.clone()] {
            let ty = |copy: &Copy<'_>| {
                let i = copy.layout.find(&column.name, 0)?;
                Some(copy.layout.columns[i].1)
            };
            if ty(copy).is_none() || ty(copy) != ty(whole) {
                return None;
            }
            names.insert(&column.name);
        }
        part = Some((name, copy));
    }
    let (name, copy) = part?;
    let columns = copy.layout.columns.iter().map(|(n, _)| n);
    Some((
        name,
        columns.filter(|n| names.contains(n)).cloned().collect(),
    ))
}

/// The row of `shape` that `span`, its second row, starts with; `None` if it has none.
fn starting<'s>(shape: &'s Shape, span: &Span) -> Option<&'s Span> {
    let [Some(first), Some(second)] = &shape.rows else {
        return None;
    };
    let starts = std::ptr::eq(second, span)
        && !first.upsert
        && !second.upsert
        && first.columns.start == second.columns.start
        && first.columns.end <= second.columns.end;
    starts.then_some(first)
}

/// Takes out of `table`'s rows those that other tables' staging rows give it, and says
/// which tables and columns they come from.
pub(super) fn take_out(table: &str, starts: &Starts<'_>, rows: &mut Vec<RowOf<'_>>) -> Also {
    let also: Also = starts
        .iter()
        .filter(|(_, (part, _))| *part == table)
        .map(|(whole, (_, columns))| (whole.to_string(), columns.clone()))
        .collect();
    if !also.is_empty() {
        rows.retain(|(message, _)| match &message.shape().rows[1] {
            Some(second) => !starts.contains_key(second.table.as_str()),
            None => true,
        });
    }
    also
}
