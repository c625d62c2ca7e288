-- A commit of a few transfers is one statement in its own implicit transaction (one round
-- trip where BEGIN, COPY, the commit's end and COMMIT took five; docs/design.md §13). Such
-- a statement cannot look at its result and roll back as the client does after the
-- longer form: it refuses itself through this function, which raises, so nothing it
-- wrote stays. ``code`` is the SQLSTATE the store maps back to its exception.
CREATE FUNCTION ledger_refuse_commit(code text, message text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
END
$$;
