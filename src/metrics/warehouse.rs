//! Warehouse loading metrics. The `table` and `column` labels name columns that exist in
//! the warehouse, so their values are bounded by its schema.

use metrics::{counter, describe_counter};

const SCHEMA_WARNINGS: &str = "fanout_warehouse_schema_warnings_total";

pub(super) fn describe() {
    describe_counter!(
        SCHEMA_WARNINGS,
        "Values stored as NULL because they do not convert to their column's type (or the \
         column could not be made), by destination, table and column."
    );
}

/// Counts `n` values of `table.column` stored as NULL for want of a conversion.
pub fn schema_warnings(destination: &str, table: &str, column: &str, n: u64) {
    counter!(
        SCHEMA_WARNINGS,
        "destination" => destination.to_owned(),
        "table" => table.to_owned(),
        "column" => column.to_owned()
    )
    .increment(n);
}
