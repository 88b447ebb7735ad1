-- V11: a busy writer may wake the deliverer once per few milliseconds
-- instead of once per commit.
--
-- pg_notify in a committing transaction takes the database-wide
-- notification-queue lock from pre-commit until the commit record is
-- flushed, so every transaction that notifies commits one after another:
-- group commit is lost. Measured on the inbound ingest (20 sessions,
-- durable settings), the per-event NOTIFY alone cost about a third of the
-- throughput.
--
-- The event trigger now skips the NOTIFY when the transaction has set
-- `e2a.defer_notify = on` (SELECT set_config('e2a.defer_notify', 'on',
-- true)). A writer that does so takes over the wake-up: after its commit it
-- sends `NOTIFY webhook_events_new` itself, coalesced over a short window
-- (the store's ingest does, see crates/store/src/events.rs). The
-- notification stays a hint either way: the deliverer also polls, so a lost
-- wake delays delivery by at most its poll interval and loses nothing.
-- Every other writer keeps the per-commit NOTIFY.

CREATE OR REPLACE FUNCTION e2a_notify_webhook_events_new() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('e2a.defer_notify', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('webhook_events_new', '');
    END IF;
    RETURN NULL;
END
$$;
