-- V3: messages, storage accounting, magic-link tokens.
--
--   messages         one table for both directions. Inbound rows carry the
--                    raw RFC 5322 bytes, the signed X-E2A-Auth-* headers, the
--                    SPF/DKIM/DMARC verdicts, an inbox status and a body hash
--                    used to drop MTA retries. Outbound rows carry recipients,
--                    the upstream Message-ID, the delivery status (queue-first:
--                    the row is inserted `queued` together with a mail-outbox
--                    row, V6) and the HITL columns.
--   account_usage    triggers keep account_usage.storage_bytes in step with
--                    INSERT, UPDATE (size delta, e.g. the HITL body scrub) and
--                    DELETE of messages, floored at 0.
--   approval_tokens  HITL magic-link tokens: only sha256(token) is stored,
--                    single use (used_at), bounded by expires_at.
--
-- messages.status
--   inbound rows: always 'sent' (the default) — the inbox state lives in
--   inbox_status ('unread' | 'read'), which is NOT NULL exactly for inbound rows.
--   outbound rows, direct send:
--     queued -> sending -> sent | failed
--     sending -> queued            temporary failure, retry scheduled
--     failed  -> queued            operator re-send
--   outbound rows, held (HITL):
--     pending_approval -> approved           human approve (API or magic link)
--                      -> expired_approved   TTL passed, agent action 'approve'
--                      -> rejected           human reject (terminal)
--                      -> expired_rejected   TTL passed, agent action 'reject' (terminal)
--     approved | expired_approved -> sending -> sent | failed
--   The transition out of pending_approval enqueues the mail-outbox row (V6)
--   and appends its events in the same transaction.
--   `approved` / `expired_approved` are "decided and queued": they record who
--   released the message until the deliverer picks it up; afterwards the
--   decision stays visible through reviewed_at / reviewed_by_user_id (NULL
--   reviewer + reviewed_at set = released by expiry). Direct sends skip the
--   HITL states and start at `queued`. The held bodies (body_text,
--   body_html, attachments_json) are scrubbed (set NULL) when the message
--   leaves pending_approval: on approval they move into the mail-outbox
--   payload, on rejection/expiry they are dropped.
-- Message TTL is 10 days (expires_at); HITL TTL is at most 7 days, so the
-- janitor never deletes a still-pending row.

