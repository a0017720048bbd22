//! How a SQLite row lives in etcd: its key
//! (`{prefix}v1/{table}/{primary key, percent-encoded, '/'-joined}`) and its
//! value, a protobuf `Row` (every column by name with its typed value, in
//! `pragma table_info` order; the observed columns of [`observed_column`] left out).
//! Everything read back from etcd is untrusted: a key or value that does
//! not decode is an error, never a default.

use rusqlite::Connection;
use rusqlite::types::Value;
use sha2::{Digest, Sha256};

use super::EtcdError;

/// One column and its value (no value: SQL NULL).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Col {
    /// Column name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The value.
    #[prost(oneof = "Val", tags = "2, 3, 4, 5")]
    pub val: Option<Val>,
}

/// A typed SQLite value.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Val {
    /// INTEGER.
    #[prost(sint64, tag = "2")]
    Int(i64),
    /// TEXT.
    #[prost(string, tag = "3")]
    Text(String),
    /// BLOB.
    #[prost(bytes = "vec", tag = "4")]
    Blob(Vec<u8>),
    /// REAL.
    #[prost(double, tag = "5")]
    Real(f64),
}

/// One row: the value of its etcd key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    /// Its columns.
    #[prost(message, repeated, tag = "1")]
    pub cols: Vec<Col>,
}

/// Columns that are observed state: kept in the cache, never replicated
/// (a replica sets them to its load time). `hosts.last_seen_ms`: when the
/// host was last heard from; `guests.updated_ms`: when its report last
/// changed, so writing an unchanged report again writes nothing to etcd.
pub(crate) fn observed_column(table: &str, col: &str) -> bool {
    matches!((table, col), ("hosts", "last_seen_ms") | ("guests", "updated_ms"))
}

/// A table's shape, read from the cache's schema.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub name: String,
    /// (name, declared type upper-cased).
    pub cols: Vec<(String, String)>,
    /// Primary-key columns in key order.
    pub pk: Vec<String>,
}

impl Table {
    fn col_type(&self, name: &str) -> Option<&str> {
        self.cols.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }
}

/// Every replicated table of the schema (sqlite's own tables left out).
pub(crate) fn tables(conn: &Connection) -> Result<Vec<Table>, EtcdError> {
    let mut st = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name NOT LIKE 'lb_%' ORDER BY name",
    )?;
    let names: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for name in names {
        let mut st = conn.prepare(&format!("PRAGMA main.table_info({})", quote(&name)))?;
        let mut cols = Vec::new();
        let mut pk: Vec<(i64, String)> = Vec::new();
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(5)?)))?;
        for row in rows {
            let (c, ty, k) = row?;
            if k > 0 {
                pk.push((k, c.clone()));
            }
            cols.push((c, ty.to_ascii_uppercase()));
        }
        pk.sort();
        if pk.is_empty() {
            return Err(EtcdError::Schema(format!("table {name} has no primary key: it cannot be keyed in etcd")));
        }
        out.push(Table { name, cols, pk: pk.into_iter().map(|(_, c)| c).collect() });
    }
    Ok(out)
}

/// An SQL identifier, quoted.
pub(crate) fn quote(id: &str) -> String {
    format!("\"{}\"", id.replace('"', "\"\""))
}

