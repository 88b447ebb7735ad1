-- V20: the subscriber delivery claim as a function, so that what it reads
-- about a webhook's deliveries is never older than its lock on the webhook.
--
-- As one statement (V17), a claim read the deliveries with the snapshot
-- taken when the statement began, and locked the due webhooks during it. A
-- fan-out that committed in between (a new delivery D, and next_due_at
-- pulled forward by its insert trigger) was locked past, but D was not
-- seen: a webhook with nothing else due was then marked idle
-- (next_due_at = NULL, or the time of a later retry) and D waited until
-- another event or retry made the webhook due again.
--
-- In PL/pgSQL every statement takes a new snapshot (READ COMMITTED). The
-- function first locks the due webhooks (FOR UPDATE SKIP LOCKED), then does
-- everything else in a second statement: a fan-out that committed before
-- the lock is visible to it, and one that had not yet reached its insert
-- trigger blocks on the lock and applies its LEAST(next_due_at, due) after
-- this transaction commits. Either way no delivery is left behind.
--
-- Same parameters, rows and effects as the V17 statement otherwise; the
-- claim's transaction commits asynchronously (a lease is recomputed after a
-- crash), set here for the calling transaction only.
CREATE FUNCTION e2a_claim_subscriber_deliveries(p_batch bigint, p_lease_secs float8, p_token text)
RETURNS TABLE (
    id text, webhook_id text, user_id text, url text, signing_secret text, prev text,
    event_id text, event_type text, event_payload jsonb, attempts integer, max_attempts integer)
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
        SELECT x.id, x.webhook_id FROM w CROSS JOIN LATERAL (
            SELECT s.id, s.webhook_id FROM webhook_subscriber_deliveries s
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
     WHERE s.id = d.id
    RETURNING s.id, s.webhook_id, s.user_id, hold.url, hold.signing_secret, hold.prev,
              s.event_id, s.event_type, s.event_payload, s.attempts, s.max_attempts;
END
$$;
