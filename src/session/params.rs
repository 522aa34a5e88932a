//! Compact name/value pairs for what every session keeps.

/// Name/value pairs as one string, `name\0value\0...`: a session keeps a dozen
/// ParameterStatus values and its startup parameters for as long as it lives, and
/// one allocation instead of two dozen matters per idle session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(String);

impl Params {
    pub fn from(pairs: &[(String, String)]) -> Params {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.set(k, v);
        }
        p
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.0.split('\0');
        std::iter::from_fn(move || Some((parts.next().filter(|k| !k.is_empty())?, parts.next()?)))
    }

    pub fn to_vec(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn set(&mut self, name: &str, value: &str) {
        if self.get(name) == Some(value) {
            return;
        }
        let mut next = String::with_capacity(self.0.len() + name.len() + value.len() + 2);
        for (k, v) in self.iter().filter(|(k, _)| *k != name) {
            next.extend([k, "\0", v, "\0"]);
        }
        next.extend([name, "\0", value, "\0"]);
        self.0 = next;
    }
}

#[cfg(test)]
mod tests {
    use super::Params;

    #[test]
    fn params_keep_one_value_per_name() {
        let mut p = Params::from(&[("a".into(), "1".into()), ("b".into(), "".into())]);
        p.set("a", "2");
        p.set("c", "3");
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![("b", ""), ("a", "2"), ("c", "3")]);
        assert_eq!(p.get("b"), Some(""));
        assert_eq!(p.get("z"), None);
    }
}
