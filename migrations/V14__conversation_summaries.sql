-- V14: one summary row per conversation, so a page of an agent's
-- conversations reads a page of an index instead of grouping the agent's
-- whole mailbox on every call.
--
--   conversation_summaries   per (agent, conversation_id) over the messages
--                            stored for it, expired or not: first and last
--                            created_at, the newest member's id, subject and
--                            sender, counts by direction, unread count, and
--                            the earliest and latest expires_at. The list
--                            walks conversation_summaries_agent_last_idx.
--
-- Kept by triggers on messages (rows with conversation_id = '' have none):
--   INSERT (per statement)  one upsert per touched conversation, in key
--                           order: counts add up, first/last/newest move.
--   UPDATE (per row)        of inbox_status alone: unread_count moves by
--                           the difference. Of any other summarised column
--                           (created_at, expires_at, subject, sender,
--                           direction, conversation_id, agent_id): the old
--                           and new conversations are recomputed.
--   DELETE (per statement)  every touched conversation is recomputed from
--                           its remaining members (the conversation index),
--                           its summary deleted when none remain.
-- A recompute locks the summary row first and aggregates afterwards in a
-- new statement: under READ COMMITTED that statement's snapshot includes
-- every insert that committed while we waited, and an insert that commits
-- later adds itself to what we wrote (its upsert increments the row
-- version it finds), so no member is lost or counted twice. Under
-- REPEATABLE READ a summary row changed after the snapshot makes the lock a
-- serialization failure, which the store retries.
--
-- Expiry is time, not a write: a member past expires_at stays counted until
-- the janitor deletes it. The list hides conversations whose members have
-- all expired (max_expires_at <= now()) and recomputes, from the members
-- still visible, only the summaries with an expired member
-- (min_expires_at <= now()) — normally none, or the few the janitor is
-- about to sweep.

CREATE TABLE conversation_summaries (
    agent_id            text        NOT NULL,
    user_id             text        NOT NULL,
    conversation_id     text        NOT NULL,
    first_message_at    timestamptz NOT NULL,
    last_message_at     timestamptz NOT NULL,
    -- The newest member by (created_at, id): breaks ties for "latest".
    last_message_id     text        NOT NULL,
    message_count       bigint      NOT NULL,
    inbound_count       bigint      NOT NULL,
    outbound_count      bigint      NOT NULL,
    unread_count        bigint      NOT NULL,
    latest_subject      text        NOT NULL,
    latest_sender       text        NOT NULL,
    min_expires_at      timestamptz NOT NULL,
    max_expires_at      timestamptz NOT NULL,
    CONSTRAINT conversation_summaries_pkey PRIMARY KEY (agent_id, conversation_id),
    CONSTRAINT conversation_summaries_agent_fkey FOREIGN KEY (agent_id, user_id)
        REFERENCES agents (id, user_id) ON DELETE CASCADE,
    CONSTRAINT conversation_summaries_conversation_id_check CHECK (conversation_id <> ''),
    CONSTRAINT conversation_summaries_counts_check CHECK (
        message_count > 0 AND inbound_count >= 0 AND outbound_count >= 0
        AND inbound_count + outbound_count = message_count
        AND unread_count BETWEEN 0 AND inbound_count)
);
-- An agent's conversations, most recently active first.
CREATE INDEX conversation_summaries_agent_last_idx
    ON conversation_summaries (agent_id, last_message_at DESC, conversation_id DESC);
-- FK support for the owner (user deletion cascades through agents).
CREATE INDEX conversation_summaries_user_id_idx ON conversation_summaries (user_id);

-- Recomputes the summary of (p_agent_id, p_conversation_id) from the stored
-- members, after locking it. Deletes it when no member remains; inserts a
-- missing one only when p_may_insert (the DELETE path never does: during a
-- cascade the agent may already be gone).
CREATE FUNCTION e2a_conversation_summary_refresh(
    p_agent_id text, p_conversation_id text, p_may_insert boolean) RETURNS void
    LANGUAGE plpgsql
AS $$
DECLARE
    s record;
