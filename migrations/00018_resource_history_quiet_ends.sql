-- resource_history showed a change that ended without a request or a merge
-- of its own (a noop decided from the stored state, a change refused before
-- anything was sent, one given up while the target was paused) only if it
-- was the resource's last: changes has no index on resource_id for finished
-- rows. Such changes end noop, rejected or dead, so a partial index on those
-- three states finds them, and costs nothing for the changes that end
-- applied or merged (the common case). Not built CONCURRENTLY: that waits
-- for every snapshot in the database, including a second `migrate up`
-- waiting for the migration lock this one holds, which would wait forever.

-- +goose Up
CREATE INDEX changes_quiet_end_idx ON stagesync.changes (target, resource_id, id)
    WHERE status IN ('noop', 'rejected', 'dead');

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.resource_history(target text, resource_id text)
RETURNS TABLE (at timestamptz, event text, change_ids bigint[], method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ids AS (
        SELECT unnest(a.change_ids) AS id
        FROM stagesync.attempts a
        WHERE a.target = resource_history.target AND a.resource_id = resource_history.resource_id
        UNION
        SELECT unnest(m.change_ids)
        FROM stagesync.merges m
        WHERE m.target = resource_history.target AND m.resource_id = resource_history.resource_id
        UNION
        SELECT c.id
        FROM stagesync.changes c
        WHERE c.resource_id = resource_history.resource_id AND c.target = resource_history.target
          AND c.status IN ('pending', 'processing')
        UNION
        SELECT r.last_change_id
        FROM stagesync.resources r
        WHERE r.target = resource_history.target AND r.resource_id = resource_history.resource_id
          AND r.last_change_id IS NOT NULL
        UNION
        -- Changes that ended without a request or merge of their own
        -- (noop from the stored state, refused before sending, given up
        -- while paused), by changes_quiet_end_idx.
        SELECT c.id
        FROM stagesync.changes c
        WHERE c.target = resource_history.target AND c.resource_id = resource_history.resource_id
          AND c.status IN ('noop', 'rejected', 'dead')
    ), ch AS (
        SELECT c.*
        FROM stagesync.changes c
        JOIN ids ON ids.id = c.id
        WHERE c.target = resource_history.target AND c.resource_id = resource_history.resource_id
    )
    SELECT h.at, h.event, h.change_ids, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, c.id AS seq, 'staged' AS event,
               ARRAY[c.id] AS change_ids, NULL::text AS method, NULL::text AS url,
               NULL::integer AS status_code, NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM ch c
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.change_ids, a.method, a.url, a.status_code,
               a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error)
        FROM stagesync.attempts a
        WHERE a.target = resource_history.target AND a.resource_id = resource_history.resource_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', m.change_ids, NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions)
        FROM stagesync.merges m
        WHERE m.target = resource_history.target AND m.resource_id = resource_history.resource_id
        UNION ALL
        SELECT c.finished_at, 2, c.id, 'finished', ARRAY[c.id], NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts, 'outcome_detail', c.outcome_detail)
        FROM ch c
        WHERE c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.resource_history(target text, resource_id text)
RETURNS TABLE (at timestamptz, event text, change_ids bigint[], method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ids AS (
        SELECT unnest(a.change_ids) AS id
        FROM stagesync.attempts a
        WHERE a.target = resource_history.target AND a.resource_id = resource_history.resource_id
        UNION
        SELECT unnest(m.change_ids)
        FROM stagesync.merges m
        WHERE m.target = resource_history.target AND m.resource_id = resource_history.resource_id
        UNION
        SELECT c.id
        FROM stagesync.changes c
        WHERE c.resource_id = resource_history.resource_id AND c.target = resource_history.target
          AND c.status IN ('pending', 'processing')
        UNION
        SELECT r.last_change_id
        FROM stagesync.resources r
        WHERE r.target = resource_history.target AND r.resource_id = resource_history.resource_id
          AND r.last_change_id IS NOT NULL
    ), ch AS (
        SELECT c.*
        FROM stagesync.changes c
        JOIN ids ON ids.id = c.id
        WHERE c.target = resource_history.target AND c.resource_id = resource_history.resource_id
    )
    SELECT h.at, h.event, h.change_ids, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, c.id AS seq, 'staged' AS event,
               ARRAY[c.id] AS change_ids, NULL::text AS method, NULL::text AS url,
               NULL::integer AS status_code, NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM ch c
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.change_ids, a.method, a.url, a.status_code,
               a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error)
        FROM stagesync.attempts a
        WHERE a.target = resource_history.target AND a.resource_id = resource_history.resource_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', m.change_ids, NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions)
        FROM stagesync.merges m
        WHERE m.target = resource_history.target AND m.resource_id = resource_history.resource_id
        UNION ALL
        SELECT c.finished_at, 2, c.id, 'finished', ARRAY[c.id], NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts, 'outcome_detail', c.outcome_detail)
        FROM ch c
        WHERE c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

DROP INDEX stagesync.changes_quiet_end_idx;