fn pct(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn unpct(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The text of one key part.
fn part_text(v: &Value) -> Result<String, EtcdError> {
    match v {
        Value::Integer(i) => Ok(i.to_string()),
        Value::Text(s) => Ok(s.clone()),
        other => Err(EtcdError::Schema(format!("a primary key value of type {:?} cannot be keyed", other.data_type()))),
    }
}

/// The etcd key of a row: `{prefix}v1/{table}/{pk parts}`.
pub(crate) fn key(prefix: &str, table: &str, pk: &[Value]) -> Result<String, EtcdError> {
    let mut k = format!("{prefix}v1/");
    pct(table, &mut k);
    for v in pk {
        k.push('/');
        pct(&part_text(v)?, &mut k);
    }
    Ok(k)
}

/// The table and primary-key values a key names (`None`: not a row key
/// of a table this schema has, or a part that does not read).
pub(crate) fn parse_key<'t>(prefix: &str, tables: &'t [Table], k: &[u8]) -> Option<(&'t Table, Vec<Value>)> {
    let k = std::str::from_utf8(k).ok()?;
    let rest = k.strip_prefix(prefix)?.strip_prefix("v1/")?;
    let mut parts = rest.split('/');
    let tname = unpct(parts.next()?)?;
    let t = tables.iter().find(|t| t.name == tname)?;
    let parts: Vec<&str> = parts.collect();
    if parts.len() != t.pk.len() {
        return None;
    }
    let mut vals = Vec::new();
    for (p, c) in parts.iter().zip(&t.pk) {
        let s = unpct(p)?;
        if t.col_type(c)?.contains("INT") {
            vals.push(Value::Integer(s.parse().ok()?));
        } else {
            vals.push(Value::Text(s));
        }
    }
    Some((t, vals))
}

/// A SQLite value as a column value.
fn to_val(v: Value) -> Option<Val> {
    match v {
        Value::Null => None,
        Value::Integer(i) => Some(Val::Int(i)),
        Value::Real(f) => Some(Val::Real(f)),
        Value::Text(s) => Some(Val::Text(s)),
        Value::Blob(b) => Some(Val::Blob(b)),
    }
}

fn from_val(v: Option<Val>) -> Value {
    match v {
        None => Value::Null,
        Some(Val::Int(i)) => Value::Integer(i),
        Some(Val::Real(f)) => Value::Real(f),
        Some(Val::Text(s)) => Value::Text(s),
        Some(Val::Blob(b)) => Value::Blob(b),
    }
}

/// A row of the cache (looked up by primary key), encoded; `None` when the
/// row is gone.
pub(crate) fn encode_row(conn: &Connection, t: &Table, pk: &[Value]) -> Result<Option<Vec<u8>>, EtcdError> {
    let cols: Vec<&(String, String)> = t.cols.iter().filter(|(c, _)| !observed_column(&t.name, c)).collect();
    let list = cols.iter().map(|(c, _)| quote(c)).collect::<Vec<_>>().join(", ");
    let cond = t.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", quote(c), i + 1)).collect::<Vec<_>>();
    let sql = format!("SELECT {list} FROM main.{} WHERE {}", quote(&t.name), cond.join(" AND "));
    let mut st = conn.prepare_cached(&sql)?;
    let mut rows = st.query(rusqlite::params_from_iter(pk.iter()))?;
    let Some(r) = rows.next()? else { return Ok(None) };
    let mut row = Row { cols: Vec::with_capacity(cols.len()) };
    for (i, (c, _)) in cols.iter().enumerate() {
        row.cols.push(Col { name: c.clone(), val: to_val(r.get::<_, Value>(i)?) });
    }
    Ok(Some(prost::Message::encode_to_vec(&row)))
}

/// Every row of a table, keyed and encoded (import, tests).
pub(crate) fn encode_table(conn: &Connection, prefix: &str, t: &Table) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
    let sql =
        format!("SELECT {} FROM main.{}", t.pk.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "), quote(&t.name));
    let mut st = conn.prepare(&sql)?;
    let n = t.pk.len();
    let pks: Vec<Vec<Value>> = st
        .query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>())?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(pks.len());
    for pk in pks {
        if let Some(v) = encode_row(conn, t, &pk)? {
            out.push((key(prefix, &t.name, &pk)?, v));
        }
    }
    Ok(out)
}

