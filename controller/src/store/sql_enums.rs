//! The domain's enums in SQLite: each is stored as its one exact name
//! (TEXT) and read back strictly. A value that is not a known name, or not
//! text, is a conversion failure, which the row readers turn into
//! [`StoreError::CorruptValue`] naming the row: never a default.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use super::StoreError;
use crate::domain::UnknownValue;
use crate::domain::host::HostStatus;
use crate::domain::job::{JobState, MoveState};
use crate::domain::{JobKind, PowerEvidence};

/// Reads a TEXT value and parses it with `parse`; anything else fails.
fn text_value<T>(v: ValueRef<'_>, parse: impl FnOnce(&str) -> Result<T, UnknownValue>) -> FromSqlResult<T> {
    let s = v.as_str()?;
    parse(s).map_err(|e| FromSqlError::Other(Box::new(e)))
}

macro_rules! sql_named {
    ($t:ty, $parse:expr) => {
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }
        impl FromSql for $t {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                text_value(v, $parse)
            }
        }
    };
}

sql_named!(JobKind, |s| s.parse::<JobKind>());
sql_named!(PowerEvidence, |s| s.parse::<PowerEvidence>());
sql_named!(HostStatus, HostStatus::from_name);
sql_named!(JobState, |s| s.parse::<JobState>().map_err(|_| UnknownValue::new("job state", s)));
sql_named!(MoveState, |s| s.parse::<MoveState>().map_err(|_| UnknownValue::new("move state", s)));

/// Column `i` of `r` as `T`; a value that does not convert is
/// [`StoreError::CorruptValue`] naming `table`, the row's `key` and
/// `column`, with the value as found.
pub(super) fn col<T: FromSql>(
    r: &rusqlite::Row<'_>,
    i: usize,
    table: &'static str,
    key: &str,
    column: &'static str,
) -> Result<T, StoreError> {
    let corrupt =
        |value: String| StoreError::CorruptValue { table, key: key.chars().take(128).collect(), column, value };
    match r.get::<_, T>(i) {
        Ok(v) => Ok(v),
        Err(rusqlite::Error::FromSqlConversionFailure(_, _, e)) => {
            Err(corrupt(e.downcast_ref::<UnknownValue>().map_or_else(|| e.to_string(), |u| u.value.clone())))
        }
        Err(rusqlite::Error::InvalidColumnType(_, _, ty)) => Err(corrupt(format!("<{ty}>"))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: ToSql + FromSql + PartialEq + std::fmt::Debug>(v: T) {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let back: T = c.query_row("SELECT ?1", [&v], |r| r.get(0)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn every_value_round_trips() {
        JobKind::ALL.iter().for_each(|v| round_trip(*v));
        PowerEvidence::ALL.iter().for_each(|v| round_trip(*v));
        HostStatus::ALL.iter().for_each(|v| round_trip(*v));
        JobState::ALL.iter().for_each(|v| round_trip(*v));
        MoveState::ALL.iter().for_each(|v| round_trip(*v));
    }

    #[test]
    fn unknown_or_non_text_values_are_corrupt_naming_the_row() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for (sql, want) in [("SELECT 'available'", "available"), ("SELECT 7", "<Integer>"), ("SELECT NULL", "<Null>")] {
            let e =
                c.query_row(sql, [], |r| Ok(col::<HostStatus>(r, 0, "hosts", "h1", "status"))).unwrap().unwrap_err();
            match e {
                StoreError::CorruptValue { table: "hosts", key, column: "status", value } => {
                    assert_eq!((key.as_str(), value.as_str()), ("h1", want));
                }
                e => panic!("{e}"),
            }
        }
        let e = c.query_row("SELECT 'DONE'", [], |r| Ok(col::<JobState>(r, 0, "jobs", "j1", "state"))).unwrap();
        assert!(e.unwrap_err().to_string().contains("jobs (j1): column state holds \"DONE\""));
    }
}
