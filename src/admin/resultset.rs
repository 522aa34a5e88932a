//! Result sets for the admin console: RowDescription, DataRows, CommandComplete, all
//! columns of type text.

use bytes::{BufMut, BytesMut};

use crate::protocol::write;

const TEXT_OID: u32 = 25;

pub struct ResultSet {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
    tag: String,
}

impl ResultSet {
    pub fn new(columns: &[&'static str]) -> ResultSet {
        ResultSet { columns: columns.to_vec(), rows: Vec::new(), tag: String::new() }
    }

    /// A two-column `name | value` set.
    pub fn key_values<K: Into<String>>(pairs: Vec<(K, String)>) -> ResultSet {
        let mut rs = ResultSet::new(&["name", "value"]);
        for (k, v) in pairs {
            rs.row(vec![Some(k.into()), Some(v)]);
        }
        rs
    }

    pub fn row(&mut self, values: Vec<Option<String>>) {
        self.rows.push(values);
    }

    pub fn rows(&self) -> Vec<Vec<Option<String>>> {
        self.rows.clone()
    }

    /// The value of `name` in a `name | value` set.
    pub fn value(&self, name: &str) -> Option<String> {
        self.rows.iter().find(|r| r.first().and_then(|v| v.as_deref()) == Some(name)).and_then(|r| r.get(1).cloned().flatten())
    }

    pub fn tag(mut self, tag: impl Into<String>) -> ResultSet {
        self.tag = tag.into();
        self
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        body.put_u16(self.columns.len() as u16);
        for name in &self.columns {
            body.put_slice(name.as_bytes());
            body.put_u8(0);
            body.put_u32(0); // table oid
            body.put_u16(0); // column number
            body.put_u32(TEXT_OID);
            body.put_i16(-1); // variable length
            body.put_i32(-1); // type modifier
            body.put_u16(0); // text format
        }
        write::frontend_message(out, b'T', &body);
        for row in &self.rows {
            body.clear();
            body.put_u16(row.len() as u16);
            for value in row {
                match value {
                    Some(v) => {
                        body.put_u32(v.len() as u32);
                        body.put_slice(v.as_bytes());
                    }
                    None => body.put_i32(-1),
                }
            }
            write::frontend_message(out, b'D', &body);
        }
        let tag = if self.tag.is_empty() { format!("SHOW {}", self.rows.len()) } else { self.tag.clone() };
        let mut t = tag.into_bytes();
        t.push(0);
        write::frontend_message(out, b'C', &t);
    }
}
