-- V5: webhooks, the event outbox and webhook deliveries.
--
--   webhooks                       account-level subscribers: URL, event list,
--                                  JSONB filters, signing secret with a 24 h
--                                  previous-secret rotation window, enabled /
--                                  auto-disabled.
--   webhook_events                 event log + outbox. Written in the SAME
--                                  transaction as the state change it reports;
--                                  an AFTER INSERT statement trigger NOTIFYs
--                                  channel `webhook_events_new` (delivered at
--                                  commit). The fan-out worker turns each
--                                  pending event into one delivery per matching
--                                  enabled webhook.
--   webhook_subscriber_deliveries  one row per (event, webhook), plus test
--                                  sends and replays; NOTIFY
--                                  `webhook_deliveries_new` on insert.
--   webhook_deliveries             legacy per-agent push (one row per inbound
--                                  message of a cloud agent, POST to
--                                  agents.webhook_url).
--
-- Leases instead of held transactions: every queue row here has
-- leased_until / lease_token. A worker claims rows in a short committed
-- transaction (… FOR UPDATE SKIP LOCKED LIMIT n, then SET leased_until =
-- now() + lease, lease_token = <worker id>), does the HTTP call with no
-- transaction open, then records the outcome with an update guarded by
-- `WHERE id = $1 AND lease_token = $2` (and the expected status). A row whose
-- lease has passed is claimable again. leased_until and lease_token are set
-- and cleared together. Attempt counters never exceed max_attempts.

