-- V22: the claim returns what to send, so a delivery costs no extra read.
--
-- Until now a worker read the event (and, for email.received, the stored
-- raw message) with a second statement after claiming. The claim function
-- (V20, same locking and effects) now returns it: the test payload of a
-- test send, or the event's envelope and — for email.received — the raw
-- message bytes the deliverer puts into data.raw_message (NULL once the
-- message is gone; envelope NULL once the event is gone). The raw bytes of
-- at most one delivery per free worker are read at a time, as before.
DROP FUNCTION e2a_claim_subscriber_deliveries(bigint, float8, text);

CREATE FUNCTION e2a_claim_subscriber_deliveries(p_batch bigint, p_lease_secs float8, p_token text)
RETURNS TABLE (
    id text, webhook_id text, user_id text, url text, signing_secret text, prev text,
    event_id text, event_type text, envelope jsonb, raw_message bytea,
    attempts integer, max_attempts integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    due text[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT array_agg(k.id) INTO due FROM (
        SELECT k.id FROM webhooks k
         WHERE k.enabled AND k.next_due_at <= now()
           AND (k.inflight_until IS NULL OR k.inflight_until < now())
         ORDER BY k.next_due_at LIMIT p_batch FOR UPDATE SKIP LOCKED) k;
    IF due IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH w AS (SELECT unnest(due) AS id),
    d AS (
        SELECT x.id, x.webhook_id, x.event_id FROM w CROSS JOIN LATERAL (
            SELECT s.id, s.webhook_id, s.event_id FROM webhook_subscriber_deliveries s
             WHERE s.webhook_id = w.id AND s.status = 'pending' AND s.next_retry_at <= now()
               AND s.attempts < s.max_attempts
               AND (s.leased_until IS NULL OR s.leased_until < now())
             ORDER BY s.next_retry_at, s.id LIMIT 1 FOR UPDATE SKIP LOCKED) x),
    exhausted AS (
        UPDATE webhook_subscriber_deliveries s
           SET status = 'failed', leased_until = NULL, lease_token = NULL,
               last_error = 'no outcome was recorded for the last attempt'
         WHERE s.webhook_id IN (SELECT w.id FROM w) AND s.leased_until < now()
           AND s.status = 'pending' AND s.attempts >= s.max_attempts),
    idle AS (
        UPDATE webhooks k SET next_due_at = (
            SELECT s.next_retry_at FROM webhook_subscriber_deliveries s
             WHERE s.webhook_id = k.id AND s.status = 'pending'
               AND s.attempts < s.max_attempts
             ORDER BY s.next_retry_at, s.id LIMIT 1)
         WHERE k.id IN (SELECT w.id FROM w) AND k.id NOT IN (SELECT d.webhook_id FROM d)),
    hold AS (
        UPDATE webhooks k
           SET inflight_until = now() + make_interval(secs => p_lease_secs), inflight_token = p_token
          FROM d WHERE k.id = d.webhook_id
        RETURNING k.id, k.url, k.signing_secret,
                  CASE WHEN k.signing_secret_prev_expires_at > now() THEN k.signing_secret_prev END AS prev)
    UPDATE webhook_subscriber_deliveries s
       SET leased_until = now() + make_interval(secs => p_lease_secs), lease_token = p_token,
           attempts = s.attempts + 1, last_attempt_at = now()
      FROM d JOIN hold ON hold.id = d.webhook_id
      LEFT JOIN webhook_events e ON e.id = d.event_id
      LEFT JOIN messages m ON e.type = 'email.received'
                          AND m.id = e.message_id AND m.user_id = e.user_id
     WHERE s.id = d.id
    RETURNING s.id, s.webhook_id, s.user_id, hold.url, hold.signing_secret, hold.prev,
              s.event_id, s.event_type, COALESCE(s.event_payload, e.envelope), m.raw_message,
              s.attempts, s.max_attempts;
END
$$;