-- Labels: lowercase [a-z0-9:_-], 1..64 chars each, no NULL elements.
CREATE FUNCTION e2a_labels_valid(labels text[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM unnest(labels) AS l(v)
        WHERE v IS NULL OR v !~ '^[a-z0-9:_-]{1,64}$')
$$;

CREATE TABLE messages (
    id                  text        NOT NULL,
    user_id             text        NOT NULL,
    agent_id            text        NOT NULL,
    direction           text        NOT NULL,
    status              text        NOT NULL DEFAULT 'sent',
    -- inbound: display sender (first Reply-To, else From, else MAIL FROM).
    sender              text        NOT NULL DEFAULT '',
    -- inbound: this delivery's RCPT; outbound: first To.
    recipient           text        NOT NULL DEFAULT '',
    subject             text        NOT NULL DEFAULT '',
    -- inbound: its Message-ID header; held reply/forward: the parent's Message-ID.
    email_message_id    text        NOT NULL DEFAULT '',
    -- outbound: the Message-ID assigned upstream (or the loopback id).
    provider_message_id text        NOT NULL DEFAULT '',
    method              text        NULL,
    message_type        text        NULL,
    raw_message         bytea       NULL,
    -- octet_length(raw_message); computed, never written by the application.
    size_bytes          bigint      GENERATED ALWAYS AS (COALESCE(octet_length(raw_message), 0)) STORED,
    -- lowercase hex sha256 of raw_message (inbound dedupe key, with Message-ID).
    body_sha256         text        NULL,
    -- signed X-E2A-Auth-* header map, as sent on webhooks.
    auth_headers        jsonb       NULL,
    spf_result          text        NULL,
    dkim_result         text        NULL,
    dmarc_result        text        NULL,
    conversation_id     text        NOT NULL DEFAULT '',
    inbox_status        text        NULL,
    labels              text[]      NOT NULL DEFAULT '{}',
    to_recipients       text[]      NULL,
    cc                  text[]      NULL,
    bcc                 text[]      NULL,
    reply_to            text[]      NULL,
    -- HITL
    approval_expires_at timestamptz NULL,
    reviewed_at         timestamptz NULL,
    reviewed_by_user_id text        NULL,
    rejection_reason    text        NULL,
    edited              boolean     NOT NULL DEFAULT false,
    body_text           text        NULL,
    body_html           text        NULL,
    -- [{filename, content_type, data(base64)}]
    attachments_json    jsonb       NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL DEFAULT now() + interval '10 days',
    CONSTRAINT messages_pkey PRIMARY KEY (id),
    CONSTRAINT messages_id_user_id_key UNIQUE (id, user_id),
    CONSTRAINT messages_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    -- Composite: a message can only point at an agent of the same tenant.
    CONSTRAINT messages_agent_fkey FOREIGN KEY (agent_id, user_id)
        REFERENCES agents (id, user_id) ON DELETE CASCADE,
    CONSTRAINT messages_reviewed_by_user_id_fkey FOREIGN KEY (reviewed_by_user_id)
        REFERENCES users (id) ON DELETE SET NULL,
    CONSTRAINT messages_direction_check CHECK (direction IN ('inbound', 'outbound')),
    CONSTRAINT messages_status_check CHECK (status IN (
        'queued', 'sending', 'sent', 'failed',
        'pending_approval', 'approved', 'rejected', 'expired_approved', 'expired_rejected')),
    CONSTRAINT messages_inbound_status_check CHECK (direction = 'outbound' OR status = 'sent'),
    CONSTRAINT messages_pending_expiry_check
        CHECK (status <> 'pending_approval' OR approval_expires_at IS NOT NULL),
    CONSTRAINT messages_inbox_status_check CHECK (inbox_status IN ('unread', 'read')),
    CONSTRAINT messages_inbox_status_direction_check
        CHECK ((direction = 'inbound') = (inbox_status IS NOT NULL)),
    CONSTRAINT messages_method_check CHECK (method IN ('smtp', 'loopback')),
    CONSTRAINT messages_message_type_check
        CHECK (message_type IN ('send', 'reply', 'test', 'forward')),
    CONSTRAINT messages_body_sha256_check CHECK (body_sha256 ~ '^[0-9a-f]{64}$'),
    -- Without a body hash the inbound dedupe index below could not fire.
    CONSTRAINT messages_inbound_body_sha256_check
        CHECK (direction <> 'inbound' OR body_sha256 IS NOT NULL),
    CONSTRAINT messages_spf_result_check CHECK (spf_result IN (
        'pass', 'fail', 'softfail', 'neutral', 'none', 'temperror', 'permerror')),
    CONSTRAINT messages_dkim_result_check CHECK (dkim_result IN (
        'pass', 'fail', 'policy', 'neutral', 'none', 'temperror', 'permerror')),
    CONSTRAINT messages_dmarc_result_check CHECK (dmarc_result IN (
        'pass', 'fail', 'none', 'temperror', 'permerror')),
    CONSTRAINT messages_auth_headers_check
        CHECK (auth_headers IS NULL OR jsonb_typeof(auth_headers) = 'object'),
    CONSTRAINT messages_attachments_json_check
        CHECK (attachments_json IS NULL OR jsonb_typeof(attachments_json) = 'array'),
    CONSTRAINT messages_labels_max_check CHECK (cardinality(labels) <= 100),
    CONSTRAINT messages_labels_format_check CHECK (e2a_labels_valid(labels))
);

-- List an agent's messages newest first (cursor = created_at, id).
CREATE INDEX messages_agent_created_idx ON messages (agent_id, created_at DESC, id DESC);
-- Default inbox view: inbound + unread.
CREATE INDEX messages_agent_unread_idx ON messages (agent_id, created_at DESC, id DESC)
    WHERE direction = 'inbound' AND inbox_status = 'unread';
-- Per-user scans (export, dashboard, user delete cascade).
CREATE INDEX messages_user_created_idx ON messages (user_id, created_at DESC);
-- Conversations are per agent.
CREATE INDEX messages_agent_conversation_idx
    ON messages (agent_id, conversation_id, created_at DESC) WHERE conversation_id <> '';
-- Threading: In-Reply-To / References lookup within an agent.
CREATE INDEX messages_agent_email_message_id_idx
    ON messages (agent_id, email_message_id) WHERE email_message_id <> '';
CREATE INDEX messages_agent_provider_message_id_idx
    ON messages (agent_id, provider_message_id) WHERE provider_message_id <> '';
-- Inbound dedupe (an MTA retry of the same mail): ON CONFLICT target
-- (agent_id, email_message_id, body_sha256)
--   WHERE direction = 'inbound' AND email_message_id <> ''.
CREATE UNIQUE INDEX messages_inbound_dedupe_key
    ON messages (agent_id, email_message_id, body_sha256)
    WHERE direction = 'inbound' AND email_message_id <> '';
-- HITL expiry scan and per-user pending list/count.
CREATE INDEX messages_pending_approval_idx
    ON messages (approval_expires_at) WHERE status = 'pending_approval';
CREATE INDEX messages_user_pending_idx
    ON messages (user_id, approval_expires_at) WHERE status = 'pending_approval';
-- TTL sweep.
CREATE INDEX messages_expires_at_idx ON messages (expires_at);
-- Label filters (labels @> / &&).
CREATE INDEX messages_labels_gin_idx ON messages USING GIN (labels);
-- FK support for ON DELETE SET NULL of the reviewer.
CREATE INDEX messages_reviewed_by_user_id_idx
    ON messages (reviewed_by_user_id) WHERE reviewed_by_user_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Storage accounting (fixes the original's drift: UPDATEs are tracked).
-- Bytes of a row = raw_message + body_text + body_html + attachments_json::text
-- (octets, NULL = 0). INSERT and DELETE are statement-level (one upsert per
-- user per statement, so bulk janitor deletes stay cheap); UPDATE is
-- row-level and fires only when a sized column (or user_id) is assigned.

CREATE FUNCTION e2a_message_stored_bytes(raw bytea, body_text text, body_html text, attachments jsonb)
    RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT COALESCE(octet_length(raw), 0)::bigint
         + COALESCE(octet_length(body_text), 0)
         + COALESCE(octet_length(body_html), 0)
         + COALESCE(octet_length(attachments::text), 0)
$$;

-- Adds delta (may be negative) to a user's counter, flooring at 0. A missing
-- row is created for a positive delta and left alone for a negative one.
CREATE FUNCTION e2a_account_usage_add(p_user_id text, p_delta bigint) RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    IF p_delta > 0 THEN
        INSERT INTO account_usage AS u (user_id, storage_bytes, updated_at)
        VALUES (p_user_id, p_delta, now())
        ON CONFLICT (user_id) DO UPDATE
            SET storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes,
                updated_at = now();
    ELSIF p_delta < 0 THEN
        UPDATE account_usage
           SET storage_bytes = GREATEST(storage_bytes + p_delta, 0),
               updated_at = now()
         WHERE user_id = p_user_id;
    END IF;
END
$$;

CREATE FUNCTION e2a_messages_storage_after_insert() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    this_month date := (date_trunc('month', now() AT TIME ZONE 'UTC'))::date;
BEGIN
    -- Storage bytes and this month's message count, one upsert per user.
    -- A counter row from an earlier month restarts the monthly count.
    INSERT INTO account_usage AS u (user_id, storage_bytes, month_start, messages_month, updated_at)
    SELECT n.user_id,
           sum(e2a_message_stored_bytes(n.raw_message, n.body_text, n.body_html, n.attachments_json)),
           this_month,
           count(*),
           now()
      FROM new_rows n
     GROUP BY n.user_id
     ORDER BY n.user_id
    ON CONFLICT (user_id) DO UPDATE
        SET storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes,
            messages_month = CASE WHEN u.month_start = EXCLUDED.month_start
                                  THEN u.messages_month + EXCLUDED.messages_month
                                  ELSE EXCLUDED.messages_month END,
            month_start = EXCLUDED.month_start,
            updated_at = now();
    RETURN NULL;
END
$$;

CREATE FUNCTION e2a_messages_storage_after_delete() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    WITH d AS (
        SELECT o.user_id,
               sum(e2a_message_stored_bytes(o.raw_message, o.body_text, o.body_html, o.attachments_json)) AS bytes
          FROM old_rows o
         GROUP BY o.user_id
    ), locked AS (
        -- Lock counters in a fixed order so concurrent bulk deletes cannot deadlock.
        SELECT u.user_id FROM account_usage u JOIN d ON d.user_id = u.user_id
         WHERE d.bytes > 0
         ORDER BY u.user_id
           FOR UPDATE OF u
    )
    UPDATE account_usage u
       SET storage_bytes = GREATEST(u.storage_bytes - d.bytes, 0),
           updated_at = now()
      FROM d
     WHERE u.user_id = d.user_id
       AND u.user_id IN (SELECT user_id FROM locked);
    RETURN NULL;
END
$$;

CREATE FUNCTION e2a_messages_storage_after_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    old_bytes bigint := e2a_message_stored_bytes(OLD.raw_message, OLD.body_text, OLD.body_html, OLD.attachments_json);
    new_bytes bigint := e2a_message_stored_bytes(NEW.raw_message, NEW.body_text, NEW.body_html, NEW.attachments_json);
BEGIN
    IF OLD.user_id = NEW.user_id THEN
        PERFORM e2a_account_usage_add(NEW.user_id, new_bytes - old_bytes);
    ELSE
        PERFORM e2a_account_usage_add(OLD.user_id, -old_bytes);
        PERFORM e2a_account_usage_add(NEW.user_id, new_bytes);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_storage_insert_trg
    AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_messages_storage_after_insert();

CREATE TRIGGER messages_storage_delete_trg
    AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_messages_storage_after_delete();

CREATE TRIGGER messages_storage_update_trg
    AFTER UPDATE OF raw_message, body_text, body_html, attachments_json, user_id ON messages
    FOR EACH ROW EXECUTE FUNCTION e2a_messages_storage_after_update();

-- ---------------------------------------------------------------------------
-- HITL magic-link tokens. The link carries a random token; only its sha256
-- is stored. A token is good for one action on one message of its owner,
-- until expires_at (approval_expires_at + grace) and only once (used_at).
-- GET renders a confirmation page; only POST consumes the token with
--   UPDATE … SET used_at = now() WHERE token_hash = $1 AND used_at IS NULL
--     AND expires_at > now().
CREATE TABLE approval_tokens (
    token_hash text        NOT NULL,
    user_id    text        NOT NULL,
    message_id text        NOT NULL,
    action     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NULL,
    CONSTRAINT approval_tokens_pkey PRIMARY KEY (token_hash),
    CONSTRAINT approval_tokens_token_hash_check CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT approval_tokens_action_check CHECK (action IN ('approve', 'reject')),
    CONSTRAINT approval_tokens_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT approval_tokens_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE CASCADE
);
CREATE INDEX approval_tokens_message_idx ON approval_tokens (message_id, user_id);
CREATE INDEX approval_tokens_user_id_idx ON approval_tokens (user_id);
CREATE INDEX approval_tokens_expires_at_idx ON approval_tokens (expires_at);
