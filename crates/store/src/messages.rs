//! Messages: the read side of an agent's mailbox, its labels and the TTL
//! sweep. Rows are written by [`crate::inbound::ingest`] (inbound) and the
//! outbound aggregates.
//!
//! Tenancy: every function takes the owner **and** the agent and filters by
//! both, so another user's message (or one of another agent) is
//! [`StoreError::NotFound`] or simply absent from a list — never visible.
//! Expired rows (`expires_at <= now()`) are invisible to every read here,
//! even before the janitor deletes them.
//!
//! * **Listing** is keyset-paginated on `(created_at, id)` (the index
//!   `messages_agent_created_idx`), so pages are stable under concurrent
//!   inserts and ties in `created_at` are broken by id. It is **bounded**:
//!   filters no index answers (text, labels, most status combinations) are
//!   tested on at most [`SCAN_BUDGET`] rows per call, and the page says
//!   where the scan stopped, so a search costs the same on any mailbox.
//! * **Read-on-get** ([`get_marking_read`]): one guarded
//!   `UPDATE … WHERE inbox_status = 'unread' RETURNING`, so only the owner's
//!   unread inbound row flips to `read`.
//! * **Labels** ([`update_labels`]): one `UPDATE` computing the new set from
//!   the row it locked — concurrent updates never lose each other's labels.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};

use crate::{
    error::{Result, StoreError},
    ids::{MessageId, UserId},
};

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received by the agent.
    Inbound,
    /// Sent by the agent.
    Outbound,
}

impl Direction {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    /// Parses `inbound` / `outbound`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inbound" => Some(Direction::Inbound),
            "outbound" => Some(Direction::Outbound),
            _ => None,
        }
    }
}

/// Inbox state of an inbound message (outbound rows have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxStatus {
    /// Not fetched yet.
    Unread,
    /// Fetched at least once (`GET …/messages/{id}`).
    Read,
}

impl InboxStatus {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            InboxStatus::Unread => "unread",
            InboxStatus::Read => "read",
        }
    }

    /// Parses `unread` / `read`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unread" => Some(InboxStatus::Unread),
            "read" => Some(InboxStatus::Read),
            _ => None,
        }
    }
}

/// List order on `(created_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Newest first.
    #[default]
    Desc,
    /// Oldest first.
    Asc,
}

impl Sort {
    /// `desc` / `asc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sort::Desc => "desc",
            Sort::Asc => "asc",
        }
    }
}

/// What [`list`] returns. Every `Some`/non-empty field narrows the result;
/// the caller validates combinations (e.g. the API refuses a status filter
/// on outbound mail).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this direction; `None` = both.
    pub direction: Option<Direction>,
    /// Only rows with this inbox status (which excludes outbound rows);
    /// `None` = any.
    pub inbox_status: Option<InboxStatus>,
    /// Order.
    pub sort: Sort,
    /// Case-insensitive substring of the sender (matched literally: `%`,
    /// `_` and `\` are escaped).
    pub from: Option<String>,
    /// Case-insensitive substring of the subject (matched literally).
    pub subject_contains: Option<String>,
    /// Exact conversation id.
    pub conversation_id: Option<String>,
    /// The message carries all of these labels.
    pub labels: Vec<String>,
    /// `created_at >= since`.
    pub since: Option<OffsetDateTime>,
    /// `created_at < until`.
    pub until: Option<OffsetDateTime>,
}

/// A position in a listing: the last row a page returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// That row's `created_at`.
    pub created_at: OffsetDateTime,
    /// That row's id (breaks ties in `created_at`).
    pub id: MessageId,
}

