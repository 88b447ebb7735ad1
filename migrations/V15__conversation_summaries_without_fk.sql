-- V15: a conversation summary costs ingest one upsert, no more.
--
-- conversation_summaries_agent_fkey ran a FOR KEY SHARE lookup of the
-- agent for every summary an ingest inserted (one per new conversation,
-- i.e. most inbound mail), measured at about a tenth of the relay's
-- durable throughput together with the summary's owner index. Both are
-- redundant: summaries are written only by the triggers on messages, whose
-- rows already reference their agent (messages_agent_fkey), and a deleted
-- agent's messages are deleted by that key's cascade, whose DELETE trigger
-- deletes the summaries that lose their last member. Nothing reads
-- summaries by owner.
ALTER TABLE conversation_summaries DROP CONSTRAINT conversation_summaries_agent_fkey;
DROP INDEX conversation_summaries_user_id_idx;
