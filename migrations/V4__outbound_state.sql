-- V4: outbound bookkeeping.
--
--   send_attempts     exactly-once gate for the upstream send of one message:
--                     one row per message id. Claim = INSERT … ON CONFLICT
--                     (message_id) DO UPDATE … WHERE status = 'failed' OR
--                     (status = 'attempting' AND attempted_at < now() - stale
--                     window) RETURNING; a `sent` row hands back the recorded
--                     result instead of sending again. The deliverer passes
--                     this gate before every SMTP submission.
--   idempotency_keys  `Idempotency-Key` request records, scoped (user_id, key):
--                     in_progress (claimed, takeover after 5 min) -> completed
--                     (cached response, swept 24 h after the claim); failed
--                     requests delete their in_progress row.

CREATE TABLE send_attempts (
    message_id          text        NOT NULL,
    user_id             text        NOT NULL,
    status              text        NOT NULL,
    attempted_at        timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz NULL,
    provider_message_id text        NOT NULL DEFAULT '',
    method              text        NOT NULL DEFAULT '',
    to_recipients       text[]      NOT NULL DEFAULT '{}',
    cc_recipients       text[]      NOT NULL DEFAULT '{}',
    bcc_recipients      text[]      NOT NULL DEFAULT '{}',
    error               text        NOT NULL DEFAULT '',
    CONSTRAINT send_attempts_pkey PRIMARY KEY (message_id),
    CONSTRAINT send_attempts_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT send_attempts_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE CASCADE,
    CONSTRAINT send_attempts_status_check CHECK (status IN ('attempting', 'sent', 'failed')),
    CONSTRAINT send_attempts_method_check CHECK (method IN ('', 'smtp', 'loopback')),
    CONSTRAINT send_attempts_completed_check
        CHECK ((status = 'attempting') = (completed_at IS NULL))
);
CREATE INDEX send_attempts_attempted_at_idx ON send_attempts (attempted_at);
CREATE INDEX send_attempts_user_id_idx ON send_attempts (user_id);

CREATE TABLE idempotency_keys (
    user_id               text        NOT NULL,
    -- 'u:' + client header (<= 255 chars, checked by the API) or 's:' + a
    -- server-minted key such as 's:replay:<event_id>:<webhook_id>'.
    key                   text        NOT NULL,
    request_path          text        NOT NULL,
    -- hex sha256(route || '\n' || raw body)
    request_body_hash     text        NOT NULL,
    response_status       integer     NOT NULL DEFAULT 0,
    response_content_type text        NOT NULL DEFAULT '',
    response_body         bytea       NOT NULL DEFAULT ''::bytea,
    status                text        NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    completed_at          timestamptz NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, key),
    CONSTRAINT idempotency_keys_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT idempotency_keys_key_check CHECK (key <> '' AND char_length(key) <= 300),
    CONSTRAINT idempotency_keys_request_body_hash_check
        CHECK (request_body_hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT idempotency_keys_status_check CHECK (status IN ('in_progress', 'completed')),
    CONSTRAINT idempotency_keys_completed_check
        CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT idempotency_keys_response_status_check
        CHECK (response_status = 0 OR response_status BETWEEN 100 AND 599)
);
-- TTL sweep (completed rows older than 24 h, measured from the claim).
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