/// A message as lists show it (no raw bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    /// `msg_…`
    pub id: MessageId,
    /// The agent it belongs to.
    pub agent_id: String,
    /// Direction.
    pub direction: Direction,
    /// Display sender; for outbound rows the agent's address.
    pub from: String,
    /// To addresses (empty when none were recorded).
    pub to: Vec<String>,
    /// Cc addresses, when recorded.
    pub cc: Option<Vec<String>>,
    /// Reply-To addresses, when present.
    pub reply_to: Option<Vec<String>>,
    /// Inbound: this delivery's RCPT; outbound: the first To.
    pub recipient: String,
    /// Decoded subject.
    pub subject: String,
    /// Conversation id (may be empty for legacy outbound rows).
    pub conversation_id: String,
    /// Inbound rows only.
    pub inbox_status: Option<InboxStatus>,
    /// `messages.status`: always `sent` for inbound rows, the delivery /
    /// approval state for outbound rows.
    pub status: String,
    /// Size of the raw message in octets (0 when not kept).
    pub size_bytes: i64,
    /// Labels, as stored.
    pub labels: Vec<String>,
    /// When it was stored.
    pub created_at: OffsetDateTime,
}

/// One message with its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The list fields.
    pub summary: MessageSummary,
    /// Bcc addresses (outbound only).
    pub bcc: Option<Vec<String>>,
    /// The raw RFC 5322 bytes (inbound).
    pub raw_message: Option<Vec<u8>>,
    /// The signed `X-E2A-Auth-*` header map (inbound).
    pub auth_headers: Option<Value>,
    /// SPF verdict recorded at receipt (inbound).
    pub spf_result: Option<String>,
    /// DKIM verdict recorded at receipt (inbound).
    pub dkim_result: Option<String>,
    /// DMARC verdict recorded at receipt (inbound).
    pub dmarc_result: Option<String>,
}

/// One page of [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// At most `limit` rows in the requested order.
    pub items: Vec<MessageSummary>,
    /// Where the next page starts: after the last item when more matches
    /// followed, or after the last row examined when the scan budget ran
    /// out first (the page may then be short or empty); `None` when the
    /// scan reached the end of the mailbox.
    pub next: Option<Position>,
}

/// Columns read into a [`MessageSummary`] (table alias `m`).
pub(crate) const SUMMARY_COLUMNS: &str = "m.id, m.agent_id, m.direction, m.sender, m.to_recipients, m.cc, \
     m.reply_to, m.recipient, m.subject, m.conversation_id, m.inbox_status, m.status, m.size_bytes, \
     m.labels, m.created_at";
/// Number of [`SUMMARY_COLUMNS`].
const SUMMARY_LEN: usize = 15;

const DETAIL_COLUMNS: &str = "m.id, m.agent_id, m.direction, m.sender, m.to_recipients, m.cc, \
     m.reply_to, m.recipient, m.subject, m.conversation_id, m.inbox_status, m.status, m.size_bytes, \
     m.labels, m.created_at, m.bcc, m.raw_message, m.auth_headers, m.spf_result, m.dkim_result, \
     m.dmarc_result";

/// Reads the [`SUMMARY_COLUMNS`] at the start of `r`.
pub(crate) fn summary_from_row(r: &Row) -> MessageSummary {
    let direction = Direction::parse(r.get(2)).unwrap_or(Direction::Inbound);
    let agent_id: String = r.get(1);
    let sender: String = r.get(3);
    let from = if direction == Direction::Outbound && sender.is_empty() {
        agent_id.clone()
    } else {
        sender
    };
    MessageSummary {
        id: r.get(0),
        agent_id,
        direction,
        from,
        to: r.get::<_, Option<Vec<String>>>(4).unwrap_or_default(),
        cc: r.get(5),
        reply_to: r.get(6),
        recipient: r.get(7),
        subject: r.get(8),
        conversation_id: r.get(9),
        inbox_status: r.get::<_, Option<&str>>(10).and_then(InboxStatus::parse),
        status: r.get(11),
        size_bytes: r.get(12),
        labels: r.get(13),
        created_at: r.get(14),
    }
}

fn detail_from_row(r: &Row) -> Message {
    Message {
        summary: summary_from_row(r),
        bcc: r.get(SUMMARY_LEN),
        raw_message: r.get(SUMMARY_LEN + 1),
        auth_headers: r.get(SUMMARY_LEN + 2),
        spf_result: r.get(SUMMARY_LEN + 3),
        dkim_result: r.get(SUMMARY_LEN + 4),
        dmarc_result: r.get(SUMMARY_LEN + 5),
    }
}

