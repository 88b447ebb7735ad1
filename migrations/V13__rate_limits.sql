-- V13: rate limits shared by every API replica.
--
-- One row per limited key (for example `send:<agent>`), holding the key's
-- theoretical arrival time (GCRA): a key allowed `burst` requests per
-- `burst * interval` admits a request when `max(tat, now) + interval - now
-- <= burst * interval`, and the admitted request moves tat forward by one
-- interval. The check and the move are one upsert under the row lock, so
-- concurrent replicas never admit more than the limit together.
--
-- UNLOGGED: no WAL per request. After a database crash the table is
-- emptied, which forgets at most one window of usage; losing rate-limit
-- state is harmless, unlike every other table here. A row whose tat has
-- passed means a full bucket, exactly like no row: the janitor deletes them.
CREATE UNLOGGED TABLE rate_limits (
    key text        NOT NULL,
    tat timestamptz NOT NULL,
    CONSTRAINT rate_limits_pkey PRIMARY KEY (key),
    CONSTRAINT rate_limits_key_check CHECK (length(key) BETWEEN 1 AND 512)
);
CREATE INDEX rate_limits_tat_idx ON rate_limits (tat);
