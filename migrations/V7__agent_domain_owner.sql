-- V7: an agent's domain belongs to the agent's owner (or is the shared
-- domain), enforced by the database and not only by the store.
--
-- agents.domain references domains(domain) alone, because agents of every
-- user live on the shared domain (whose row has user_id NULL), so a composite
-- (domain, user_id) key cannot express the rule. Without this trigger a bug in
-- a caller could place user B's agent on user A's domain, and A could then
-- neither delete the domain nor their account.
--
-- The foreign key also becomes NO ACTION (checked at the end of the
-- statement) instead of RESTRICT (checked per row): deleting a user cascades
-- to both their domains and their agents in one statement, and RESTRICT could
-- refuse that depending on the order the cascades run in. Deleting a domain
-- that still has agents keeps failing with the same constraint name.

CREATE FUNCTION agents_domain_owner_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM domains
        WHERE domain = NEW.domain
          AND (user_id IS NULL OR user_id = NEW.user_id)
    ) THEN
        RAISE EXCEPTION 'domain % is not owned by user % nor shared', NEW.domain, NEW.user_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'agents_domain_owner_check';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER agents_domain_owner_check
    BEFORE INSERT OR UPDATE OF domain, user_id ON agents
    FOR EACH ROW EXECUTE FUNCTION agents_domain_owner_check();

-- A domain's owner never changes once agents live on it.
CREATE FUNCTION domains_owner_stable_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.user_id IS DISTINCT FROM OLD.user_id
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

CREATE TRIGGER domains_owner_stable_check
    BEFORE UPDATE OF user_id ON domains
    FOR EACH ROW EXECUTE FUNCTION domains_owner_stable_check();

ALTER TABLE agents DROP CONSTRAINT agents_domain_fkey;
ALTER TABLE agents ADD CONSTRAINT agents_domain_fkey FOREIGN KEY (domain)
    REFERENCES domains (domain) ON DELETE NO ACTION;
