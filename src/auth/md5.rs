//! PostgreSQL's md5 password scheme: `"md5" || md5(md5(password || user) || salt)`.

use md5::{Digest, Md5};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The stored form, `md5` + md5(password || user).
pub fn stored_hash(password: &str, user: &str) -> String {
    format!("md5{}", hex_md5(&[password.as_bytes(), user.as_bytes()]))
}

/// The answer to an AuthenticationMD5Password challenge, from the stored form.
pub fn salted_response(stored: &str, salt: &[u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    format!("md5{}", hex_md5(&[inner.as_bytes(), salt]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        let ours = salted_response(&stored_hash("secret", "app"), &salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"app", b"secret", salt);
        assert_eq!(ours, theirs);
    }
}
