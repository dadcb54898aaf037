-- The SQL contract's safety and its words for the upstream (issues 8 §4,
-- 8 §1, 10 §3, 10 §5):
--
-- * Functions pin search_path to pg_catalog, pg_temp and name every object
--   with its schema. With public (or any schema a role may create objects
--   in) on the path, a role could define an operator there that a function
--   then runs as its owner (SECURITY DEFINER) or as whoever calls it: River's
--   river_job_state has no = of its own in pg_catalog, only anyenum's, so a
--   public.= on it is the better match and wins.
-- * source is the login (session_user), not the role in effect: logins that
--   SET ROLE stagesync_upstream each get their own idempotency namespace and
--   see only their own rows.
-- * A bad INSERT says what is allowed, under the constraint names clients
--   match on (changes_op_valid, changes_target_known, ...), and fields nested
--   more than 32 levels or a resource_id of only spaces are refused.
-- * requeue needs a filter or everything => true, and says when matching
--   changes were left because they are rejected.
-- * Indexes for retention's per-target deletes in small batches.

-- +goose Up

-- The rules of 00001's fourteen CHECK constraints on what the upstream
-- writes become one constraint, changes_valid, whose condition is their
-- conjunction OR a call of changes_explain_refusal, which is evaluated only
-- when the conjunction is false and raises the error of the rule that
-- failed, under that rule's old constraint name.
--
-- One constraint, not fourteen each with its own call: PostgreSQL parses
-- every CHECK expression of the table from its stored text at the start of
-- each INSERT or UPDATE statement, so its cost per statement grows with the
-- expressions' size: a call in each of the fourteen made a one-row INSERT
-- cost 40-80% more server CPU. The conjunction costs what the fourteen
-- conditions did (BenchmarkUpstreamInsert measures inserts).
--
-- +goose StatementBegin
-- changes_explain_refusal raises the error for a row that breaks
-- changes_valid: the first broken rule in the order of the old constraint
-- names (the order PostgreSQL checked them in), its name as the error's
-- constraint, the column, what is allowed and a hint. Values are echoed as
-- JSON strings (control characters escaped), cut to 40 characters. It runs
-- as the writer of the row (the upstream may execute it) and never returns.
CREATE FUNCTION stagesync.changes_explain_refusal(c stagesync.changes) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rule text;
    col text;
    msg text;
    hint text;
