-- V27: tell API replicas when a key may have stopped working.
--
-- The API keeps authenticated keys in memory for a few seconds
-- (E2A_API_KEY_CACHE_SECS) instead of looking each request's key up. Every
-- statement that revokes, deletes, re-keys, re-assigns or changes the
-- expiry of api_keys rows (a user's deletion cascades here too) notifies
-- `api_keys_changed` at commit, and every replica empties its cache when the
-- notification arrives. Statement level: one notification per statement,
-- however many rows; `last_used_at` touches (every request's lookup, at most
-- once a minute per key) do not fire it. Creating a key needs no
-- notification: only keys found valid are cached.
CREATE FUNCTION e2a_api_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('api_keys_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed
    AFTER UPDATE OF revoked_at, expires_at, key_hash, user_id OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_api_keys_changed();

CREATE TRIGGER api_keys_truncated
    AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_api_keys_changed();
