-- V17: the subscriber delivery queue.
--
-- 1. At most one delivery in flight per webhook across every deliverer
--    replica (the original held this per process only). A claim locks the
--    webhook row (FOR UPDATE SKIP LOCKED) and marks it in flight with the
--    claim's lease (inflight_until / inflight_token, set and cleared
--    together); a webhook in flight is not claimable until its delivery is
--    recorded or the lease runs out (a crashed worker).
-- 2. webhooks.next_due_at is the earliest next_retry_at of the webhook's
--    pending deliveries (NULL: none), so a claim walks due webhooks through
--    one index instead of scanning deliveries: a webhook with a backlog of
--    thousands takes one slot, not the whole scan. Kept by the insert
--    trigger below and by every claim and record.
-- 3. Deliveries of an event reference it (event_id) instead of copying the
--    envelope: event_payload is NULL for them and set only for test sends,
--    which have no event.
ALTER TABLE webhook_subscriber_deliveries ALTER COLUMN event_payload DROP NOT NULL;
ALTER TABLE webhook_subscriber_deliveries ADD CONSTRAINT webhook_subscriber_deliveries_payload_check
    CHECK (event_id IS NOT NULL OR event_payload IS NOT NULL);
ALTER TABLE webhooks
    ADD COLUMN next_due_at    timestamptz NULL,
    ADD COLUMN inflight_until timestamptz NULL,
    ADD COLUMN inflight_token text        NULL,
    ADD CONSTRAINT webhooks_inflight_check CHECK ((inflight_until IS NULL) = (inflight_token IS NULL));
CREATE INDEX webhooks_next_due_idx ON webhooks (next_due_at)
    WHERE enabled AND next_due_at IS NOT NULL;
-- The next due delivery of one webhook, and its next_due_at.
CREATE INDEX webhook_subscriber_deliveries_webhook_due_idx
    ON webhook_subscriber_deliveries (webhook_id, next_retry_at, id) WHERE status = 'pending';

-- New pending deliveries pull their webhook's next_due_at forward.
CREATE FUNCTION e2a_deliveries_due_after_insert() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE webhooks w
       SET next_due_at = LEAST(COALESCE(w.next_due_at, n.due), n.due)
      FROM (SELECT webhook_id, min(next_retry_at) AS due FROM new_rows
             WHERE status = 'pending' GROUP BY webhook_id ORDER BY webhook_id) n
     WHERE w.id = n.webhook_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER webhook_subscriber_deliveries_due_trg
    AFTER INSERT ON webhook_subscriber_deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_deliveries_due_after_insert();

UPDATE webhooks w
   SET next_due_at = (SELECT min(d.next_retry_at) FROM webhook_subscriber_deliveries d
                       WHERE d.webhook_id = w.id AND d.status = 'pending');