CREATE TABLE webhooks (
    id                             text        NOT NULL,
    user_id                        text        NOT NULL,
    url                            text        NOT NULL,
    description                    text        NOT NULL DEFAULT '',
    events                         text[]      NOT NULL DEFAULT '{}',
    -- {agent_ids?: [], conversation_ids?: [], labels?: []}
    filters                        jsonb       NOT NULL DEFAULT '{}',
    -- `whsec_` + 64 hex, plaintext (it is the HMAC key).
    signing_secret                 text        NOT NULL,
    -- Previous secret, still signed with until signing_secret_prev_expires_at.
    signing_secret_prev            text        NULL,
    signing_secret_prev_expires_at timestamptz NULL,
    enabled                        boolean     NOT NULL DEFAULT true,
    auto_disabled_at               timestamptz NULL,
    -- Terminal delivery failures since the last success; maintained by the
    -- delivery worker in the outcome transaction (auto-disable input).
    consecutive_failures           integer     NOT NULL DEFAULT 0,
    created_at                     timestamptz NOT NULL DEFAULT now(),
    last_delivered_at              timestamptz NULL,
    CONSTRAINT webhooks_pkey PRIMARY KEY (id),
    CONSTRAINT webhooks_id_user_id_key UNIQUE (id, user_id),
    CONSTRAINT webhooks_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT webhooks_url_check CHECK (url <> '' AND length(url) <= 2048),
    CONSTRAINT webhooks_description_check CHECK (length(description) <= 200),
    CONSTRAINT webhooks_events_check CHECK (cardinality(events) > 0),
    CONSTRAINT webhooks_filters_check CHECK (jsonb_typeof(filters) = 'object'),
    CONSTRAINT webhooks_signing_secret_check CHECK (signing_secret <> ''),
    CONSTRAINT webhooks_signing_secret_prev_check
        CHECK ((signing_secret_prev IS NULL) = (signing_secret_prev_expires_at IS NULL)),
    CONSTRAINT webhooks_consecutive_failures_check CHECK (consecutive_failures >= 0)
);
CREATE INDEX webhooks_user_created_idx ON webhooks (user_id, created_at DESC);
CREATE INDEX webhooks_user_enabled_idx ON webhooks (user_id) WHERE enabled;
CREATE INDEX webhooks_prev_secret_expiry_idx ON webhooks (signing_secret_prev_expires_at)
    WHERE signing_secret_prev_expires_at IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Event outbox. Ids are deterministic (`evt_` + sha256 of message id and
-- type), so `INSERT … ON CONFLICT (id) DO NOTHING` makes a repeated write a
-- no-op. Status: pending -> processed (>= 1 webhook matched) | no_match;
-- pending -> failed once attempts reach max_attempts (fan-out gave up).
CREATE TABLE webhook_events (
    id                  text        NOT NULL,
    user_id             text        NOT NULL,
    type                text        NOT NULL,
    aud                 text        NOT NULL DEFAULT 'webhook',
    -- {event, id, created_at, data}, POSTed verbatim to subscribers.
    envelope            jsonb       NOT NULL,
    schema_version      smallint    NOT NULL DEFAULT 1,
    -- Routing keys. agent_id / conversation_id are plain values (the log
    -- outlives agents); message_id is cleared when the message is deleted.
    agent_id            text        NULL,
    conversation_id     text        NULL,
    message_id          text        NULL,
    -- Copied from the message so label filters can match (the original had none).
    labels              text[]      NOT NULL DEFAULT '{}',
    status              text        NOT NULL DEFAULT 'pending',
    attempts            integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL DEFAULT 50,
    last_error          text        NOT NULL DEFAULT '',
    last_status_code    integer     NULL,
    next_poll_at        timestamptz NOT NULL DEFAULT now(),
    leased_until        timestamptz NULL,
    lease_token         text        NULL,
    processed_at        timestamptz NULL,
    -- No cardinality cap: max_webhooks can be raised per account.
    matched_webhook_ids text[]      NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL DEFAULT now() + interval '30 days',
    CONSTRAINT webhook_events_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_events_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    -- Same-tenant message; deleting the message clears only message_id.
    CONSTRAINT webhook_events_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE SET NULL (message_id),
    CONSTRAINT webhook_events_type_check CHECK (type <> ''),
    CONSTRAINT webhook_events_envelope_check CHECK (jsonb_typeof(envelope) = 'object'),
    CONSTRAINT webhook_events_schema_version_check CHECK (schema_version >= 1),
    CONSTRAINT webhook_events_status_check
        CHECK (status IN ('pending', 'processed', 'no_match', 'failed')),
    CONSTRAINT webhook_events_attempts_check
        CHECK (max_attempts > 0 AND attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT webhook_events_last_error_check CHECK (length(last_error) <= 4096),
    CONSTRAINT webhook_events_lease_check CHECK ((leased_until IS NULL) = (lease_token IS NULL)),
    CONSTRAINT webhook_events_labels_max_check CHECK (cardinality(labels) <= 100)
);
-- Fan-out claim scan.
CREATE INDEX webhook_events_pending_idx ON webhook_events (next_poll_at) WHERE status = 'pending';
-- GET /v1/events (cursor = created_at, id) and its filters.
CREATE INDEX webhook_events_user_created_idx ON webhook_events (user_id, created_at DESC, id DESC);
CREATE INDEX webhook_events_user_type_created_idx
    ON webhook_events (user_id, type, created_at DESC);
CREATE INDEX webhook_events_user_agent_created_idx
    ON webhook_events (user_id, agent_id, created_at DESC) WHERE agent_id IS NOT NULL;
-- Janitor: only non-pending rows are swept.
CREATE INDEX webhook_events_expires_at_idx ON webhook_events (expires_at) WHERE status <> 'pending';
-- FK support (message deletes clear message_id).
CREATE INDEX webhook_events_message_idx ON webhook_events (message_id, user_id)
    WHERE message_id IS NOT NULL;

CREATE FUNCTION e2a_notify_webhook_events_new() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('webhook_events_new', '');
    RETURN NULL;
END
$$;

-- Statement-level: one NOTIFY per INSERT statement; identical notifications
-- within a transaction are folded and delivered at commit (none on rollback).
CREATE TRIGGER webhook_events_notify_trg
    AFTER INSERT ON webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_notify_webhook_events_new();

-- ---------------------------------------------------------------------------
-- Subscriber deliveries. Status: pending -> delivered | failed (attempts
-- reached max_attempts, or a permanent failure). Sources: fan-out
-- (event_id set, replay_id NULL, at most one per (event, webhook)), test
-- sends (event_id NULL), replays (replay_id = id, event_id set).
CREATE TABLE webhook_subscriber_deliveries (
    id               text        NOT NULL,
    user_id          text        NOT NULL,
    webhook_id       text        NOT NULL,
    event_type       text        NOT NULL,
    -- The full envelope, POSTed verbatim.
    event_payload    jsonb       NOT NULL,
    message_id       text        NULL,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 8,
    last_error       text        NOT NULL DEFAULT '',
    last_status_code integer     NULL,
    last_attempt_at  timestamptz NULL,
    next_retry_at    timestamptz NOT NULL DEFAULT now(),
    leased_until     timestamptz NULL,
    lease_token      text        NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL DEFAULT now() + interval '90 days',
    -- Logical link to webhook_events.id, deliberately no FK (events expire
    -- after 30 days, deliveries after 90).
    event_id         text        NULL,
    -- NULL for a first delivery; equals id for a replay.
    replay_id        text        NULL,
    CONSTRAINT webhook_subscriber_deliveries_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_subscriber_deliveries_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT webhook_subscriber_deliveries_webhook_fkey FOREIGN KEY (webhook_id, user_id)
        REFERENCES webhooks (id, user_id) ON DELETE CASCADE,
    CONSTRAINT webhook_subscriber_deliveries_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE SET NULL (message_id),
    CONSTRAINT webhook_subscriber_deliveries_status_check
        CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_subscriber_deliveries_attempts_check
        CHECK (max_attempts > 0 AND attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT webhook_subscriber_deliveries_lease_check
        CHECK ((leased_until IS NULL) = (lease_token IS NULL)),
    CONSTRAINT webhook_subscriber_deliveries_replay_check
        CHECK (replay_id IS NULL OR (replay_id = id AND event_id IS NOT NULL)),
    CONSTRAINT webhook_subscriber_deliveries_last_status_code_check
        CHECK (last_status_code IS NULL OR last_status_code BETWEEN 0 AND 999),
    CONSTRAINT webhook_subscriber_deliveries_event_type_check CHECK (event_type <> '')
);
-- Claim scan.
CREATE INDEX webhook_subscriber_deliveries_pending_idx
    ON webhook_subscriber_deliveries (next_retry_at) WHERE status = 'pending';
-- In-flight <= 1 per webhook: live leases per webhook.
CREATE INDEX webhook_subscriber_deliveries_leased_idx
    ON webhook_subscriber_deliveries (webhook_id, leased_until) WHERE leased_until IS NOT NULL;
-- Delivery list per webhook; auto-disable window scan.
CREATE INDEX webhook_subscriber_deliveries_webhook_created_idx
    ON webhook_subscriber_deliveries (webhook_id, created_at DESC);
-- Fan-out idempotence: ON CONFLICT (event_id, webhook_id)
--   WHERE event_id IS NOT NULL AND replay_id IS NULL DO NOTHING.
CREATE UNIQUE INDEX webhook_subscriber_deliveries_event_webhook_key
    ON webhook_subscriber_deliveries (event_id, webhook_id)
    WHERE event_id IS NOT NULL AND replay_id IS NULL;
-- Per-event delivery status counts.
CREATE INDEX webhook_subscriber_deliveries_event_idx
    ON webhook_subscriber_deliveries (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX webhook_subscriber_deliveries_user_created_idx
    ON webhook_subscriber_deliveries (user_id, created_at DESC);
CREATE INDEX webhook_subscriber_deliveries_message_idx
    ON webhook_subscriber_deliveries (message_id, user_id) WHERE message_id IS NOT NULL;
CREATE INDEX webhook_subscriber_deliveries_expires_at_idx
    ON webhook_subscriber_deliveries (expires_at);

CREATE FUNCTION e2a_notify_webhook_deliveries_new() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('webhook_deliveries_new', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER webhook_subscriber_deliveries_notify_trg
    AFTER INSERT ON webhook_subscriber_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_notify_webhook_deliveries_new();

-- ---------------------------------------------------------------------------
-- Legacy per-agent delivery: one row per inbound message of a cloud agent.
-- Status: pending -> delivered | failed. The original inserted max_attempts 2
-- and a 48 h expiry; those are the defaults here.
CREATE TABLE webhook_deliveries (
    message_id       text        NOT NULL,
    user_id          text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 2,
    last_error       text        NOT NULL DEFAULT '',
    last_status_code integer     NULL,
    last_attempt_at  timestamptz NULL,
    next_retry_at    timestamptz NOT NULL DEFAULT now(),
    leased_until     timestamptz NULL,
    lease_token      text        NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL DEFAULT now() + interval '48 hours',
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (message_id),
    CONSTRAINT webhook_deliveries_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_status_check
        CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_attempts_check
        CHECK (max_attempts > 0 AND attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT webhook_deliveries_lease_check
        CHECK ((leased_until IS NULL) = (lease_token IS NULL))
);
CREATE INDEX webhook_deliveries_pending_idx
    ON webhook_deliveries (next_retry_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_expires_at_idx ON webhook_deliveries (expires_at);
CREATE INDEX webhook_deliveries_user_id_idx ON webhook_deliveries (user_id);