/// Escapes `%`, `_` and `\` so `s` matches literally inside an
/// `ILIKE … ESCAPE '\'` pattern, and wraps it in `%…%` (substring match).
pub fn like_substring(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('%');
    out
}

/// Most rows one [`list`] call returns.
pub const MAX_PAGE: i64 = 100;

/// Most rows of a mailbox one [`list`] call examines. Filters an index
/// cannot answer (sender and subject text, labels, a direction or inbox
/// status other than the inbound-unread default) are tested row by row
/// along the listing order, and the scan stops here even when the page is
/// not full: a search costs the same on a mailbox of a hundred messages or
/// of a million, well inside the statement timeout, and the caller resumes
/// from [`Page::next`].
pub const SCAN_BUDGET: i64 = 1000;

/// The statement [`list`] runs and its parameters (see [`list`] for the
/// shape). Columns: [`SUMMARY_COLUMNS`], then `hit` (the row matches
/// every filter) and `rn` (its 1-based position in the scan).
struct ListQuery<'a> {
    sql: String,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

/// Owns the values [`ListQuery`] borrows.
struct ListArgs<'a> {
    user_id: &'a UserId,
    agent_id: &'a str,
    filter: &'a ListFilter,
    after: Option<&'a Position>,
    from_pattern: Option<String>,
    subject_pattern: Option<String>,
    /// `budget` and `fetch` go into the SQL as literals (integers computed
    /// here, never client text): with `LIMIT $n` Postgres's generic plan
    /// looks costlier than a custom one, and it re-plans every execution.
    budget: i64,
    fetch: i64,
}

impl<'a> ListArgs<'a> {
    fn new(
        user_id: &'a UserId,
        agent_id: &'a str,
        filter: &'a ListFilter,
        after: Option<&'a Position>,
        limit: i64,
    ) -> Self {
        Self {
            user_id,
            agent_id,
            filter,
            after,
            from_pattern: filter.from.as_deref().map(like_substring),
            subject_pattern: filter.subject_contains.as_deref().map(like_substring),
            budget: SCAN_BUDGET,
            fetch: limit.clamp(1, MAX_PAGE) + 1,
        }
    }

