-- V23: outbound mail, queue-first.
--
-- 1. The exactly-once gate (`send_attempts`) belongs to the mail delivery,
--    not to the message. V4 keyed it by message id with ON DELETE CASCADE
--    from messages, so deleting the agent (or the 10-day message TTL
--    sweep) while the delivery was still live removed the gate, and a
--    second deliverer could send again (the original's flaw 12 in another
--    form). Now it is keyed by the delivery and lives exactly as long as
--    the delivery: nothing that happens to the message removes it.
-- 2. Per-recipient state on `mail_recipients`: an SMTP server answers
--    each RCPT on its own, so a retry goes only to the recipients still
--    pending; one permanently refused recipient does not fail the others.
-- 3. What the deliverer needs to send without reading the message row:
--    the envelope sender and the DKIM signing domain on the delivery, and
--    the SMTP reply text of each attempt.
-- 4. The worker's claim as a function (one round trip, see below).

ALTER TABLE send_attempts DROP CONSTRAINT send_attempts_message_fkey;
ALTER TABLE send_attempts RENAME COLUMN message_id TO delivery_id;
ALTER TABLE send_attempts RENAME CONSTRAINT send_attempts_pkey TO send_attempts_delivery_pkey;
ALTER TABLE send_attempts ADD CONSTRAINT send_attempts_delivery_fkey
    FOREIGN KEY (delivery_id, user_id) REFERENCES mail_deliveries (delivery_id, user_id)
    ON DELETE CASCADE;

ALTER TABLE mail_recipients
    ADD COLUMN status text NOT NULL DEFAULT 'pending',
    ADD COLUMN smtp_code integer NULL,
    ADD COLUMN reply text NOT NULL DEFAULT '',
    ADD CONSTRAINT mail_recipients_status_check CHECK (status IN ('pending', 'sent', 'failed')),
    ADD CONSTRAINT mail_recipients_smtp_code_check CHECK (smtp_code BETWEEN 200 AND 599);

ALTER TABLE mail_deliveries
    ADD COLUMN mail_from text NOT NULL DEFAULT '',
    -- '' = send unsigned (no key for the From domain).
    ADD COLUMN dkim_domain text NOT NULL DEFAULT '';

ALTER TABLE mail_attempts
    ADD COLUMN reply text NOT NULL DEFAULT '',
    DROP CONSTRAINT mail_attempts_outcome_check,
    ADD CONSTRAINT mail_attempts_outcome_check CHECK (outcome IN (
        'sent', 'temporary_failure', 'permanent_failure', 'lease_expired', 'already_sent'));

-- Claim up to p_max due deliveries for one worker, in one transaction:
--
-- * due = pending/retrying with next_attempt_at <= now(), or `sending`
--   whose lease lapsed (its deliverer died or stalled); oldest first,
--   FOR UPDATE SKIP LOCKED so replicas split the queue;
-- * each passes the send gate (spec §3.2): a new gate row, or one whose
--   last attempt `failed`, or one `attempting` for longer than
--   p_gate_stale_secs, is (re)taken: gate 'acquired'. A gate that says
--   `sent` is returned as 'already_sent' (record it sent, do not submit).
--   A gate another attempt holds fresh (its deliverer lost the lease but
--   may still be talking to the server) is not returned: the delivery
--   waits, `retrying`, until that gate goes stale;
-- * returned deliveries are leased (status `sending`, p_token, p_lease_secs)
--   and their message, when it still exists and is waiting, becomes
--   `sending`.
--
-- Returns the delivery, the payload, the still-pending recipients and the
-- message facts the deliverer's events need.
CREATE FUNCTION e2a_claim_mail_deliveries(
    p_max integer, p_lease_secs float8, p_token text, p_gate_stale_secs float8)
RETURNS TABLE (
    delivery_id text, user_id text, message_id text, gate text, attempts integer,
    max_attempts integer, mail_from text, dkim_domain text, body bytea,
    rcpt_addresses text[], rcpt_kinds text[],
    agent_id text, message_type text, subject text, conversation_id text,
    provider_message_id text, to_recipients text[], cc text[], bcc text[])
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_ids text[];
    v_users text[];
    v_acquired text[];
    v_sent text[];
