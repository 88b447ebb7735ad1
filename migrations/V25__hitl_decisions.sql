-- V25: what a reviewer's decision needs from a held message.
--
-- A held reply is composed again when it is approved (a reviewer may edit
-- it), and it must thread exactly as it would have at the request: its
-- In-Reply-To is the parent's Message-ID (messages.email_message_id) and its
-- References chain is kept here, written with the hold and cleared with the
-- bodies when the message leaves pending_approval.
ALTER TABLE messages ADD COLUMN thread_refs text[] NULL;

-- Who or what decided a held message: the API (a reviewer's key), a magic
-- link from the notification mail, or the janitor when the hold expired.
-- NULL for messages never held.
ALTER TABLE messages ADD COLUMN decided_via text NULL,
    ADD CONSTRAINT messages_decided_via_check
        CHECK (decided_via IN ('api', 'magic_link', 'expiry'));
