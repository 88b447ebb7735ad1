-- V19: fewer index entries per subscriber delivery.
--
-- Fan-out writes one delivery per (event, matching webhook): with 50
-- webhooks an event costs 50 rows, so every index on the table is paid 50
-- times per event, and again on every update that moves next_retry_at.
--
-- * webhook_subscriber_deliveries_pending_idx (next_retry_at) WHERE pending
--   served the original's global claim scan. Claims now walk due webhooks
--   (webhooks_next_due_idx) and each one's next delivery through
--   webhook_subscriber_deliveries_webhook_due_idx (V17), which has the same
--   predicate; the queue gauges read that one too.
-- * The user_id foreign key (and webhook_subscriber_deliveries_user_created_idx,
--   which only served it and no query) repeats what the composite key
--   (webhook_id, user_id) -> webhooks (id, user_id) ON DELETE CASCADE
--   already guarantees: a delivery belongs to a webhook of the same user,
--   and deleting the user deletes the webhooks and, through them, the
--   deliveries. Every insert paid a lookup and a row lock on the users row
--   for it (one busy account: MultiXacts on one row).
--
-- Fan-out also stops copying the event's message_id into its deliveries
-- (crates/store/src/fanout.rs): the delivery references the event, and a
-- copied message_id made every insert check, and share-lock, the message
-- row through webhook_subscriber_deliveries_message_fkey — 50 lockers of one
-- row per event.

DROP INDEX webhook_subscriber_deliveries_pending_idx;
ALTER TABLE webhook_subscriber_deliveries DROP CONSTRAINT webhook_subscriber_deliveries_user_id_fkey;
DROP INDEX webhook_subscriber_deliveries_user_created_idx;