BEGIN
    WITH due AS (
        SELECT d.delivery_id, d.user_id, d.next_attempt_at AS at FROM mail_deliveries d
         WHERE d.status IN ('pending', 'retrying') AND d.next_attempt_at <= now()
         ORDER BY d.next_attempt_at LIMIT p_max FOR UPDATE SKIP LOCKED),
    lapsed AS (
        SELECT d.delivery_id, d.user_id, d.leased_until AS at FROM mail_deliveries d
         WHERE d.status = 'sending' AND d.leased_until < now()
         ORDER BY d.leased_until LIMIT p_max FOR UPDATE SKIP LOCKED)
    SELECT array_agg(c.delivery_id), array_agg(c.user_id) INTO v_ids, v_users FROM (
        SELECT u.delivery_id, u.user_id FROM (
            SELECT due.delivery_id, due.user_id, due.at FROM due
            UNION ALL
            SELECT lapsed.delivery_id, lapsed.user_id, lapsed.at FROM lapsed) u
         ORDER BY u.at LIMIT p_max) c;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- The gate: take it where allowed.
    WITH g AS (
        INSERT INTO send_attempts AS s (delivery_id, user_id, status, attempted_at, completed_at)
        SELECT i.id, i.u, 'attempting', now(), NULL FROM unnest(v_ids, v_users) AS i(id, u)
        ON CONFLICT (delivery_id) DO UPDATE
           SET status = 'attempting', attempted_at = now(), completed_at = NULL,
               provider_message_id = '', method = '', error = ''
         WHERE s.status = 'failed'
            OR (s.status = 'attempting'
                AND s.attempted_at < now() - make_interval(secs => p_gate_stale_secs))
        RETURNING s.delivery_id)
    SELECT array_agg(g.delivery_id) INTO v_acquired FROM g;
    v_acquired := COALESCE(v_acquired, '{}');

    SELECT array_agg(s.delivery_id) INTO v_sent FROM send_attempts s
     WHERE s.delivery_id = ANY (v_ids) AND s.status = 'sent'
       AND NOT s.delivery_id = ANY (v_acquired);
    v_sent := COALESCE(v_sent, '{}');

    -- Held by a live attempt elsewhere: wait until its gate goes stale.
    UPDATE mail_deliveries d
       SET status = 'retrying', leased_until = NULL, lease_token = NULL, updated_at = now(),
           next_attempt_at = s.attempted_at + make_interval(secs => p_gate_stale_secs)
      FROM send_attempts s
     WHERE d.delivery_id = ANY (v_ids) AND s.delivery_id = d.delivery_id
       AND NOT d.delivery_id = ANY (v_acquired) AND NOT d.delivery_id = ANY (v_sent);

    UPDATE mail_deliveries d
       SET status = 'sending', lease_token = p_token, updated_at = now(),
           leased_until = now() + make_interval(secs => p_lease_secs)
     WHERE d.delivery_id = ANY (v_acquired) OR d.delivery_id = ANY (v_sent);

    UPDATE messages m SET status = 'sending'
      FROM mail_deliveries d
     WHERE d.delivery_id = ANY (v_acquired) AND m.id = d.message_id AND m.user_id = d.user_id
       AND m.status IN ('queued', 'approved', 'expired_approved');

    RETURN QUERY
    SELECT d.delivery_id, d.user_id, d.message_id,
           CASE WHEN d.delivery_id = ANY (v_acquired) THEN 'acquired' ELSE 'already_sent' END,
           d.attempts, d.max_attempts, d.mail_from, d.dkim_domain, p.body,
           COALESCE(r.addresses, '{}'), COALESCE(r.kinds, '{}'),
           m.agent_id, m.message_type, m.subject, m.conversation_id, m.provider_message_id,
           m.to_recipients, m.cc, m.bcc
      FROM mail_deliveries d
      JOIN mail_payloads p ON p.payload_id = d.payload_id
      LEFT JOIN messages m ON m.id = d.message_id AND m.user_id = d.user_id
      LEFT JOIN LATERAL (
          SELECT array_agg(x.address ORDER BY x.recipient_id) AS addresses,
                 array_agg(x.kind ORDER BY x.recipient_id) AS kinds
            FROM mail_recipients x
           WHERE x.delivery_id = d.delivery_id AND x.status = 'pending') r ON true
     WHERE d.delivery_id = ANY (v_acquired) OR d.delivery_id = ANY (v_sent);
END
$$;
