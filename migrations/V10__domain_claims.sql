-- V10: proof decides who owns a domain, not speed (original flaw: squatting).
--
-- Until V8 the first account to *register* a name owned it, verified or not,
-- so anyone could block a company's domain (or `sub.<another account's
-- verified domain>`) by registering it and never verifying. From V10:
--
--   * A row of `domains` is either a *pending claim* (verified = false) or
--     the *owned* domain (verified = true; the shared-domain system row, with
--     user_id NULL, is always verified). Several accounts may hold pending
--     claims of one name, each with its own verification token and DKIM key;
--     one account holds at most one row per name (domains_domain_user_id_key).
--   * `owned_domain` is the name on the owned row and NULL on pending claims.
--     Its unique constraint allows one owner per name whatever the
--     application does, and it is what agents reference: an agent can only
--     ever live on a verified (or the shared) domain, and that row cannot be
--     deleted or un-verified while agents use it.
--   * Who wins, what a claim may not touch (names under another account's
--     verified domain) and when pending claims expire is decided by the store
--     (crates/store/src/domains.rs), under advisory locks on the name.
--
-- Existing data migrates as is: names were unique, and agents only ever
-- lived on verified or shared domains (the store refused anything else).

ALTER TABLE agents DROP CONSTRAINT agents_domain_fkey;
ALTER TABLE domains DROP CONSTRAINT domains_pkey;

-- The store has always inserted the system row verified; now it must be.
ALTER TABLE domains ADD CONSTRAINT domains_shared_verified_check
    CHECK (user_id IS NOT NULL OR verified);

ALTER TABLE domains ADD COLUMN owned_domain text
    GENERATED ALWAYS AS (CASE WHEN verified THEN domain END) STORED;
ALTER TABLE domains ADD CONSTRAINT domains_owned_domain_key UNIQUE (owned_domain);
-- One claim per account and name; also the index for lookups by name.
ALTER TABLE domains ADD CONSTRAINT domains_domain_user_id_key UNIQUE (domain, user_id);
-- Pending claims by age, for the expiry sweep.
CREATE INDEX domains_pending_created_at_idx ON domains (created_at) WHERE NOT verified;

-- NO ACTION as in V7: checked at the end of the statement, so deleting a
-- user cascades to their domains and agents in any order.
ALTER TABLE agents ADD CONSTRAINT agents_domain_fkey FOREIGN KEY (domain)
    REFERENCES domains (owned_domain) ON DELETE NO ACTION;

-- V7's ownership rule, now against the owned row only: a pending claim of
-- the agent's owner is not enough when another account verified the name.
CREATE OR REPLACE FUNCTION agents_domain_owner_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM domains
        WHERE owned_domain = NEW.domain
          AND (user_id IS NULL OR user_id = NEW.user_id)
    ) THEN
        RAISE EXCEPTION 'domain % is not verified by user % nor shared', NEW.domain, NEW.user_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'agents_domain_owner_check';
    END IF;
    RETURN NEW;
END;
$$;

-- Agents hang off the owned row only; a pending claim's owner is irrelevant
-- to them.
CREATE OR REPLACE FUNCTION domains_owner_stable_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.verified
       AND NEW.user_id IS DISTINCT FROM OLD.user_id
       AND EXISTS (SELECT 1 FROM agents WHERE domain = OLD.domain
                   AND user_id IS DISTINCT FROM NEW.user_id
                   AND NEW.user_id IS NOT NULL) THEN
        RAISE EXCEPTION 'domain % still has agents of another user', OLD.domain
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'domains_owner_stable_check';
    END IF;
    RETURN NEW;
END;
$$;
