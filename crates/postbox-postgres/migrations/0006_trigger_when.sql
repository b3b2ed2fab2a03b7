-- `enqueue` and `enqueue_batch` take the key's advisory lock and then the
-- row's `seq` in their own statement (an InitPlan runs before the first row
-- is projected, so the lock is held before `nextval`), which costs less than
-- the per-row plpgsql call. The trigger now runs only for rows that arrive
-- without a `seq`: plain-SQL producers, which must not set `seq` (the
-- contract: it belongs to postbox). A WHEN condition is evaluated by the
-- executor itself, so rows that carry their `seq` never enter plpgsql.
DROP TRIGGER "{t}_before_insert" ON "{schema}"."{t}";
CREATE TRIGGER "{t}_before_insert" BEFORE INSERT ON "{schema}"."{t}"
    FOR EACH ROW WHEN (NEW.seq IS NULL) EXECUTE FUNCTION "{schema}"."{t}_before_insert"();
