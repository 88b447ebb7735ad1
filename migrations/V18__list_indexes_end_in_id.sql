-- V18: the list indexes of the events API and the delivery log end in the
-- row id.
--
-- GET /v1/events and GET /v1/webhooks/{id}/deliveries page in
-- (created_at DESC, id DESC) order with a (created_at, id) cursor. A page
-- filtered by event type or agent walks webhook_events_user_type_created_idx
-- or webhook_events_user_agent_created_idx, and a delivery page walks
-- webhook_subscriber_deliveries_webhook_created_idx; without the id those
-- need a sort of every tie on created_at (events of one inbound message
-- share their commit's timestamp), and a planner that prefers to avoid the
-- sort may walk the account's whole event index filtering on the type or
-- agent instead — a scan no page bound limits. With the id the index order
-- is the page order, so each page reads the index range it returns and
-- nothing else (crates/store/src/events.rs `list`,
-- crates/store/src/deliveries.rs `list`).
--
-- Replacing the indexes keeps their number: inserts maintain as many
-- entries as before.

DROP INDEX webhook_events_user_type_created_idx;
CREATE INDEX webhook_events_user_type_created_idx
    ON webhook_events (user_id, type, created_at DESC, id DESC);

DROP INDEX webhook_events_user_agent_created_idx;
CREATE INDEX webhook_events_user_agent_created_idx
    ON webhook_events (user_id, agent_id, created_at DESC, id DESC) WHERE agent_id IS NOT NULL;

DROP INDEX webhook_subscriber_deliveries_webhook_created_idx;
CREATE INDEX webhook_subscriber_deliveries_webhook_created_idx
    ON webhook_subscriber_deliveries (webhook_id, created_at DESC, id DESC);
