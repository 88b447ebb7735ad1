-- V6: the outbound mail outbox (design adopted from seed 003).
--
--   mail_payloads      the bytes to send (composed MIME or the stored request
--                      the deliverer composes from; content_type says which).
--   mail_deliveries    one queued send: status, attempts, schedule, lease.
--                      Optionally linked to the outbound message it delivers;
--                      HITL owner notifications have no message.
--   mail_recipients    envelope recipients of a delivery (to / cc / bcc).
--   mail_attempts      append-only attempt history; attempt_no keeps growing
--                      across operator re-sends (attempts on the delivery
--                      counts the current cycle only).
--   mail_dead_letters  one row per dead-lettering, kept as history even after
--                      an operator re-send.
--
-- Enqueue (one transaction, together with the message row and its events):
-- payload, then the delivery `INSERT … ON CONFLICT (user_id, idempotency_key)
-- DO NOTHING RETURNING` (no row = already enqueued: roll back so no orphan
-- payload remains), then its recipients. For an outbound message the
-- idempotency key is the message id. An AFTER INSERT statement trigger
-- NOTIFYs `mail_outbox_new` at commit; an operator re-send (status back to
-- 'pending') NOTIFYs too.
--
-- mail_deliveries.status
--   pending | retrying --claim--> sending --> sent
--                                         --> retrying       temporary failure, next_attempt_at set
--                                         --> dead_lettered  permanent failure or attempts = max_attempts
--   dead_lettered | retrying | pending --operator re-send--> pending (attempts = 0)
-- Claim (short committed transaction): rows with status IN ('pending',
-- 'retrying') AND next_attempt_at <= now(), or status = 'sending' with an
-- expired lease, ORDER BY next_attempt_at LIMIT n FOR UPDATE SKIP LOCKED;
-- set status = 'sending', leased_until, lease_token. Outcomes are recorded
-- with `WHERE delivery_id = $1 AND lease_token = $2 AND status = 'sending'`,
-- clearing the lease, in the same transaction as the mail_attempts row and
-- the message status / event.
--
-- message_id is ON DELETE SET NULL (message_id), not CASCADE: notification
-- mails have no message at all, and the delivery history (attempts, dead
-- letters) is operator evidence that should follow its own retention
-- (expires_at) rather than the 10-day message TTL. Deleting the account still
-- removes everything through user_id. Janitor: delete the payloads of expired
-- finished deliveries; the payload FK cascades to the delivery, which
-- cascades to recipients, attempts and dead letters.

CREATE TABLE mail_payloads (
    payload_id   text        NOT NULL,
    user_id      text        NOT NULL,
    content_type text        NOT NULL,
    subject      text        NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mail_payloads_pkey PRIMARY KEY (payload_id),
    CONSTRAINT mail_payloads_payload_id_user_id_key UNIQUE (payload_id, user_id),
    CONSTRAINT mail_payloads_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT mail_payloads_content_type_check CHECK (content_type <> '')
);
CREATE INDEX mail_payloads_user_id_idx ON mail_payloads (user_id);

CREATE TABLE mail_deliveries (
    delivery_id      text        NOT NULL,
    user_id          text        NOT NULL,
    message_id       text        NULL,
    -- What kind of mail this is, e.g. 'agent_message', 'hitl_notification'.
    template_id      text        NOT NULL,
    idempotency_key  text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 8,
    next_attempt_at  timestamptz NULL DEFAULT now(),
    payload_id       text        NOT NULL,
    last_error       text        NOT NULL DEFAULT '',
    leased_until     timestamptz NULL,
    lease_token      text        NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz NULL,
    dead_lettered_at timestamptz NULL,
    expires_at       timestamptz NOT NULL DEFAULT now() + interval '30 days',
    CONSTRAINT mail_deliveries_pkey PRIMARY KEY (delivery_id),
    CONSTRAINT mail_deliveries_delivery_id_user_id_key UNIQUE (delivery_id, user_id),
    CONSTRAINT mail_deliveries_idempotency_key UNIQUE (user_id, idempotency_key),
    CONSTRAINT mail_deliveries_payload_id_key UNIQUE (payload_id),
    CONSTRAINT mail_deliveries_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT mail_deliveries_payload_fkey FOREIGN KEY (payload_id, user_id)
        REFERENCES mail_payloads (payload_id, user_id) ON DELETE CASCADE,
    CONSTRAINT mail_deliveries_message_fkey FOREIGN KEY (message_id, user_id)
        REFERENCES messages (id, user_id) ON DELETE SET NULL (message_id),
    CONSTRAINT mail_deliveries_template_id_check CHECK (template_id <> ''),
    CONSTRAINT mail_deliveries_idempotency_key_check CHECK (idempotency_key <> ''),
    CONSTRAINT mail_deliveries_status_check CHECK (status IN (
        'pending', 'retrying', 'sending', 'sent', 'dead_lettered')),
    CONSTRAINT mail_deliveries_attempts_check
        CHECK (max_attempts > 0 AND attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT mail_deliveries_lease_check CHECK ((leased_until IS NULL) = (lease_token IS NULL)),
    CONSTRAINT mail_deliveries_sending_lease_check
        CHECK (status <> 'sending' OR leased_until IS NOT NULL),
    CONSTRAINT mail_deliveries_schedule_check
        CHECK (status NOT IN ('pending', 'retrying') OR next_attempt_at IS NOT NULL),
    CONSTRAINT mail_deliveries_sent_at_check CHECK (status <> 'sent' OR sent_at IS NOT NULL),
    CONSTRAINT mail_deliveries_dead_lettered_at_check
        CHECK (status <> 'dead_lettered' OR dead_lettered_at IS NOT NULL)
);
-- Claim scan for due rows.
CREATE INDEX mail_deliveries_due_idx ON mail_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'retrying');
-- Recovery of rows whose lease expired mid-send.
CREATE INDEX mail_deliveries_sending_lease_idx ON mail_deliveries (leased_until)
    WHERE status = 'sending';
