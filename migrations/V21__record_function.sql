-- V21: recording a subscriber delivery's outcome as a function, so the
-- webhook's next due time is computed under the webhook's lock.
--
-- A single-statement record that waited for a fan-out's lock on the
-- webhook computed next_due_at with a snapshot that could not see that
-- fan-out's deliveries; an interim fix (never released) made it due at once and
-- left the exact time to the next claim, which cost every delivery an extra
-- claim. Here the webhook row is locked first and everything read about its
-- deliveries afterwards comes from a newer snapshot (each PL/pgSQL statement
-- takes one, READ COMMITTED): a fan-out that committed before the lock is
-- seen; one still before its insert trigger blocks on the lock and pulls
-- next_due_at forward after this transaction commits.
--
-- Effects, in one transaction (the caller's implicit one: one round trip):
-- * the delivery's outcome, guarded by its lease token (no row returned
--   when the lease passed to another worker: nothing is written);
-- * the webhook released (guarded by the same token), its next due time,
--   last_delivered_at, consecutive_failures;
-- * auto-disable (spec §3.6) when the delivery ended failed and at least
--   p_threshold deliveries attempted within p_window_secs failed and none
--   was delivered (this one included).
-- Returns the delivery's final status and whether this failure disabled
-- the webhook. Commits durably (the caller's setting).
CREATE FUNCTION e2a_record_subscriber_delivery(
    p_id text, p_token text, p_kind text, p_retry_at timestamptz, p_status_code integer,
    p_error text, p_threshold bigint, p_window_secs float8)
RETURNS TABLE (status text, auto_disabled boolean)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_webhook text;
    v_status text;
    v_was_enabled boolean;
    v_trip boolean := false;
BEGIN
    UPDATE webhook_subscriber_deliveries s
       SET status = CASE p_kind
                      WHEN 'delivered' THEN 'delivered'
                      WHEN 'failed' THEN 'failed'
                      ELSE CASE WHEN s.attempts >= s.max_attempts THEN 'failed' ELSE 'pending' END
                    END,
           next_retry_at = COALESCE(p_retry_at, s.next_retry_at),
           last_status_code = p_status_code, last_error = p_error,
           leased_until = NULL, lease_token = NULL
     WHERE s.id = p_id AND s.lease_token = p_token AND s.status = 'pending'
    RETURNING s.webhook_id, s.status INTO v_webhook, v_status;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    SELECT k.enabled INTO v_was_enabled FROM webhooks k
     WHERE k.id = v_webhook AND k.inflight_token = p_token
       FOR UPDATE;
    IF NOT FOUND THEN
        -- The webhook's lease passed on; its new holder owns it.
        RETURN QUERY SELECT v_status, false;
        RETURN;
    END IF;

    IF v_status = 'failed' THEN
        SELECT count(*) FILTER (WHERE o.status = 'failed') >= p_threshold
               AND count(*) FILTER (WHERE o.status = 'delivered') = 0
          INTO v_trip
          FROM webhook_subscriber_deliveries o
         WHERE o.webhook_id = v_webhook
           AND o.last_attempt_at > now() - make_interval(secs => p_window_secs);
    END IF;

    UPDATE webhooks k
       SET inflight_until = NULL, inflight_token = NULL,
           next_due_at = (SELECT o.next_retry_at FROM webhook_subscriber_deliveries o
                           WHERE o.webhook_id = k.id AND o.status = 'pending'
                             AND o.attempts < o.max_attempts
                           ORDER BY o.next_retry_at, o.id LIMIT 1),
           last_delivered_at = CASE WHEN v_status = 'delivered' THEN now() ELSE k.last_delivered_at END,
           consecutive_failures = CASE WHEN v_status = 'delivered' THEN 0
                                       WHEN v_status = 'failed' THEN k.consecutive_failures + 1
                                       ELSE k.consecutive_failures END,
           enabled = k.enabled AND NOT v_trip,
           auto_disabled_at = CASE WHEN k.enabled AND v_trip THEN now() ELSE k.auto_disabled_at END
     WHERE k.id = v_webhook;

    RETURN QUERY SELECT v_status, v_was_enabled AND v_trip;
END
$$;