BEGIN
    -- Each test is the rule's condition IS FALSE: a NULL condition passes,
    -- as it does in a CHECK.
    IF (c.op <> 'delete' OR c.fields = '{}') IS FALSE THEN
        rule := 'changes_delete_has_no_fields'; col := 'fields';
        msg := 'op delete takes no fields; fields must be {} (or left out)';
    ELSIF (jsonb_typeof(c.fields) = 'object') IS FALSE THEN
        rule := 'changes_fields_is_object'; col := 'fields';
        msg := format('fields must be a JSON object like {"status": "active"}; got a JSON %s', jsonb_typeof(c.fields));
    ELSIF (NOT c.fields ? 'id') IS FALSE THEN
        rule := 'changes_fields_no_id'; col := 'fields';
        msg := 'fields must not contain "id": the id of the resource goes in resource_id';
    ELSIF (octet_length(c.fields::text) <= 65536) IS FALSE THEN
        rule := 'changes_fields_too_large'; col := 'fields';
        msg := format('fields is %s bytes as JSON text; the limit is 65536 bytes (64 KiB)', octet_length(c.fields::text));
        hint := 'Stage fewer or smaller fields per change.';
    ELSIF (c.idempotency_key !~ '[[:cntrl:]]') IS FALSE THEN
        rule := 'changes_idempotency_key_no_control_chars'; col := 'idempotency_key';
        msg := format('idempotency_key must not contain control characters (newline, tab, escape, ...); got %s',
                      to_jsonb(left(c.idempotency_key, 40)));
    ELSIF (c.idempotency_key IS NULL OR c.idempotency_key ~ '[^[:space:]]') IS FALSE THEN
        rule := 'changes_idempotency_key_not_blank'; col := 'idempotency_key';
        msg := format('idempotency_key must be NULL or contain a visible character; got %s',
                      to_jsonb(left(c.idempotency_key, 40)));
    ELSIF (octet_length(c.idempotency_key) <= 200) IS FALSE THEN
        rule := 'changes_idempotency_key_too_long'; col := 'idempotency_key';
        msg := format('idempotency_key is %s bytes long; the limit is 200 bytes', octet_length(c.idempotency_key));
    ELSIF (c.op IN ('update', 'create', 'delete')) IS FALSE THEN
        rule := 'changes_op_valid'; col := 'op';
        msg := format('op must be update, create or delete; got %s', to_jsonb(left(c.op, 40)));
        hint := 'update sets the given fields (the default), create makes the resource (If-None-Match: *), delete removes it (with fields {}).';
    ELSIF (c.resource_id !~ '[[:cntrl:]]') IS FALSE THEN
        rule := 'changes_resource_id_no_control_chars'; col := 'resource_id';
        msg := format('resource_id must not contain control characters (newline, tab, escape, ...); got %s',
                      to_jsonb(left(c.resource_id, 40)));
    ELSIF (c.resource_id <> '') IS FALSE THEN
        rule := 'changes_resource_id_not_empty'; col := 'resource_id';
        msg := 'resource_id must not be empty or only spaces; got ""';
        hint := 'Set resource_id to the id of the resource on the remote.';
    ELSIF (octet_length(c.resource_id) <= 512) IS FALSE THEN
        rule := 'changes_resource_id_too_long'; col := 'resource_id';
        msg := format('resource_id is %s bytes long; the limit is 512 bytes', octet_length(c.resource_id));
    ELSIF (c.source <> '') IS FALSE THEN
        rule := 'changes_source_not_empty'; col := 'source';
        msg := 'source must not be empty';
        hint := 'Leave source out: it defaults to your login.';
    ELSIF (c.target <> '') IS FALSE THEN
        rule := 'changes_target_not_empty'; col := 'target';
        msg := 'target must not be empty';
        hint := 'Set target to the name of a target in stagesync''s config.';
    ELSIF (c.op <> 'update' OR c.fields <> '{}') IS FALSE THEN
        rule := 'changes_update_has_fields'; col := 'fields';
        msg := 'op update needs at least one field; fields is {}';
        hint := 'Put the fields to set in fields, e.g. {"status": "active"}; op defaults to update.';
    ELSE
        -- Unreachable while this function and changes_valid agree; if they
        -- ever do not, the row is still refused.
        rule := 'changes_valid'; col := 'fields';
        msg := 'the row breaks check constraint changes_valid';
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = rule,
        SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = col, MESSAGE = msg,
        DETAIL = format('The row with target %s and resource_id %s breaks rule %s of check constraint changes_valid on table stagesync.changes.',
                        to_jsonb(left(c.target, 40)), to_jsonb(left(c.resource_id, 40)), rule),
        HINT = coalesce(hint, 'The README lists what stagesync.changes accepts.');
END
$$;
-- +goose StatementEnd

-- NOT VALID: every existing row passed the same rules when it was inserted
-- (they were separate constraints), so the upgrade need not scan the table
-- under its lock. New and updated rows are checked as before.
ALTER TABLE stagesync.changes
    DROP CONSTRAINT changes_delete_has_no_fields,
    DROP CONSTRAINT changes_fields_is_object,
    DROP CONSTRAINT changes_fields_no_id,
    DROP CONSTRAINT changes_fields_too_large,
    DROP CONSTRAINT changes_idempotency_key_no_control_chars,
    DROP CONSTRAINT changes_idempotency_key_not_blank,
    DROP CONSTRAINT changes_idempotency_key_too_long,
    DROP CONSTRAINT changes_op_valid,
    DROP CONSTRAINT changes_resource_id_no_control_chars,
    DROP CONSTRAINT changes_resource_id_not_empty,
    DROP CONSTRAINT changes_resource_id_too_long,
    DROP CONSTRAINT changes_source_not_empty,
    DROP CONSTRAINT changes_target_not_empty,
    DROP CONSTRAINT changes_update_has_fields,
    ADD CONSTRAINT changes_valid CHECK ((
        (op <> 'delete' OR fields = '{}')
        AND jsonb_typeof(fields) = 'object'
        AND NOT fields ? 'id'
        AND octet_length(fields::text) <= 65536
        AND (idempotency_key !~ '[[:cntrl:]]') IS NOT FALSE
        AND (idempotency_key IS NULL OR idempotency_key ~ '[^[:space:]]')
        AND (octet_length(idempotency_key) <= 200) IS NOT FALSE
        AND op IN ('update', 'create', 'delete')
        AND resource_id !~ '[[:cntrl:]]'
        AND resource_id <> ''
        AND octet_length(resource_id) <= 512
        AND source <> ''
        AND target <> ''
        AND (op <> 'update' OR fields <> '{}')
    ) OR stagesync.changes_explain_refusal(changes)) NOT VALID;