BEGIN
    IF p_conversation_id = '' THEN
        RETURN;
    END IF;
    PERFORM 1 FROM conversation_summaries
     WHERE agent_id = p_agent_id AND conversation_id = p_conversation_id
       FOR UPDATE;
    SELECT min(m.user_id) AS user_id, min(m.created_at) AS first_at, max(m.created_at) AS last_at,
           (array_agg(m.id ORDER BY m.created_at DESC, m.id DESC))[1] AS last_id,
           count(*) AS n,
           count(*) FILTER (WHERE m.direction = 'inbound') AS n_in,
           count(*) FILTER (WHERE m.direction = 'outbound') AS n_out,
           count(*) FILTER (WHERE m.inbox_status = 'unread') AS n_unread,
           (array_agg(m.subject ORDER BY m.created_at DESC, m.id DESC))[1] AS subject,
           (array_agg(CASE WHEN m.direction = 'outbound' AND m.sender = '' THEN m.agent_id
                           ELSE m.sender END ORDER BY m.created_at DESC, m.id DESC))[1] AS sender,
           min(m.expires_at) AS min_exp, max(m.expires_at) AS max_exp
      INTO s
      FROM messages m
     WHERE m.agent_id = p_agent_id AND m.conversation_id = p_conversation_id;
    IF s.n = 0 THEN
        DELETE FROM conversation_summaries
         WHERE agent_id = p_agent_id AND conversation_id = p_conversation_id;
    ELSIF p_may_insert THEN
        INSERT INTO conversation_summaries AS c (agent_id, user_id, conversation_id,
            first_message_at, last_message_at, last_message_id, message_count, inbound_count,
            outbound_count, unread_count, latest_subject, latest_sender, min_expires_at,
            max_expires_at)
        VALUES (p_agent_id, s.user_id, p_conversation_id, s.first_at, s.last_at, s.last_id, s.n,
                s.n_in, s.n_out, s.n_unread, s.subject, s.sender, s.min_exp, s.max_exp)
        ON CONFLICT (agent_id, conversation_id) DO UPDATE
            SET first_message_at = EXCLUDED.first_message_at,
                last_message_at = EXCLUDED.last_message_at,
                last_message_id = EXCLUDED.last_message_id,
                message_count = EXCLUDED.message_count,
                inbound_count = EXCLUDED.inbound_count,
                outbound_count = EXCLUDED.outbound_count,
                unread_count = EXCLUDED.unread_count,
                latest_subject = EXCLUDED.latest_subject,
                latest_sender = EXCLUDED.latest_sender,
                min_expires_at = EXCLUDED.min_expires_at,
                max_expires_at = EXCLUDED.max_expires_at;
    ELSE
        UPDATE conversation_summaries
           SET first_message_at = s.first_at, last_message_at = s.last_at,
               last_message_id = s.last_id, message_count = s.n, inbound_count = s.n_in,
               outbound_count = s.n_out, unread_count = s.n_unread, latest_subject = s.subject,
               latest_sender = s.sender, min_expires_at = s.min_exp, max_expires_at = s.max_exp
         WHERE agent_id = p_agent_id AND conversation_id = p_conversation_id;
    END IF;
END
$$;

CREATE FUNCTION e2a_messages_conversations_after_insert() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO conversation_summaries AS c (agent_id, user_id, conversation_id,
        first_message_at, last_message_at, last_message_id, message_count, inbound_count,
        outbound_count, unread_count, latest_subject, latest_sender, min_expires_at,
        max_expires_at)
    SELECT n.agent_id, n.user_id, n.conversation_id, min(n.created_at), max(n.created_at),
           (array_agg(n.id ORDER BY n.created_at DESC, n.id DESC))[1],
           count(*),
           count(*) FILTER (WHERE n.direction = 'inbound'),
           count(*) FILTER (WHERE n.direction = 'outbound'),
           count(*) FILTER (WHERE n.inbox_status = 'unread'),
           (array_agg(n.subject ORDER BY n.created_at DESC, n.id DESC))[1],
           (array_agg(CASE WHEN n.direction = 'outbound' AND n.sender = '' THEN n.agent_id
                           ELSE n.sender END ORDER BY n.created_at DESC, n.id DESC))[1],
           min(n.expires_at), max(n.expires_at)
      FROM new_rows n
     WHERE n.conversation_id <> ''
     GROUP BY n.agent_id, n.user_id, n.conversation_id
     -- A fixed lock order, so concurrent multi-conversation inserts cannot deadlock.
     ORDER BY n.agent_id, n.conversation_id
    ON CONFLICT (agent_id, conversation_id) DO UPDATE
        SET first_message_at = LEAST(c.first_message_at, EXCLUDED.first_message_at),
            last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
            last_message_id = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id)
                                        > (c.last_message_at, c.last_message_id)
                                   THEN EXCLUDED.last_message_id ELSE c.last_message_id END,
            latest_subject = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id)
                                       > (c.last_message_at, c.last_message_id)
                                  THEN EXCLUDED.latest_subject ELSE c.latest_subject END,
            latest_sender = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id)
                                      > (c.last_message_at, c.last_message_id)
                                 THEN EXCLUDED.latest_sender ELSE c.latest_sender END,
            message_count = c.message_count + EXCLUDED.message_count,
            inbound_count = c.inbound_count + EXCLUDED.inbound_count,
            outbound_count = c.outbound_count + EXCLUDED.outbound_count,
            unread_count = c.unread_count + EXCLUDED.unread_count,
            min_expires_at = LEAST(c.min_expires_at, EXCLUDED.min_expires_at),
            max_expires_at = GREATEST(c.max_expires_at, EXCLUDED.max_expires_at);
    RETURN NULL;
