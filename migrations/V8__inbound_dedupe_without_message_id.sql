-- V8: MTA retries of mail without a Message-ID are deduplicated too.
--
-- V3's dedupe index skipped rows with an empty Message-ID, so a retry of such
-- a message (the commit succeeded but the 250 was lost) stored a second copy
-- and a second email.received event (the original's flaw 2). body_sha256 is
-- the SHA-256 of the complete raw message and the relay stores the bytes it
-- received unchanged, so the same agent, Message-ID (possibly empty) and raw
-- bytes identify one delivery.
--
-- Rows that the old index let through are exact duplicates (same recipient,
-- same raw bytes); all but the earliest are removed before the stricter
-- index is built.

DELETE FROM messages m
USING messages keep
WHERE m.direction = 'inbound' AND keep.direction = 'inbound'
  AND m.email_message_id = '' AND keep.email_message_id = ''
  AND m.agent_id = keep.agent_id
  AND m.body_sha256 = keep.body_sha256
  AND (keep.created_at, keep.id) < (m.created_at, m.id);

DROP INDEX messages_inbound_dedupe_key;
CREATE UNIQUE INDEX messages_inbound_dedupe_key
    ON messages (agent_id, email_message_id, body_sha256)
    WHERE direction = 'inbound';
