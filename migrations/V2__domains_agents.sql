-- V2: domains and agents.
--
--   domains  keyed by the lowercased IDNA-ASCII name; holds the verification
--            token and the per-domain DKIM key material (written once, on the
--            first INSERT). user_id NULL marks the system/shared-domain row,
--            which the application inserts at start-up from its configuration
--            (no domain is seeded here). At most one primary domain per user.
--   agents   an agent's primary key IS its normalised (lowercased) e-mail
--            address; it belongs to a user and a domain, carries its delivery
--            mode and its HITL (human-in-the-loop) settings.
--
-- Deleting a domain that still has agents fails (agents.domain is ON DELETE
-- RESTRICT); the store maps that FK violation to "domain has agents".

CREATE TABLE domains (
    domain             text        NOT NULL,
    -- NULL = system row (the configured shared domain).
    user_id            text        NULL,
    verified           boolean     NOT NULL DEFAULT false,
    verification_token text        NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL DEFAULT now(),
    verified_at        timestamptz NULL,
    is_primary         boolean     NOT NULL DEFAULT false,
    last_checked_at    timestamptz NULL,
    -- DKIM: selector `e2aYYYYMM`, base64 DER SubjectPublicKeyInfo, private key
    -- as DER bytes (never returned by the API). All three or none.
    dkim_selector      text        NULL,
    dkim_public_key    text        NULL,
    dkim_private_key   bytea       NULL,
    CONSTRAINT domains_pkey PRIMARY KEY (domain),
    CONSTRAINT domains_domain_check CHECK (domain = lower(domain) AND domain <> ''),
    CONSTRAINT domains_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT domains_primary_owner_check CHECK (NOT is_primary OR user_id IS NOT NULL),
    CONSTRAINT domains_dkim_check CHECK (
        num_nulls(dkim_selector, dkim_public_key, dkim_private_key) IN (0, 3))
);
CREATE INDEX domains_user_id_idx ON domains (user_id);
CREATE UNIQUE INDEX domains_primary_per_user_key
    ON domains (user_id) WHERE is_primary AND user_id IS NOT NULL;

CREATE TABLE agents (
    -- The agent's e-mail address, lowercased; its domain part is `domain`.
    id                     text        NOT NULL,
    user_id                text        NOT NULL,
    domain                 text        NOT NULL,
    name                   text        NOT NULL DEFAULT '',
    -- Legacy per-agent push target (deprecated in favour of `webhooks`).
    webhook_url            text        NOT NULL DEFAULT '',
    agent_mode             text        NOT NULL DEFAULT 'cloud',
    -- The original always wrote true (its column default said false).
    public                 boolean     NOT NULL DEFAULT true,
    created_at             timestamptz NOT NULL DEFAULT now(),
    hitl_enabled           boolean     NOT NULL DEFAULT false,
    hitl_ttl_seconds       integer     NOT NULL DEFAULT 604800,
    hitl_expiration_action text        NOT NULL DEFAULT 'reject',
    -- When true the relay refuses inbound mail whose DMARC verdict is `fail`.
    reject_dmarc_failures  boolean     NOT NULL DEFAULT false,
    CONSTRAINT agents_pkey PRIMARY KEY (id),
    -- Target of composite FKs (agent_id, user_id) from tenant child tables.
    CONSTRAINT agents_id_user_id_key UNIQUE (id, user_id),
    CONSTRAINT agents_id_check CHECK (
        id = lower(id) AND right(id, length(domain) + 1) = '@' || domain
        AND length(id) > length(domain) + 1),
    CONSTRAINT agents_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT agents_domain_fkey FOREIGN KEY (domain)
        REFERENCES domains (domain) ON DELETE RESTRICT,
    CONSTRAINT agents_agent_mode_check CHECK (agent_mode IN ('cloud', 'local')),
    -- Kept from the original: the API refuses a cloud agent without a URL, and
    -- the legacy push needs one.
    CONSTRAINT agents_cloud_webhook_url_check CHECK (agent_mode = 'local' OR webhook_url <> ''),
    CONSTRAINT agents_webhook_url_length_check CHECK (length(webhook_url) <= 2048),
    CONSTRAINT agents_hitl_ttl_seconds_check CHECK (hitl_ttl_seconds BETWEEN 1 AND 604800),
    CONSTRAINT agents_hitl_expiration_action_check
        CHECK (hitl_expiration_action IN ('approve', 'reject'))
);
CREATE INDEX agents_user_id_idx ON agents (user_id, created_at DESC);
CREATE INDEX agents_domain_idx ON agents (domain);