/// Writes a row read from etcd into the cache (replacing the row with its
/// key). Refuses a value that does not decode, names a column the table
/// does not have, or whose primary key is not the one its key names.
pub(crate) fn apply_put(conn: &Connection, t: &Table, pk: &[Value], value: &[u8], now_ms: i64) -> Result<(), String> {
    let row: Row = prost::Message::decode(value).map_err(|e| format!("value does not decode: {e}"))?;
    let mut names = Vec::new();
    let mut vals = Vec::new();
    for c in row.cols {
        if t.col_type(&c.name).is_none() || observed_column(&t.name, &c.name) {
            return Err(format!("column {:?} is not a replicated column of {}", c.name, t.name));
        }
        if names.contains(&c.name) {
            return Err(format!("column {:?} appears twice", c.name));
        }
        names.push(c.name);
        vals.push(from_val(c.val));
    }
    for (c, want) in t.pk.iter().zip(pk) {
        let got = names.iter().position(|n| n == c).map(|i| &vals[i]);
        let same = match (got, want) {
            (Some(Value::Integer(a)), Value::Integer(b)) => a == b,
            (Some(Value::Text(a)), Value::Text(b)) => a == b,
            _ => false,
        };
        if !same {
            return Err(format!("its {c} is not the one its key names"));
        }
    }
    for (c, _) in &t.cols {
        if observed_column(&t.name, c) {
            names.push(c.clone());
            vals.push(Value::Integer(now_ms));
        }
    }
    let sql = format!(
        "INSERT OR REPLACE INTO main.{} ({}) VALUES ({})",
        quote(&t.name),
        names.iter().map(|n| quote(n)).collect::<Vec<_>>().join(", "),
        (1..=names.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    );
    conn.prepare_cached(&sql)
        .and_then(|mut st| st.execute(rusqlite::params_from_iter(vals.iter())))
        .map_err(|e| format!("cache refused the row: {e}"))?;
    Ok(())
}

/// Removes a row deleted in etcd from the cache.
pub(crate) fn apply_delete(conn: &Connection, t: &Table, pk: &[Value]) -> Result<(), String> {
    let cond = t.pk.iter().enumerate().map(|(i, c)| format!("{} = ?{}", quote(c), i + 1)).collect::<Vec<_>>();
    let sql = format!("DELETE FROM main.{} WHERE {}", quote(&t.name), cond.join(" AND "));
    conn.prepare_cached(&sql)
        .and_then(|mut st| st.execute(rusqlite::params_from_iter(pk.iter())))
        .map_err(|e| format!("cache refused the delete: {e}"))?;
    Ok(())
}

/// The digest kept per key to skip writing a value etcd already holds.
pub(crate) fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strange_keys_do_not_parse() {
        let s = crate::store::Store::open_in_memory().unwrap();
        let t = tables(s.conn()).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"hosts") && names.contains(&"audit") && names.contains(&"moves"), "{names:?}");
        let k = key("/lb/", "guests", &[Value::Text("h/1 %".into()), Value::Text("u".into())]).unwrap();
        assert_eq!(k, "/lb/v1/guests/h%2F1%20%25/u");
        let (tb, pk) = parse_key("/lb/", &t, k.as_bytes()).unwrap();
        assert_eq!(tb.name, "guests");
        assert_eq!(pk, vec![Value::Text("h/1 %".into()), Value::Text("u".into())]);
        let (tb, pk) = parse_key("/lb/", &t, b"/lb/v1/audit/42").unwrap();
        assert_eq!((tb.name.as_str(), pk), ("audit", vec![Value::Integer(42)]));
        for bad in
            [&b"/lb/v1/audit/x"[..], b"/lb/v1/nope/1", b"/lb/v1/guests/h", b"/lb/v1/guests/h/u/v", b"/x/v1/audit/1"]
        {
            assert!(parse_key("/lb/", &t, bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_key("/lb/", &t, b"/lb/v1/hosts/%G1").is_none());
        assert!(parse_key("/lb/", &t, &[0xff, 0xfe]).is_none());
    }
}