END
$$;

CREATE FUNCTION e2a_messages_conversations_after_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.agent_id = NEW.agent_id AND OLD.conversation_id = NEW.conversation_id
       AND OLD.direction = NEW.direction AND OLD.created_at = NEW.created_at
       AND OLD.expires_at = NEW.expires_at AND OLD.subject = NEW.subject
       AND OLD.sender = NEW.sender THEN
        -- Read-on-get and friends: only the unread count moves.
        IF NEW.conversation_id <> '' THEN
            UPDATE conversation_summaries
               SET unread_count = unread_count
                   + (NEW.inbox_status IS NOT DISTINCT FROM 'unread')::int
                   - (OLD.inbox_status IS NOT DISTINCT FROM 'unread')::int
             WHERE agent_id = NEW.agent_id AND conversation_id = NEW.conversation_id;
        END IF;
    ELSE
        -- Rare (an edited draft, a moved message): recompute both sides, in
        -- key order.
        IF (OLD.agent_id, OLD.conversation_id) <= (NEW.agent_id, NEW.conversation_id) THEN
            PERFORM e2a_conversation_summary_refresh(OLD.agent_id, OLD.conversation_id, true);
            PERFORM e2a_conversation_summary_refresh(NEW.agent_id, NEW.conversation_id, true);
        ELSE
            PERFORM e2a_conversation_summary_refresh(NEW.agent_id, NEW.conversation_id, true);
            PERFORM e2a_conversation_summary_refresh(OLD.agent_id, OLD.conversation_id, true);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION e2a_messages_conversations_after_delete() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT DISTINCT o.agent_id, o.conversation_id FROM old_rows o
              WHERE o.conversation_id <> ''
              ORDER BY o.agent_id, o.conversation_id LOOP
        PERFORM e2a_conversation_summary_refresh(t.agent_id, t.conversation_id, false);
    END LOOP;
    RETURN NULL;
END
$$;

-- Named so they fire before messages_storage_*: every writer locks
-- conversation summaries before account_usage rows.
CREATE TRIGGER messages_conversations_insert_trg
    AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_messages_conversations_after_insert();

CREATE TRIGGER messages_conversations_update_trg
    AFTER UPDATE OF inbox_status, created_at, expires_at, subject, sender, direction,
        conversation_id, agent_id ON messages
    FOR EACH ROW
    WHEN (OLD.inbox_status IS DISTINCT FROM NEW.inbox_status
          OR OLD.created_at IS DISTINCT FROM NEW.created_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.subject IS DISTINCT FROM NEW.subject
          OR OLD.sender IS DISTINCT FROM NEW.sender
          OR OLD.direction IS DISTINCT FROM NEW.direction
          OR OLD.conversation_id IS DISTINCT FROM NEW.conversation_id
          OR OLD.agent_id IS DISTINCT FROM NEW.agent_id)
    EXECUTE FUNCTION e2a_messages_conversations_after_update();

CREATE TRIGGER messages_conversations_delete_trg
    AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION e2a_messages_conversations_after_delete();

-- The conversations of the messages already stored.
INSERT INTO conversation_summaries (agent_id, user_id, conversation_id, first_message_at,
    last_message_at, last_message_id, message_count, inbound_count, outbound_count,
    unread_count, latest_subject, latest_sender, min_expires_at, max_expires_at)
SELECT m.agent_id, m.user_id, m.conversation_id, min(m.created_at), max(m.created_at),
       (array_agg(m.id ORDER BY m.created_at DESC, m.id DESC))[1],
       count(*),
       count(*) FILTER (WHERE m.direction = 'inbound'),
       count(*) FILTER (WHERE m.direction = 'outbound'),
       count(*) FILTER (WHERE m.inbox_status = 'unread'),
       (array_agg(m.subject ORDER BY m.created_at DESC, m.id DESC))[1],
       (array_agg(CASE WHEN m.direction = 'outbound' AND m.sender = '' THEN m.agent_id
                       ELSE m.sender END ORDER BY m.created_at DESC, m.id DESC))[1],
       min(m.expires_at), max(m.expires_at)
  FROM messages m
 WHERE m.conversation_id <> ''
 GROUP BY m.agent_id, m.user_id, m.conversation_id;
