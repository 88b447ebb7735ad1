//! Opaque page cursors over a `(created_at, id)` order: the base64url (no
//! padding) of `{"c": <created_at, RFC 3339 in UTC, every digit>, "i": <id>}`
//! (spec §4.7). Anything else a client sends is `400 invalid_cursor`.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

use crate::{error::ApiError, extract::parse_rfc3339};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursor {
    c: String,
    i: String,
}

/// `400 invalid_cursor`.
pub fn invalid() -> ApiError {
    ApiError::bad_request("invalid_cursor", "cursor is malformed")
}

/// The cursor of the row at `created_at` with `id`.
pub fn encode(created_at: OffsetDateTime, id: &str) -> String {
    let cursor = Cursor {
        c: created_at
            .checked_to_offset(UtcOffset::UTC)
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default(),
        i: id.to_owned(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&cursor).unwrap_or_default())
}

/// The `(created_at, id)` of a cursor, the id checked by `parse_id`.
pub fn decode<T>(
    raw: &str,
    parse_id: impl FnOnce(&str) -> Option<T>,
) -> Result<(OffsetDateTime, T), ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(raw.trim_end_matches('='))
        .map_err(|_| invalid())?;
    let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let created_at = parse_rfc3339(&cursor.c).ok_or_else(invalid)?;
    Ok((created_at, parse_id(&cursor.i).ok_or_else(invalid)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_invalid() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_780_000_000_123_456_789).unwrap();
        let raw = encode(at, "evt_1");
        assert_eq!(
            decode(&raw, |s| Some(s.to_owned())).unwrap(),
            (at, "evt_1".to_owned())
        );
        for bad in [
            "",
            "!!",
            "e30",
            &URL_SAFE_NO_PAD.encode(br#"{"c":"x","i":"y"}"#),
        ] {
            assert!(decode(bad, |s| Some(s.to_owned())).is_err(), "{bad}");
        }
        assert!(decode(&raw, |_| None::<String>).is_err());
    }
}
