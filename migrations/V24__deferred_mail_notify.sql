-- V24: a busy sender may wake the deliverer once per few milliseconds
-- instead of once per commit, as V11 did for events.
--
-- Every accepted outbound message inserts a mail delivery, whose statement
-- trigger NOTIFYs `mail_outbox_new` in the committing transaction; the
-- NOTIFY holds the database-wide notification-queue lock through the commit
-- flush and so serialises every send's commit (measured by the outbound
-- bench on plain SQL: 832 → 1,469 accepts/s without it). The trigger now
-- skips the NOTIFY when the transaction set `e2a.defer_notify = on`; such a
-- writer (the API's accept, crates/store/src/outbound.rs) wakes the
-- deliverer itself after its commit, coalesced (`events::wake_deliverer`:
-- any notification wakes every queue of the deliverer). The deliverer also
-- polls, so a lost wake-up delays mail by its poll interval and loses
-- nothing. An operator's re-send still NOTIFYs at once.

CREATE OR REPLACE FUNCTION e2a_notify_mail_outbox_new() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('e2a.defer_notify', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('mail_outbox_new', '');
    END IF;
    RETURN NULL;
END
$$;
