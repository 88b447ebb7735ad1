-- V26: the delivery queues' functions plan their statements once.
--
-- PL/pgSQL caches each statement's plan, but for the first five calls of a
-- session, and then whenever a custom plan looks cheaper than the generic
-- one, it plans the statement again for the call's values. The claim's
-- statements take a LIMIT and an array of webhook ids as parameters, which
-- a generic plan can only guess at, so every claim was planned anew: a
-- sixth of the database's time while draining a backlog. Their plans do not
-- depend on the values (every access is by index: webhooks due in
-- `next_due_at` order, each webhook's oldest due delivery, rows by key), so
-- they keep the generic plan.
ALTER FUNCTION e2a_claim_subscriber_deliveries(bigint, float8, text)
    SET plan_cache_mode = force_generic_plan;

ALTER FUNCTION e2a_record_subscriber_delivery(text, text, text, timestamptz, integer, text, bigint, float8)
    SET plan_cache_mode = force_generic_plan;

-- The mail outbox's claim: the same shape (a LIMIT and arrays of ids as
-- parameters, every access by index).
ALTER FUNCTION e2a_claim_mail_deliveries(integer, float8, text, float8)
    SET plan_cache_mode = force_generic_plan;