-- Checked by the statement trigger below, which runs before the foreign key
-- check once that is deferred to the end of the transaction: the foreign
-- key's own error cannot name the target to the upstream (row-level
-- security hides its detail). It still guards the reference, at commit.
ALTER TABLE stagesync.changes
    ALTER CONSTRAINT changes_target_known DEFERRABLE INITIALLY DEFERRED;

-- +goose StatementBegin
-- Refuses, once per INSERT (or COPY) statement, with one read of the
-- inserted rows:
-- * fields nested more than 32 levels deep (changes_fields_too_deep): a
--   value inside 33 objects or arrays. Go's JSON decoder stops at 10,000,
--   and a row it cannot read would stop a whole job; 32 levels is plenty for
--   record fields;
-- * a resource_id of only spaces (changes_resource_id_not_empty);
-- * an unknown target, by name, with the configured ones
--   (changes_target_known).
-- The first two are new rules and bind inserted rows only: as part of
-- changes_valid they would also bind the processor's updates of rows staged
-- before them, which must still be able to end such a row rejected.
-- SECURITY DEFINER to read stagesync.targets, which the upstream may not.
CREATE FUNCTION stagesync.changes_check_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
    known text;
BEGIN
    -- Per row this costs about half a microsecond: btrim and @? are the
    -- cheapest tests (a regex or jsonb_path_exists cost more). Control
    -- characters are refused before, by changes_valid, so a blank id is one
    -- of spaces only.
    SELECT n.target, n.resource_id,
           n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}' AS deep,
           btrim(n.resource_id) OPERATOR(pg_catalog.=) '' AS blank
    INTO bad
    FROM inserted n
    LEFT JOIN stagesync.targets t ON t.name OPERATOR(pg_catalog.=) n.target
    WHERE t.name IS NULL
       OR btrim(n.resource_id) OPERATOR(pg_catalog.=) ''
       OR n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}'
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF bad.deep THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_fields_too_deep',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'fields',
            MESSAGE = format('fields of resource %s nests objects and arrays more than 32 levels deep',
                             to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_fields_too_deep of table stagesync.changes.',
            HINT = 'Flatten the value: a value may sit inside at most 32 objects or arrays.';
    ELSIF bad.blank THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_resource_id_not_empty',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'resource_id',
            MESSAGE = format('resource_id must not be empty or only spaces; got %s', to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_resource_id_not_empty of table stagesync.changes.',
            HINT = 'Set resource_id to the id of the resource on the remote.';
    END IF;
    SELECT string_agg(k.name, ', ' ORDER BY k.name) INTO known
    FROM (SELECT t.name FROM stagesync.targets t ORDER BY t.name LIMIT 20) k;
    RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'changes_target_known',
        SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'target',
        MESSAGE = CASE WHEN known IS NULL
            THEN format('unknown target %s: no target is configured yet', to_jsonb(left(bad.target, 64)))
            ELSE format('unknown target %s; the configured targets are: %s', to_jsonb(left(bad.target, 64)), known) END,
        DETAIL = 'The row breaks foreign key constraint changes_target_known of table stagesync.changes.',
        HINT = 'stagesync run registers the targets of its config file when it starts.';
END
$$;
-- +goose StatementEnd

-- Named to fire before changes_notify (statement triggers fire in name
-- order), though a refused statement's notification is discarded anyway.
CREATE TRIGGER changes_check_inserted AFTER INSERT ON stagesync.changes
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION stagesync.changes_check_inserted();

-- +goose StatementBegin
-- changes_explain_source raises the error of an upstream row whose source is
-- not its login; the insert policy calls it only then.
CREATE FUNCTION stagesync.changes_explain_source(source text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'changes_upstream_insert',
        SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'source',
        MESSAGE = format('source must be your login %s (or left out); got %s',
                         to_jsonb(session_user::text), to_jsonb(left(changes_explain_source.source, 64))),
        DETAIL = 'The row breaks row-level security policy changes_upstream_insert of table stagesync.changes.',
        HINT = 'Leave source out: it defaults to your login.';
END
$$;
-- +goose StatementEnd

-- source is the login. A login that SET ROLEs to stagesync_upstream has
-- current_user = stagesync_upstream, the same for every such login.
ALTER TABLE stagesync.changes ALTER COLUMN source SET DEFAULT session_user;
ALTER POLICY changes_upstream_insert ON stagesync.changes
    WITH CHECK (source = session_user OR stagesync.changes_explain_source(source));
ALTER POLICY changes_upstream_select ON stagesync.changes
    USING (source = session_user);

-- The trigger functions: every call schema-qualified. They run as whoever
-- writes the row and take no SET clause, which would cost every row of a
-- claim or a batch of state updates; pg_catalog is searched first, so no
-- other schema's now() or pg_notify(text, text) can stand in.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.notify_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('stagesync_changes', TG_OP);
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- River's tables live in public (db.Migrate gives rivermigrate no schema).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.river_queue_depth()
RETURNS TABLE (queue text, state text, jobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT j.queue, j.state::text, count(*)
    FROM public.river_job j
    WHERE j.state OPERATOR(pg_catalog.=) ANY (
        '{available,pending,retryable,running,scheduled}'::public.river_job_state[])
    GROUP BY 1, 2
    ORDER BY 1, 2;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.reset_orphaned_changes(cutoff timestamptz)
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH reset AS (
        UPDATE stagesync.changes c
        SET status = 'pending'
        WHERE c.status OPERATOR(pg_catalog.=) 'processing'
          AND c.updated_at OPERATOR(pg_catalog.<) reset_orphaned_changes.cutoff
          AND NOT EXISTS (
              SELECT 1 FROM public.river_job j
              WHERE j.kind OPERATOR(pg_catalog.=) 'stagesync_apply'
                AND j.state OPERATOR(pg_catalog.=) ANY (
                    '{available,pending,retryable,running,scheduled}'::public.river_job_state[])
                AND j.args OPERATOR(pg_catalog.@>) jsonb_build_object(
                    'target', c.target, 'resource_ids', jsonb_build_array(c.resource_id))
          )
        RETURNING 1
    )
    SELECT count(*)::integer FROM reset;
$$;
-- +goose StatementEnd

-- The reporting functions run as their caller (an analyst, or the owner
-- running `stagesync status`): with the caller's search_path, an operator in
-- public on bigint[] or (numeric, bigint) would run with the caller's rights.
-- The SET clause also keeps the planner from inlining them, which would
-- parse the body with the caller's path again.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.conflict_rates_since(since timestamptz)
RETURNS TABLE (target text, hour timestamptz, requests bigint, conflicts bigint,
               conflict_rate float8, applied bigint, merged bigint, noop bigint,
               dead bigint, rejected bigint, p50_ms float8, p95_ms float8)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
WITH requests AS (
    SELECT a.target,
           date_trunc('hour', a.created_at, 'UTC') AS hour,
           count(*) AS requests,
           count(*) FILTER (WHERE a.outcome OPERATOR(pg_catalog.=) 'conflict') AS conflicts,
           percentile_cont(0.5::float8) WITHIN GROUP (ORDER BY a.duration_ms) AS p50_ms,
           percentile_cont(0.95::float8) WITHIN GROUP (ORDER BY a.duration_ms) AS p95_ms
    FROM stagesync.attempts a
    WHERE a.created_at OPERATOR(pg_catalog.>=) date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
), finished AS (
    SELECT c.target,
           date_trunc('hour', c.finished_at, 'UTC') AS hour,
           count(*) FILTER (WHERE c.status OPERATOR(pg_catalog.=) 'applied') AS applied,
           count(*) FILTER (WHERE c.status OPERATOR(pg_catalog.=) 'merged') AS merged,
           count(*) FILTER (WHERE c.status OPERATOR(pg_catalog.=) 'noop') AS noop,
           count(*) FILTER (WHERE c.status OPERATOR(pg_catalog.=) 'dead') AS dead,
           count(*) FILTER (WHERE c.status OPERATOR(pg_catalog.=) 'rejected') AS rejected
    FROM stagesync.changes c
    WHERE c.finished_at OPERATOR(pg_catalog.>=) date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
)
SELECT coalesce(r.target, f.target)::text,
       coalesce(r.hour, f.hour)::timestamptz,
       coalesce(r.requests, 0)::bigint,
       coalesce(r.conflicts, 0)::bigint,
       (CASE WHEN coalesce(r.requests, 0) OPERATOR(pg_catalog.=) 0 THEN 0
             ELSE round(r.conflicts::numeric OPERATOR(pg_catalog./) r.requests::numeric, 4) END)::float8,
       coalesce(f.applied, 0)::bigint,
       coalesce(f.merged, 0)::bigint,
       coalesce(f.noop, 0)::bigint,
       coalesce(f.dead, 0)::bigint,
       coalesce(f.rejected, 0)::bigint,
       r.p50_ms::float8,
       r.p95_ms::float8
FROM requests r
FULL JOIN finished f ON f.target OPERATOR(pg_catalog.=) r.target AND f.hour OPERATOR(pg_catalog.=) r.hour;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.change_history(change_id bigint)
RETURNS TABLE (at timestamptz, event text, method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT h.at, h.event, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, 0::bigint AS seq, 'staged' AS event,
               NULL::text AS method, NULL::text AS url, NULL::integer AS status_code,
               NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM stagesync.changes c WHERE c.id OPERATOR(pg_catalog.=) change_history.change_id
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.method, a.url, a.status_code, a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error,
                                  'change_ids', a.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.attempts a
          ON a.target OPERATOR(pg_catalog.=) c.target AND a.resource_id OPERATOR(pg_catalog.=) c.resource_id
         AND a.change_ids OPERATOR(pg_catalog.@>) ARRAY[c.id]
        WHERE c.id OPERATOR(pg_catalog.=) change_history.change_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions,
                                  'change_ids', m.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.merges m
          ON m.target OPERATOR(pg_catalog.=) c.target AND m.resource_id OPERATOR(pg_catalog.=) c.resource_id
         AND m.change_ids OPERATOR(pg_catalog.@>) ARRAY[c.id]
        WHERE c.id OPERATOR(pg_catalog.=) change_history.change_id
        UNION ALL
        SELECT c.finished_at, 2, 0, 'finished', NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts, 'outcome_detail', c.outcome_detail)
        FROM stagesync.changes c
        WHERE c.id OPERATOR(pg_catalog.=) change_history.change_id AND c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

-- requeue gains everything: with no filter it refuses unless everything =>
-- true (a parameter cannot be called "all", a reserved word). A requeue
-- that leaves matching rejected changes says so in a NOTICE.
DROP FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean);

-- +goose StatementBegin
CREATE FUNCTION stagesync.requeue(
    ids bigint[] DEFAULT NULL,
    target text DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    include_rejected boolean DEFAULT false,
    everything boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved integer;
    skipped integer;
    filtered boolean := requeue.ids IS NOT NULL OR requeue.target IS NOT NULL
        OR requeue.since IS NOT NULL OR requeue.until IS NOT NULL;
    with_rejected boolean := coalesce(requeue.include_rejected, false);
BEGIN
    IF NOT filtered AND NOT coalesce(requeue.everything, false) THEN
        RAISE EXCEPTION 'requeue: no filter given; pass ids, target, since or until, or everything => true to requeue every dead change'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT stagesync.requeue(ids => ARRAY[42]) requeues one change; SELECT stagesync.requeue(everything => true) requeues them all.';
    END IF;
    IF filtered AND coalesce(requeue.everything, false) THEN
        RAISE EXCEPTION 'requeue: everything => true requeues every dead change; don''t combine it with ids, target, since or until'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF requeue.since IS NOT NULL AND requeue.until IS NOT NULL AND requeue.since OPERATOR(pg_catalog.>) requeue.until THEN
        RAISE EXCEPTION 'requeue: since (%) is after until (%)', requeue.since, requeue.until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF requeue.target IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM stagesync.targets t WHERE t.name OPERATOR(pg_catalog.=) requeue.target) THEN
        RAISE EXCEPTION 'requeue: unknown target %', quote_literal(requeue.target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH m AS (
        UPDATE stagesync.changes c
        SET status = 'pending', attempts = 0, last_error = NULL,
            finished_at = NULL, applied_etag = NULL
        WHERE (c.status OPERATOR(pg_catalog.=) 'dead'
               OR (with_rejected AND c.status OPERATOR(pg_catalog.=) 'rejected'))
          AND (requeue.ids IS NULL OR c.id OPERATOR(pg_catalog.=) ANY (requeue.ids))
          AND (requeue.target IS NULL OR c.target OPERATOR(pg_catalog.=) requeue.target)
          AND (requeue.since IS NULL OR c.finished_at OPERATOR(pg_catalog.>=) requeue.since)
          AND (requeue.until IS NULL OR c.finished_at OPERATOR(pg_catalog.<) requeue.until)
        RETURNING 1
    )
    SELECT count(*) INTO moved FROM m;

    INSERT INTO stagesync.admin_actions (actor, action, params, affected)
    VALUES (session_user, 'requeue',
            jsonb_strip_nulls(jsonb_build_object(
                'ids', requeue.ids, 'target', requeue.target,
                'since', requeue.since, 'until', requeue.until,
                'include_rejected', with_rejected,
                'everything', CASE WHEN requeue.everything THEN true END)),
            moved);

    IF moved OPERATOR(pg_catalog.>) 0 THEN
        PERFORM pg_notify('stagesync_changes', 'REQUEUE');
    END IF;

    IF NOT with_rejected THEN
        SELECT count(*) INTO skipped
        FROM stagesync.changes c
        WHERE c.status OPERATOR(pg_catalog.=) 'rejected'
          AND (requeue.ids IS NULL OR c.id OPERATOR(pg_catalog.=) ANY (requeue.ids))
          AND (requeue.target IS NULL OR c.target OPERATOR(pg_catalog.=) requeue.target)
          AND (requeue.since IS NULL OR c.finished_at OPERATOR(pg_catalog.>=) requeue.since)
          AND (requeue.until IS NULL OR c.finished_at OPERATOR(pg_catalog.<) requeue.until);
        IF skipped OPERATOR(pg_catalog.>) 0 THEN
            RAISE NOTICE '%', CASE WHEN skipped OPERATOR(pg_catalog.=) 1
                THEN 'requeue: 1 matching change is rejected and was left as it is'
                ELSE format('requeue: %s matching changes are rejected and were left as they are', skipped) END
                USING HINT = 'Add include_rejected => true to requeue rejected changes too (stagesync requeue --include-rejected).';
        END IF;
    END IF;
    RETURN moved;
END
$$;
-- +goose StatementEnd

REVOKE ALL ON FUNCTION stagesync.changes_explain_refusal(stagesync.changes) FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.changes_explain_source(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.changes_check_inserted() FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean, boolean) FROM PUBLIC;
-- changes_valid and the insert policy call these as the inserting role, and
-- PostgreSQL checks EXECUTE when it prepares the expression, not when (if
-- ever) it calls them.
GRANT EXECUTE ON FUNCTION stagesync.changes_explain_refusal(stagesync.changes),
    stagesync.changes_explain_source(text) TO stagesync_upstream;
GRANT EXECUTE ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean, boolean)
    TO stagesync_admin;

-- Retention deletes per target, oldest first, in small batches; these keep
-- each batch an index range scan of one target's rows. The changes index
-- holds only finished rows, so it costs nothing at insert or claim.
CREATE INDEX changes_target_finished_idx ON stagesync.changes (target, finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX attempts_target_created_idx ON stagesync.attempts (target, created_at);
CREATE INDEX merges_target_created_idx ON stagesync.merges (target, created_at);

-- +goose Down
DROP INDEX stagesync.merges_target_created_idx;
DROP INDEX stagesync.attempts_target_created_idx;
DROP INDEX stagesync.changes_target_finished_idx;

DROP FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean, boolean);
-- +goose StatementBegin
CREATE FUNCTION stagesync.requeue(
    ids bigint[] DEFAULT NULL,
    target text DEFAULT NULL,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    include_rejected boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    moved integer;
BEGIN
    IF requeue.since IS NOT NULL AND requeue.until IS NOT NULL AND requeue.since > requeue.until THEN
        RAISE EXCEPTION 'requeue: since (%) is after until (%)', requeue.since, requeue.until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF requeue.target IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM stagesync.targets t WHERE t.name = requeue.target) THEN
        RAISE EXCEPTION 'requeue: unknown target %', quote_literal(requeue.target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH m AS (
        UPDATE stagesync.changes c
        SET status = 'pending', attempts = 0, last_error = NULL,
            finished_at = NULL, applied_etag = NULL
        WHERE (c.status = 'dead' OR (requeue.include_rejected AND c.status = 'rejected'))
          AND (requeue.ids IS NULL OR c.id = ANY (requeue.ids))
          AND (requeue.target IS NULL OR c.target = requeue.target)
          AND (requeue.since IS NULL OR c.finished_at >= requeue.since)
          AND (requeue.until IS NULL OR c.finished_at < requeue.until)
        RETURNING 1
    )
    SELECT count(*) INTO moved FROM m;

    INSERT INTO stagesync.admin_actions (actor, action, params, affected)
    VALUES (session_user, 'requeue',
            jsonb_strip_nulls(jsonb_build_object(
                'ids', requeue.ids, 'target', requeue.target,
                'since', requeue.since, 'until', requeue.until,
                'include_rejected', requeue.include_rejected)),
            moved);

    IF moved > 0 THEN
        PERFORM pg_notify('stagesync_changes', 'REQUEUE');
    END IF;
    RETURN moved;
END
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean)
    TO stagesync_admin;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.change_history(change_id bigint)
RETURNS TABLE (at timestamptz, event text, method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE AS $$
    SELECT h.at, h.event, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, 0::bigint AS seq, 'staged' AS event,
               NULL::text AS method, NULL::text AS url, NULL::integer AS status_code,
               NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM stagesync.changes c WHERE c.id = change_history.change_id
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.method, a.url, a.status_code, a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error,
                                  'change_ids', a.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.attempts a
          ON a.target = c.target AND a.resource_id = c.resource_id
         AND a.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions,
                                  'change_ids', m.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.merges m
          ON m.target = c.target AND m.resource_id = c.resource_id
         AND m.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT c.finished_at, 2, 0, 'finished', NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts, 'outcome_detail', c.outcome_detail)
        FROM stagesync.changes c
        WHERE c.id = change_history.change_id AND c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.conflict_rates_since(since timestamptz)
RETURNS TABLE (target text, hour timestamptz, requests bigint, conflicts bigint,
               conflict_rate float8, applied bigint, merged bigint, noop bigint,
               dead bigint, rejected bigint, p50_ms float8, p95_ms float8)
LANGUAGE sql STABLE AS $$
WITH requests AS (
    SELECT a.target,
           date_trunc('hour', a.created_at, 'UTC') AS hour,
           count(*) AS requests,
           count(*) FILTER (WHERE a.outcome = 'conflict') AS conflicts,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms) AS p95_ms
    FROM stagesync.attempts a
    WHERE a.created_at >= date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
), finished AS (
    SELECT c.target,
           date_trunc('hour', c.finished_at, 'UTC') AS hour,
           count(*) FILTER (WHERE c.status = 'applied') AS applied,
           count(*) FILTER (WHERE c.status = 'merged') AS merged,
           count(*) FILTER (WHERE c.status = 'noop') AS noop,
           count(*) FILTER (WHERE c.status = 'dead') AS dead,
           count(*) FILTER (WHERE c.status = 'rejected') AS rejected
    FROM stagesync.changes c
    WHERE c.finished_at >= date_trunc('hour', conflict_rates_since.since, 'UTC')
    GROUP BY 1, 2
)
SELECT coalesce(r.target, f.target)::text,
       coalesce(r.hour, f.hour)::timestamptz,
       coalesce(r.requests, 0)::bigint,
       coalesce(r.conflicts, 0)::bigint,
       (CASE WHEN coalesce(r.requests, 0) = 0 THEN 0
             ELSE round(r.conflicts::numeric / r.requests, 4) END)::float8,
       coalesce(f.applied, 0)::bigint,
       coalesce(f.merged, 0)::bigint,
       coalesce(f.noop, 0)::bigint,
       coalesce(f.dead, 0)::bigint,
       coalesce(f.rejected, 0)::bigint,
       r.p50_ms::float8,
       r.p95_ms::float8
FROM requests r
FULL JOIN finished f ON f.target = r.target AND f.hour = r.hour;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.reset_orphaned_changes(cutoff timestamptz)
RETURNS integer
LANGUAGE sql
SET search_path = public, pg_temp
AS $$
    WITH reset AS (
        UPDATE stagesync.changes c
        SET status = 'pending'
        WHERE c.status = 'processing'
          AND c.updated_at < reset_orphaned_changes.cutoff
          AND NOT EXISTS (
              SELECT 1 FROM river_job j
              WHERE j.kind = 'stagesync_apply'
                AND j.state IN ('available', 'pending', 'retryable', 'running', 'scheduled')
                AND j.args @> jsonb_build_object('target', c.target,
                                                 'resource_ids', jsonb_build_array(c.resource_id))
          )
        RETURNING 1
    )
    SELECT count(*)::integer FROM reset;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.river_queue_depth()
RETURNS TABLE (queue text, state text, jobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT j.queue, j.state::text, count(*)
    FROM river_job j
    WHERE j.state IN ('available', 'pending', 'retryable', 'running', 'scheduled')
    GROUP BY 1, 2
    ORDER BY 1, 2;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.notify_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stagesync_changes', TG_OP);
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
-- +goose StatementEnd

ALTER POLICY changes_upstream_select ON stagesync.changes
    USING (source = current_user);
ALTER POLICY changes_upstream_insert ON stagesync.changes
    WITH CHECK (source = current_user);
ALTER TABLE stagesync.changes ALTER COLUMN source SET DEFAULT current_user;
DROP FUNCTION stagesync.changes_explain_source(text);

DROP TRIGGER changes_check_inserted ON stagesync.changes;
DROP FUNCTION stagesync.changes_check_inserted();
ALTER TABLE stagesync.changes
    ALTER CONSTRAINT changes_target_known NOT DEFERRABLE INITIALLY IMMEDIATE;

ALTER TABLE stagesync.changes
    DROP CONSTRAINT changes_valid,
    ADD CONSTRAINT changes_target_not_empty CHECK (target <> ''),
    ADD CONSTRAINT changes_resource_id_not_empty CHECK (resource_id <> ''),
    ADD CONSTRAINT changes_resource_id_too_long CHECK (octet_length(resource_id) <= 512),
    ADD CONSTRAINT changes_resource_id_no_control_chars CHECK (resource_id !~ '[[:cntrl:]]'),
    ADD CONSTRAINT changes_op_valid CHECK (op IN ('update', 'create', 'delete')),
    ADD CONSTRAINT changes_fields_is_object CHECK (jsonb_typeof(fields) = 'object'),
    ADD CONSTRAINT changes_fields_too_large CHECK (octet_length(fields::text) <= 65536),
    ADD CONSTRAINT changes_update_has_fields CHECK (op <> 'update' OR fields <> '{}'),
    ADD CONSTRAINT changes_delete_has_no_fields CHECK (op <> 'delete' OR fields = '{}'),
    ADD CONSTRAINT changes_fields_no_id CHECK (NOT fields ? 'id'),
    ADD CONSTRAINT changes_source_not_empty CHECK (source <> ''),
    ADD CONSTRAINT changes_idempotency_key_not_blank CHECK (idempotency_key IS NULL OR idempotency_key ~ '[^[:space:]]'),
    ADD CONSTRAINT changes_idempotency_key_no_control_chars CHECK (idempotency_key !~ '[[:cntrl:]]'),
    ADD CONSTRAINT changes_idempotency_key_too_long CHECK (octet_length(idempotency_key) <= 200);
DROP FUNCTION stagesync.changes_explain_refusal(stagesync.changes);
