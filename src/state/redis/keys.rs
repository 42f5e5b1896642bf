//! The key layout (written down in docs/operations.md). Every key of one user carries the
//! hash tag `{u:<user>}`, one instance's keys `{i:<instance>}`, one group's `{g:<group>}`:
//! Redis Cluster keeps each on one shard, so a script may touch all of a user's keys.

pub struct Keys {
    prefix: String,
}

/// A user's inbox keys, in the order the inbox scripts expect them as KEYS.
pub type InboxKeys = [String; 6];

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    fn user(&self, user: &str, what: &str) -> String {
        format!("{}{{u:{user}}}:{what}", self.prefix)
    }

    /// meta, entries, dedupe seq, dedupe time, device cursors, device ack order.
    pub fn inbox(&self, user: &str) -> InboxKeys {
        ["m", "q", "dd", "dt", "c", "co"].map(|w| self.user(user, w))
    }

    pub fn revoked(&self, user: &str) -> String {
        self.user(user, "r")
    }

    pub fn presence(&self, user: &str) -> String {
        self.user(user, "p")
    }

    /// The connections an instance holds (for `remove_instance`).
    pub fn instance_conns(&self, instance: &str) -> String {
        format!("{}{{i:{instance}}}:conns", self.prefix)
    }

    /// Present while the instance refreshes it (`maintain`).
    pub fn instance_alive(&self, instance: &str) -> String {
        format!("{}{{i:{instance}}}:alive", self.prefix)
    }

    pub fn group(&self, group: &str) -> String {
        format!("{}{{g:{group}}}:members", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hash_tag_per_user() {
        let k = Keys::new("imgate:");
        assert_eq!(
            k.inbox("alice"),
            [
                "imgate:{u:alice}:m",
                "imgate:{u:alice}:q",
                "imgate:{u:alice}:dd",
                "imgate:{u:alice}:dt",
                "imgate:{u:alice}:c",
                "imgate:{u:alice}:co"
            ]
        );
        assert_eq!(k.revoked("alice"), "imgate:{u:alice}:r");
        assert_eq!(k.presence("alice"), "imgate:{u:alice}:p");
        assert_eq!(k.instance_alive("gw-1"), "imgate:{i:gw-1}:alive");
        assert_eq!(k.group("g"), "imgate:{g:g}:members");
    }
}