    /// The scan walks one index of the agent in `(created_at, id)` order:
    /// the conversation index when a conversation is named, the partial
    /// inbound-unread index for the default inbox view, else the agent's
    /// whole listing index. Its range (agent, conversation, since, until,
    /// cursor) is index conditions; every other filter only decides `hit`.
    fn query(&'a self) -> ListQuery<'a> {
        let f = self.filter;
        let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![self.user_id, &self.agent_id];
        let mut scope = String::from("m.user_id = $1 AND m.agent_id = $2 AND m.expires_at > now()");
        // Row-by-row tests, ANDed into `hit`. Enum values are inlined as
        // literals (never user text) so the planner can match the partial
        // index of the default inbox view.
        let mut hit: Vec<String> = Vec::new();
        let unread_inbox =
            f.direction == Some(Direction::Inbound) && f.inbox_status == Some(InboxStatus::Unread);
        if let Some(cv) = &f.conversation_id {
            bind(
                &mut scope,
                &mut params,
                // `<> ''` lets a generic plan use the partial index.
                " AND m.conversation_id = $? AND m.conversation_id <> ''",
                cv,
            );
        }
        if unread_inbox && f.conversation_id.is_none() {
            scope.push_str(" AND m.direction = 'inbound' AND m.inbox_status = 'unread'");
        } else {
            if let Some(direction) = f.direction {
                hit.push(format!("m.direction = '{}'", direction.as_str()));
            }
            if let Some(status) = f.inbox_status {
                hit.push(format!("m.inbox_status = '{}'", status.as_str()));
            }
        }
        if let Some(since) = &f.since {
            bind(&mut scope, &mut params, " AND m.created_at >= $?", since);
        }
        if let Some(until) = &f.until {
            bind(&mut scope, &mut params, " AND m.created_at < $?", until);
        }
        let (cmp, order) = match f.sort {
            Sort::Desc => ("<", "DESC"),
            Sort::Asc => (">", "ASC"),
        };
        if let Some(pos) = self.after {
            bind(
                &mut scope,
                &mut params,
                &format!(" AND (m.created_at, m.id) {cmp} ($?"),
                &pos.created_at,
            );
            bind(&mut scope, &mut params, ", $?)", &pos.id);
        }
        let mut test = |clause: &str, value: &'a (dyn ToSql + Sync)| {
            let mut sql = String::new();
            bind(&mut sql, &mut params, clause, value);
            hit.push(sql);
        };
        if let Some(p) = &self.from_pattern {
            test("m.sender ILIKE $? ESCAPE '\\'", p);
        }
        if let Some(p) = &self.subject_pattern {
            test("m.subject ILIKE $? ESCAPE '\\'", p);
        }
        if !f.labels.is_empty() {
            test("m.labels @> $?::text[]", &f.labels);
        }
        if hit.is_empty() {
            // Every examined row matches: the page is the first `fetch`
            // index entries, no window and no budget (`fetch` is at most
            // MAX_PAGE + 1, below the budget). `rn` 0 never marks a stop.
            let mut sql = format!(
                "SELECT {SUMMARY_COLUMNS}, true AS hit, 0::bigint AS rn \
                 FROM messages m WHERE {scope} ORDER BY m.created_at {order}, m.id {order}"
            );
            sql.push_str(&format!(" LIMIT {}", self.fetch));
            return ListQuery { sql, params };
        }
        let hit = format!("COALESCE({}, false)", hit.join(" AND "));
        // The window numbers the rows in scan order as they stream past
        // (no sort: the index delivers them in this order), the inner
        // LIMIT ends the scan at the budget, the outer one at `fetch` hits.
        let order_by = format!("created_at {order}, id {order}");
        let m_order_by = format!("m.created_at {order}, m.id {order}");
        let outer_columns = SUMMARY_COLUMNS.replace("m.", "w.");
        let mut sql = format!(
            "SELECT {outer_columns}, w.hit, w.rn FROM ( \
               SELECT {SUMMARY_COLUMNS}, {hit} AS hit, \
                      row_number() OVER (ORDER BY {m_order_by}) AS rn \
               FROM messages m WHERE {scope} \
               ORDER BY {m_order_by}"
        );
        sql.push_str(&format!(
            " LIMIT {budget}) w WHERE w.hit OR w.rn = {budget} ORDER BY w.{order_by} LIMIT {fetch}",
            budget = self.budget,
            fetch = self.fetch,
        ));
        ListQuery { sql, params }
    }
}

/// One page of `agent_id`'s messages (owner `user_id`) matching `filter`,
/// in `filter.sort` order on `(created_at, id)`, starting strictly after
/// `after` (the previous page's [`Page::next`]).
///
/// Bounded: one statement walks one of the agent's indexes in listing
/// order (see [`SCAN_BUDGET`]) and stops at whichever comes first —
/// `limit + 1` matching rows, [`SCAN_BUDGET`] rows examined, or the end of
/// the mailbox. So:
///
/// * more than `limit` matches: the first `limit` are returned and
///   [`Page::next`] is the last of them;
/// * the budget ran out first: the matches found (possibly none) are
///   returned and [`Page::next`] is the last row *examined*, so the next
///   call continues the scan where this one stopped;
/// * the mailbox ended first: [`Page::next`] is `None`.
///
/// Without a row-by-row filter every examined row matches and a page costs
/// `limit + 1` index entries. `limit` is clamped to `1..=`[`MAX_PAGE`]. An
/// unknown agent or another user's agent yields an empty page (check
/// ownership first when that must be a 404).
pub async fn list(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    filter: &ListFilter,
    after: Option<&Position>,
    limit: i64,
) -> Result<Page> {
    let limit = limit.clamp(1, MAX_PAGE);
    let args = ListArgs::new(user_id, agent_id, filter, after, limit);
    let q = args.query();
    let stmt = c.prepare_cached(&q.sql).await?;
    let rows = c.query(&stmt, &q.params).await?;
    let hit_col = SUMMARY_LEN;
    let position = |r: &Row| Position {
        created_at: r.get(14),
        id: r.get(0),
    };
    let mut items = Vec::with_capacity(rows.len());
    let mut stopped_at = None;
    for row in &rows {
        if row.get::<_, bool>(hit_col) {
            items.push(summary_from_row(row));
        }
        if row.get::<_, i64>(hit_col + 1) == args.budget {
            stopped_at = Some(position(row));
        }
    }
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|m| Position {
            created_at: m.created_at,
            id: m.id.clone(),
        })
    } else {
        stopped_at
    };
    Ok(Page { items, next })
}

