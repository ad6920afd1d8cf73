//! One table's part of a batch as binary `COPY` data (Postgres's "COPY" reference, "Binary
//! Format"), written into one buffer before the transaction: no future, no trait object
//! and no flush per row, and a value that cannot be encoded is known before any SQL.
//! Each value is encoded by tokio-postgres's own `ToSql`.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::load::{Mismatch, TableLoad};
use super::schema::ColumnType;

/// The signature, the flags (no OIDs) and the length of the header extension (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// A field count of -1 ends the data.
const TRAILER: i16 = -1;
/// The length written for a NULL field.
const NULL: i32 = -1;

/// The binary COPY data of `load`'s rows, in its columns' order. A value its type cannot
/// encode (none that `lay_out` lets through, in practice) is sent as NULL and added to
/// `mismatches`, like any value that does not fit its column.
pub fn encode(table: &str, load: &TableLoad<'_>, mismatches: &mut Vec<Mismatch>) -> Bytes {
    let types: Vec<Type> = load.columns.iter().map(|(_, ty)| pg_type(*ty)).collect();
    let width = i16::try_from(types.len()).expect("Postgres tables have at most 1600 columns");
    let mut out = BytesMut::with_capacity(HEADER.len() + 2 + load.rows.len() * 256);
    out.put_slice(HEADER);
    for row in &load.rows {
        out.put_i16(width);
        for ((cell, ty), (column, column_type)) in row.iter().zip(&types).zip(&load.columns) {
            let start = out.len();
            out.put_i32(NULL);
            let length = match cell.to_sql(ty, &mut out) {
                Ok(IsNull::No) => i32::try_from(out.len() - start - 4).ok(),
                Ok(IsNull::Yes) => continue,
                Err(_) => None,
            };
            match length {
                Some(length) => out[start..start + 4].copy_from_slice(&length.to_be_bytes()),
                None => {
                    out.truncate(start + 4);
                    mismatches.push(Mismatch {
                        table: table.to_owned(),
                        column: column.to_string(),
                        column_type: Some(*column_type),
                        value_type: *column_type,
                    });
                }
            }
        }
    }
    out.put_i16(TRAILER);
    out.freeze()
}

/// The Postgres type of a column of this type.
pub fn pg_type(ty: ColumnType) -> Type {
    match ty {
        ColumnType::Text => Type::TEXT,
        ColumnType::BigInt => Type::INT8,
        ColumnType::Double => Type::FLOAT8,
        ColumnType::Bool => Type::BOOL,
        ColumnType::Timestamp => Type::TIMESTAMPTZ,
    }
}
