-- V9: one busy tenant's ingest scales with its concurrent sessions.
--
-- Until now every message insert of a tenant upserted the tenant's single
-- account_usage row and held that row lock until commit, so all concurrent
-- SMTP sessions of one customer queued behind each other; and every insert
-- also took a FOR KEY SHARE lock on the tenant's users row for the
-- redundant messages -> users foreign key.
--
-- 1. account_usage is spread over slots: a tenant has up to 64 counter rows,
--    (user_id, slot), and a transaction writes the slot of its database
--    connection (pg_backend_pid() % 64). Concurrent sessions on different
--    connections therefore touch different rows. A tenant's usage is the sum
--    of its slots: storage is floored at 0 when read, this month's count sums
--    the slots whose month_start is the current UTC month. Sums are exact at
--    every moment; nothing needs folding. Decrements (deletes, body scrubs)
--    go to the connection's slot when the tenant has one and otherwise to the
--    tenant's lowest slot, and never create a row (a user being deleted has
--    its counters cascaded away, and a new row would point at it).
-- 2. messages_user_id_fkey is dropped: messages_agent_fkey (agent_id,
--    user_id) -> agents (id, user_id) already guarantees the user exists
--    (agents -> users), and deleting a user cascades through agents to its
--    messages. One parent-row lock fewer per message.

ALTER TABLE messages DROP CONSTRAINT messages_user_id_fkey;

ALTER TABLE account_usage ADD COLUMN slot smallint NOT NULL DEFAULT 0;
ALTER TABLE account_usage DROP CONSTRAINT account_usage_pkey;
ALTER TABLE account_usage ADD CONSTRAINT account_usage_pkey PRIMARY KEY (user_id, slot);
-- A single slot may go below zero (a delete counted on another slot than the
-- insert); the tenant's sum cannot, and readers floor it at 0.
ALTER TABLE account_usage DROP CONSTRAINT account_usage_storage_bytes_check;
ALTER TABLE account_usage ADD CONSTRAINT account_usage_slot_check CHECK (slot BETWEEN 0 AND 63);

-- The counter slot of the current connection.
CREATE FUNCTION e2a_usage_slot() RETURNS smallint
    LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT (pg_backend_pid() % 64)::smallint $$;

-- A tenant's usage: storage bytes (floored at 0) and messages this UTC month.
-- Always exactly one row (an aggregate without GROUP BY). Declared as a
-- table function so the planner inlines it into the calling query (the
-- recipient lookup at every RCPT) instead of calling and re-planning it.
CREATE FUNCTION e2a_account_usage(p_user_id text)
    RETURNS TABLE (storage_bytes bigint, messages_month bigint)
    LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT GREATEST(COALESCE(sum(u.storage_bytes), 0), 0)::bigint,
           COALESCE(sum(u.messages_month) FILTER (
               WHERE u.month_start = (date_trunc('month', now() AT TIME ZONE 'UTC'))::date), 0)::bigint
      FROM account_usage u
     WHERE u.user_id = p_user_id
$$;

-- Subtracts p_bytes (> 0) from one existing slot of p_user_id: the
-- connection's own when present, else the lowest. No row: nothing to do.
CREATE FUNCTION e2a_account_usage_sub(p_user_id text, p_bytes bigint) RETURNS void
    LANGUAGE sql
AS $$
    UPDATE account_usage u
       SET storage_bytes = u.storage_bytes - p_bytes,
           updated_at = now()
     WHERE u.user_id = p_user_id
       AND u.slot = (SELECT x.slot FROM account_usage x
                      WHERE x.user_id = p_user_id
                      ORDER BY (x.slot = e2a_usage_slot()) DESC, x.slot
                      LIMIT 1)
$$;

CREATE OR REPLACE FUNCTION e2a_account_usage_add(p_user_id text, p_delta bigint) RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    IF p_delta > 0 THEN
        INSERT INTO account_usage AS u (user_id, slot, storage_bytes, updated_at)
        VALUES (p_user_id, e2a_usage_slot(), p_delta, now())
        ON CONFLICT (user_id, slot) DO UPDATE
            SET storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes,
                updated_at = now();
    ELSIF p_delta < 0 THEN
        PERFORM e2a_account_usage_sub(p_user_id, -p_delta);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION e2a_messages_storage_after_insert() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    this_month date := (date_trunc('month', now() AT TIME ZONE 'UTC'))::date;
BEGIN
    -- Storage bytes and this month's message count, one upsert per user on
    -- this connection's slot, users in a fixed order. A slot from an earlier
    -- month restarts its monthly count.
    INSERT INTO account_usage AS u (user_id, slot, storage_bytes, month_start, messages_month, updated_at)
    SELECT n.user_id,
           e2a_usage_slot(),
           sum(e2a_message_stored_bytes(n.raw_message, n.body_text, n.body_html, n.attachments_json)),
           this_month,
           count(*),
           now()
      FROM new_rows n
     GROUP BY n.user_id
     ORDER BY n.user_id
    ON CONFLICT (user_id, slot) DO UPDATE
        SET storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes,
            messages_month = CASE WHEN u.month_start = EXCLUDED.month_start
                                  THEN u.messages_month + EXCLUDED.messages_month
                                  ELSE EXCLUDED.messages_month END,
            month_start = EXCLUDED.month_start,
            updated_at = now();
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION e2a_messages_storage_after_delete() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    d record;
BEGIN
    -- One decrement per user, users in a fixed order (no deadlock between
    -- two bulk deletes).
    FOR d IN
        SELECT o.user_id,
               sum(e2a_message_stored_bytes(o.raw_message, o.body_text, o.body_html, o.attachments_json))::bigint AS bytes
          FROM old_rows o
         GROUP BY o.user_id
        HAVING sum(e2a_message_stored_bytes(o.raw_message, o.body_text, o.body_html, o.attachments_json)) > 0
         ORDER BY o.user_id
    LOOP
        PERFORM e2a_account_usage_sub(d.user_id, d.bytes);
    END LOOP;
    RETURN NULL;
END
$$;
