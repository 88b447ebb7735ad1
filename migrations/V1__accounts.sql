-- V1: accounts.
--
-- Holds everything that hangs directly off a human account:
--   users                    one row per account (Google sign-in or bootstrap CLI)
--   user_sessions            dashboard sessions; only sha256(token) is stored
--   api_keys                 bearer keys; only sha256(key) is stored, soft revoke
--   account_limits           per-user caps written by an external provisioner
--   account_usage            storage and monthly message counters, maintained by
--                            triggers on messages (V3)
--   webhook_signing_secrets  per-user HMAC secrets (inbound auth headers, magic links)
--
-- Conventions for the whole schema (all migrations):
--   * every id is `text`, minted by the application with a prefix
--     (`usr_`, `apk_`, `msg_`, `evt_`, `wh_`, `whd_`, `wsec_`, …); no extensions,
--     no database-generated ids;
--   * every tenant-owned table carries `user_id text NOT NULL` referencing
--     users ON DELETE CASCADE (the only nullable one is domains.user_id, NULL for
--     the system/shared-domain row), so every query filters by owner directly;
--   * every status is `text NOT NULL` with a CHECK listing its values;
--   * every foreign key spells out its ON DELETE action;
--   * constraint and index names are explicit so the store can map
--     unique violations (SQLSTATE 23505) to domain errors by name.
-- Requires PostgreSQL >= 15 (V3+ use `ON DELETE SET NULL (column)`).

CREATE TABLE users (
    id             text        NOT NULL,
    email          text        NOT NULL,
    name           text        NOT NULL DEFAULT '',
    -- NULL for users created by the bootstrap CLI (no synthetic value).
    google_subject text        NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT users_id_check CHECK (id <> ''),
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_email_check CHECK (email = lower(email) AND email <> ''),
    CONSTRAINT users_google_subject_key UNIQUE (google_subject),
    CONSTRAINT users_google_subject_check CHECK (google_subject IS NULL OR google_subject <> '')
);

-- Dashboard sessions. The cookie carries the plaintext token; the table keeps
-- only its sha256 (64 lowercase hex), so a database read does not yield
-- usable sessions. TTL 7 days; lookups require expires_at > now() and
-- revoked_at IS NULL; the janitor sweeps on expires_at.
CREATE TABLE user_sessions (
    token_hash text        NOT NULL,
    user_id    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz NULL,
    CONSTRAINT user_sessions_pkey PRIMARY KEY (token_hash),
    CONSTRAINT user_sessions_token_hash_check CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT user_sessions_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX user_sessions_expires_at_idx ON user_sessions (expires_at);
CREATE INDEX user_sessions_user_id_idx ON user_sessions (user_id);

-- API keys: `e2a_` + 64 hex plaintext shown once; key_hash = sha256 hex.
-- key_prefix = first 12 plaintext chars, for display. "Delete" is a soft
-- revoke (revoked_at); expires_at is optional.
CREATE TABLE api_keys (
    id           text        NOT NULL,
    user_id      text        NOT NULL,
    name         text        NOT NULL DEFAULT '',
    key_prefix   text        NOT NULL,
    key_hash     text        NOT NULL,
    last_used_at timestamptz NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz NULL,
    expires_at   timestamptz NULL,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT api_keys_key_hash_check CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT api_keys_key_prefix_check CHECK (key_prefix <> ''),
    CONSTRAINT api_keys_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
CREATE INDEX api_keys_expires_at_idx ON api_keys (expires_at) WHERE expires_at IS NOT NULL;

-- Per-user caps, written by an external provisioner; users without a row get
-- the configured defaults (and 50 webhooks). last_event_at / last_event_id are
-- the provisioner's opaque ordering keys; the server never writes them.
CREATE TABLE account_limits (
    user_id            text        NOT NULL,
    plan_code          text        NOT NULL DEFAULT 'default',
    max_agents         integer     NOT NULL,
    max_domains        integer     NOT NULL,
    max_messages_month integer     NOT NULL,
    max_storage_bytes  bigint      NOT NULL,
    max_webhooks       integer     NOT NULL DEFAULT 50,
    upgrade_url        text        NOT NULL DEFAULT '',
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_event_at      timestamptz NULL,
    last_event_id      text        NULL,
    CONSTRAINT account_limits_pkey PRIMARY KEY (user_id),
    CONSTRAINT account_limits_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT account_limits_caps_check CHECK (
        max_agents >= 0 AND max_domains >= 0 AND max_messages_month >= 0
        AND max_storage_bytes >= 0 AND max_webhooks >= 0)
);
CREATE INDEX account_limits_updated_at_idx ON account_limits (updated_at);

-- Storage counter. Maintained only by the triggers on messages (V3), which
-- track INSERT, UPDATE (size delta) and DELETE, flooring at 0.
CREATE TABLE account_usage (
    user_id       text        NOT NULL,
    storage_bytes bigint      NOT NULL DEFAULT 0,
    -- Messages (both directions) created in the UTC calendar month starting
    -- at month_start. Counted on insert and never decremented, so the monthly
    -- cap holds after the TTL janitor deletes rows (the original summed an
    -- optional usage table instead).
    month_start    date       NOT NULL DEFAULT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date,
    messages_month bigint     NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT account_usage_pkey PRIMARY KEY (user_id),
    CONSTRAINT account_usage_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT account_usage_storage_bytes_check CHECK (storage_bytes >= 0),
    CONSTRAINT account_usage_messages_month_check CHECK (messages_month >= 0)
);

-- Per-user signing secrets (`wsec_` id, 64-hex secret). The newest one signs
-- inbound X-E2A-Auth-* headers and HITL magic links; verification tries all.
-- Stored in plaintext because they are HMAC keys. Max 5 per user and "never
-- delete the last one" are enforced by the store under `SELECT … FROM users
-- WHERE id = $1 FOR UPDATE`.
CREATE TABLE webhook_signing_secrets (
    id             text        NOT NULL,
    user_id        text        NOT NULL,
    secret         text        NOT NULL,
    name           text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_signed_at timestamptz NULL,
    CONSTRAINT webhook_signing_secrets_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_signing_secrets_secret_check CHECK (secret ~ '^[0-9a-f]{64}$'),
    CONSTRAINT webhook_signing_secrets_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX webhook_signing_secrets_user_created_idx
    ON webhook_signing_secrets (user_id, created_at DESC);