/// The plan of exactly the statement [`list`] runs for these arguments,
/// executed: `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`. For tests and
/// diagnosis; like [`list`] it only reads.
pub async fn explain_list(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    filter: &ListFilter,
    after: Option<&Position>,
    limit: i64,
) -> Result<Value> {
    let args = ListArgs::new(user_id, agent_id, filter, after, limit);
    let q = args.query();
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", q.sql);
    let row = c.query_one(&sql, &q.params).await?;
    Ok(row.get(0))
}

/// Appends `clause` with its `$?` replaced by the next parameter number.
fn bind<'a>(
    sql: &mut String,
    params: &mut Vec<&'a (dyn ToSql + Sync)>,
    clause: &str,
    value: &'a (dyn ToSql + Sync),
) {
    params.push(value);
    sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
}

/// The owner's message `id` of agent `agent_id`, with its content.
///
/// Read-on-get (the contract's behaviour): an `unread` inbound row is
/// flipped to `read` by one guarded `UPDATE … WHERE user_id AND agent_id AND
/// inbox_status = 'unread' RETURNING`, and the returned message shows the
/// new state. Other rows are only read. [`StoreError::NotFound`] when the
/// message is missing, expired, another agent's or another user's — and
/// then nothing was written.
pub async fn get_marking_read(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    id: &MessageId,
) -> Result<Message> {
    let update = format!(
        "UPDATE messages AS m SET inbox_status = 'read' \
         WHERE m.id = $1 AND m.user_id = $2 AND m.agent_id = $3 AND m.expires_at > now() \
           AND m.inbox_status = 'unread' \
         RETURNING {DETAIL_COLUMNS}"
    );
    let stmt = c.prepare_cached(&update).await?;
    if let Some(row) = c.query_opt(&stmt, &[id, user_id, &agent_id]).await? {
        return Ok(detail_from_row(&row));
    }
    get(c, user_id, agent_id, id).await
}

/// The owner's message `id` of agent `agent_id`, read only (no inbox state
/// change). [`StoreError::NotFound`] as for [`get_marking_read`].
pub async fn get(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    id: &MessageId,
) -> Result<Message> {
    let select = format!(
        "SELECT {DETAIL_COLUMNS} FROM messages m \
         WHERE m.id = $1 AND m.user_id = $2 AND m.agent_id = $3 AND m.expires_at > now()"
    );
    let stmt = c.prepare_cached(&select).await?;
    c.query_opt(&stmt, &[id, user_id, &agent_id])
        .await?
        .map(|r| detail_from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// Prefix reserved for labels the server applies; refused on writes,
/// allowed in filters.
pub const RESERVED_LABEL_PREFIX: &str = "e2a:";
/// Most labels one message carries (also a CHECK on the table).
pub const MAX_LABELS_PER_MESSAGE: usize = 100;
/// Most labels one add or remove list may name.
pub const MAX_LABELS_PER_REQUEST: usize = 50;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 64;

/// True for a well-formed label: 1–64 characters of `[a-z0-9:_-]`.
pub fn is_valid_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'_' | b'-')
        })
}

