//! Prefixed, time-sortable identifiers behind newtypes.
//!
//! Every id is `<prefix><32 lowercase hex>` where the hex is a UUIDv7, so ids
//! sort by creation time and match the original's `<prefix> + 32 hex` shape
//! (`msg_…`, `evt_…`, `whd_…`). A newtype per aggregate keeps a message id
//! from being passed where a user id is expected.

use std::fmt;

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, postgres_types::ToSql, postgres_types::FromSql, serde::Serialize, serde::Deserialize)]
        #[postgres(transparent)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id prefix, including the underscore.
            pub const PREFIX: &'static str = $prefix;

            /// Mints a new, time-sortable id.
            pub fn new() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Parses an id received from outside; `None` unless it is the
            /// prefix followed by exactly 32 lowercase hex characters.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?;
                crate::secret::is_lower_hex(rest, 32).then(|| Self(s.to_owned()))
            }

            /// An id from 32 lowercase hex characters (e.g. a digest prefix).
            pub fn from_hex(hex: &str) -> Option<Self> {
                crate::secret::is_lower_hex(hex, 32).then(|| Self(format!("{}{}", $prefix, hex)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

define_id!(
    /// A user (account owner).
    UserId, "usr_");
define_id!(
    /// An API key row (not the key itself).
    ApiKeyId, "apk_");
define_id!(
    /// An inbound or outbound message.
    MessageId, "msg_");
define_id!(
    /// An event in the outbox.
    EventId, "evt_");
define_id!(
    /// An account-level webhook subscription.
    WebhookId, "wh_");
define_id!(
    /// One delivery of one event to one webhook.
    DeliveryId, "whd_");
define_id!(
    /// A per-user signing secret.
    SigningSecretId, "wsec_");
define_id!(
    /// An outbound mail-outbox delivery.
    MailDeliveryId, "mdl_");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_have_prefix_and_parse_back() {
        let id = MessageId::new();
        assert!(id.as_str().starts_with("msg_"));
        assert_eq!(id.as_str().len(), 4 + 32);
        assert_eq!(MessageId::parse(id.as_str()), Some(id));
    }

    #[test]
    fn parse_rejects_wrong_prefix_and_garbage() {
        assert!(MessageId::parse("evt_0123456789abcdef0123456789abcdef").is_none());
        assert!(MessageId::parse("msg_0123").is_none());
        assert!(MessageId::parse("msg_0123456789ABCDEF0123456789ABCDEF").is_none());
        assert!(MessageId::parse("").is_none());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = UserId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = UserId::new();
        assert!(a < b);
    }
}
