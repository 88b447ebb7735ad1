-- V16: typed webhook filters.
--
-- The original kept a webhook's filters in one jsonb object
-- ({agent_ids?, conversation_ids?, labels?}) and matched them in Go after
-- loading every webhook of the account. Three text[] columns replace it, so
-- the fan-out can match an event in SQL:
--
--   (cardinality(filter_agent_ids) = 0 OR e.agent_id = ANY (filter_agent_ids))
--   AND (cardinality(filter_conversation_ids) = 0
--        OR e.conversation_id = ANY (filter_conversation_ids))
--   AND (cardinality(filter_labels) = 0 OR e.labels && filter_labels)
--
-- (AND across kinds, OR within a kind, an empty list is no constraint; an
-- event without the routed value never matches a non-empty list — spec
-- §4.3.) The jsonb column is dropped: the typed columns are the only
-- source of truth, and the API renders `filters` from them.
--
-- Each list holds at most 50 values (spec §8). Agent ids are the agents'
-- normalised addresses (the API only accepts agents of the caller),
-- conversation ids match [A-Za-z0-9_-]{1,200} (spec §4.5), labels the label
-- format of messages ([a-z0-9:_-]{1,64}, e2a_labels_valid). No NULL
-- elements anywhere. Descriptions never hold CR or LF.

ALTER TABLE webhooks
    ADD COLUMN filter_agent_ids        text[] NOT NULL DEFAULT '{}',
    ADD COLUMN filter_conversation_ids text[] NOT NULL DEFAULT '{}',
    ADD COLUMN filter_labels           text[] NOT NULL DEFAULT '{}';

-- Carry over whatever the jsonb held (written by nothing in this build, but
-- a database restored from elsewhere may have rows).
UPDATE webhooks SET
    filter_agent_ids = CASE WHEN jsonb_typeof(filters -> 'agent_ids') = 'array'
        THEN ARRAY(SELECT jsonb_array_elements_text(filters -> 'agent_ids')) ELSE '{}' END,
    filter_conversation_ids = CASE WHEN jsonb_typeof(filters -> 'conversation_ids') = 'array'
        THEN ARRAY(SELECT jsonb_array_elements_text(filters -> 'conversation_ids')) ELSE '{}' END,
    filter_labels = CASE WHEN jsonb_typeof(filters -> 'labels') = 'array'
        THEN ARRAY(SELECT jsonb_array_elements_text(filters -> 'labels')) ELSE '{}' END
WHERE filters <> '{}'::jsonb;

ALTER TABLE webhooks DROP CONSTRAINT webhooks_filters_check;
ALTER TABLE webhooks DROP COLUMN filters;

-- True when every element is non-NULL and matches `pattern`. PL/pgSQL, so a
-- CHECK that calls it does not re-plan a SQL function per statement (V12).
CREATE FUNCTION e2a_all_match(vals text[], pattern text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    v text;
BEGIN
    FOREACH v IN ARRAY vals LOOP
        IF v IS NULL OR v !~ pattern THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

ALTER TABLE webhooks
    ADD CONSTRAINT webhooks_filter_agent_ids_check CHECK (
        cardinality(filter_agent_ids) <= 50
        AND e2a_all_match(filter_agent_ids, '^[^[:space:][:cntrl:]]{1,200}$')),
    ADD CONSTRAINT webhooks_filter_conversation_ids_check CHECK (
        cardinality(filter_conversation_ids) <= 50
        AND e2a_all_match(filter_conversation_ids, '^[A-Za-z0-9_-]{1,200}$')),
    ADD CONSTRAINT webhooks_filter_labels_check CHECK (
        cardinality(filter_labels) <= 50 AND e2a_labels_valid(filter_labels)),
    ADD CONSTRAINT webhooks_description_line_check CHECK (description !~ '[\r\n]');