-- Listings newest first (per tenant and for operators), depth by status.
CREATE INDEX mail_deliveries_user_created_idx
    ON mail_deliveries (user_id, created_at DESC, delivery_id DESC);
CREATE INDEX mail_deliveries_created_idx ON mail_deliveries (created_at DESC, delivery_id DESC);
CREATE INDEX mail_deliveries_status_idx ON mail_deliveries (status);
CREATE INDEX mail_deliveries_message_idx ON mail_deliveries (message_id, user_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX mail_deliveries_expires_at_idx ON mail_deliveries (expires_at);

CREATE TABLE mail_recipients (
    recipient_id text NOT NULL,
    user_id      text NOT NULL,
    delivery_id  text NOT NULL,
    address      text NOT NULL,
    kind         text NOT NULL DEFAULT 'to',
    CONSTRAINT mail_recipients_pkey PRIMARY KEY (recipient_id),
    CONSTRAINT mail_recipients_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT mail_recipients_delivery_fkey FOREIGN KEY (delivery_id, user_id)
        REFERENCES mail_deliveries (delivery_id, user_id) ON DELETE CASCADE,
    CONSTRAINT mail_recipients_kind_check CHECK (kind IN ('to', 'cc', 'bcc')),
    CONSTRAINT mail_recipients_address_check CHECK (address <> ''),
    CONSTRAINT mail_recipients_delivery_kind_address_key UNIQUE (delivery_id, kind, address)
);
CREATE INDEX mail_recipients_user_id_idx ON mail_recipients (user_id);

CREATE TABLE mail_attempts (
    attempt_id  text        NOT NULL,
    user_id     text        NOT NULL,
    delivery_id text        NOT NULL,
    attempt_no  integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NULL,
    outcome     text        NOT NULL,
    -- Reply code of the final SMTP response, when there was one.
    smtp_code   integer     NULL,
    error       text        NOT NULL DEFAULT '',
    CONSTRAINT mail_attempts_pkey PRIMARY KEY (attempt_id),
    CONSTRAINT mail_attempts_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT mail_attempts_delivery_fkey FOREIGN KEY (delivery_id, user_id)
        REFERENCES mail_deliveries (delivery_id, user_id) ON DELETE CASCADE,
    CONSTRAINT mail_attempts_delivery_attempt_no_key UNIQUE (delivery_id, attempt_no),
    CONSTRAINT mail_attempts_attempt_no_check CHECK (attempt_no > 0),
    CONSTRAINT mail_attempts_outcome_check CHECK (outcome IN (
        'sent', 'temporary_failure', 'permanent_failure', 'lease_expired')),
    CONSTRAINT mail_attempts_smtp_code_check CHECK (smtp_code BETWEEN 200 AND 599)
);
CREATE INDEX mail_attempts_user_id_idx ON mail_attempts (user_id);

CREATE TABLE mail_dead_letters (
    dead_letter_id text        NOT NULL,
    user_id        text        NOT NULL,
    delivery_id    text        NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    reason         text        NOT NULL DEFAULT '',
    CONSTRAINT mail_dead_letters_pkey PRIMARY KEY (dead_letter_id),
    CONSTRAINT mail_dead_letters_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT mail_dead_letters_delivery_fkey FOREIGN KEY (delivery_id, user_id)
        REFERENCES mail_deliveries (delivery_id, user_id) ON DELETE CASCADE
);
CREATE INDEX mail_dead_letters_delivery_idx ON mail_dead_letters (delivery_id);
CREATE INDEX mail_dead_letters_archived_idx ON mail_dead_letters (archived_at DESC, dead_letter_id DESC);
CREATE INDEX mail_dead_letters_user_archived_idx ON mail_dead_letters (user_id, archived_at DESC);

CREATE FUNCTION e2a_notify_mail_outbox_new() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('mail_outbox_new', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER mail_deliveries_notify_insert_trg
    AFTER INSERT ON mail_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_notify_mail_outbox_new();

-- Operator re-send puts a row back to 'pending'.
CREATE TRIGGER mail_deliveries_notify_resend_trg
    AFTER UPDATE OF status ON mail_deliveries
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending')
    EXECUTE FUNCTION e2a_notify_mail_outbox_new();