/// Checks one add or remove list as a write: at most
/// [`MAX_LABELS_PER_REQUEST`] well-formed labels, none with the reserved
/// prefix. [`StoreError::Invalid`] names the first problem.
pub fn check_label_writes(field: &str, labels: &[String]) -> Result<()> {
    if labels.len() > MAX_LABELS_PER_REQUEST {
        return Err(StoreError::Invalid(format!(
            "{field} may name at most {MAX_LABELS_PER_REQUEST} labels"
        )));
    }
    for label in labels {
        if !is_valid_label(label) {
            return Err(StoreError::Invalid(format!(
                "{field}: labels are 1-{MAX_LABEL_LEN} characters of a-z, 0-9, ':', '_' and '-'"
            )));
        }
        if label.starts_with(RESERVED_LABEL_PREFIX) {
            return Err(StoreError::Invalid(format!(
                "{field}: the {RESERVED_LABEL_PREFIX:?} prefix is reserved for server-applied labels"
            )));
        }
    }
    Ok(())
}

/// Adds then removes labels on the owner's message (remove wins when a
/// label is in both lists) and returns the new set, sorted and deduplicated.
///
/// Atomic: one `UPDATE` computes the set from the row it has locked, so
/// concurrent updates of the same message serialise and none is lost.
/// [`StoreError::Invalid`] for a malformed list (see
/// [`check_label_writes`]) or when the message would carry more than
/// [`MAX_LABELS_PER_MESSAGE`] labels (nothing is written);
/// [`StoreError::NotFound`] as for [`get`].
pub async fn update_labels(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    id: &MessageId,
    add: &[String],
    remove: &[String],
) -> Result<Vec<String>> {
    check_label_writes("add_labels", add)?;
    check_label_writes("remove_labels", remove)?;
    let stmt = c
        .prepare_cached(
            "UPDATE messages AS m SET labels = ARRAY( \
               SELECT DISTINCT l FROM unnest(m.labels || $4::text[]) AS u(l) \
               WHERE NOT (l = ANY($5::text[])) ORDER BY l) \
             WHERE m.id = $1 AND m.user_id = $2 AND m.agent_id = $3 AND m.expires_at > now() \
             RETURNING m.labels",
        )
        .await?;
    match c
        .query_opt(&stmt, &[id, user_id, &agent_id, &add, &remove])
        .await
    {
        Ok(Some(row)) => Ok(row.get(0)),
        Ok(None) => Err(StoreError::NotFound),
        Err(e)
            if e.as_db_error().and_then(|d| d.constraint())
                == Some("messages_labels_max_check") =>
        {
            Err(StoreError::Invalid(format!(
                "a message can carry at most {MAX_LABELS_PER_MESSAGE} labels"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes up to `batch` expired messages (`expires_at <= now()`) of any
/// tenant and returns how many went. Held drafts (`pending_approval`) are
/// left for the HITL expiry worker.
///
/// Safe with several janitors at once: candidates are claimed with
/// `FOR UPDATE SKIP LOCKED`, so concurrent sweeps take disjoint batches and
/// never wait on each other or on a request holding a row. Call it in a
/// loop until it returns less than `batch`.
pub async fn delete_expired(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "WITH doomed AS ( \
               SELECT id FROM messages \
               WHERE expires_at <= now() AND status <> 'pending_approval' \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             DELETE FROM messages m USING doomed d WHERE m.id = d.id",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch.max(1)]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_substring("a%b_c\\d"), "%a\\%b\\_c\\\\d%");
        assert_eq!(like_substring(""), "%%");
    }

    #[test]
    fn labels_are_checked() {
        assert!(is_valid_label("triage:urgent_1-x"));
        for bad in ["", "Upper", "sp ace", "é", &"a".repeat(65)] {
            assert!(!is_valid_label(bad), "{bad:?}");
        }
        assert!(check_label_writes("add_labels", &["e2a:spam".into()]).is_err());
        assert!(check_label_writes("add_labels", &vec!["x".to_owned(); 51]).is_err());
        assert!(check_label_writes("add_labels", &vec!["x".to_owned(); 50]).is_ok());
    }
}
