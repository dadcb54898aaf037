-- What operators look up: everything that happened to one resource (beside
-- change_history for one change), and the resources people keep editing
-- while stagesync writes them (issue 9 §2: "monitor 409 error rates to
-- identify hot-spot documents").

-- +goose Up
-- Everything that happened to one resource, in order: each change staged,
-- each HTTP request about it (batch ETag lookups name no single resource and
-- are left out), each merge, each change's end. change_ids says which
-- changes an event concerns; the columns otherwise match change_history.
--
-- The resource's changes are found through its requests and merges (which
-- name the changes they carried), its open changes and its last change, all
-- by index: changes has no index on resource_id for finished rows (one
-- would cost every claim and every finish), and a scan of it would grow with
-- the history kept. A change that ended without ever being sent or merged
-- (refused before any request) is shown by change_history(id).
-- +goose StatementBegin
CREATE FUNCTION stagesync.resource_history(target text, resource_id text)
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

-- Conflicts are a few percent of requests: this index lets the hot-resource
-- report read only them instead of every request of the window.
CREATE INDEX attempts_conflicts_idx ON stagesync.attempts (created_at) WHERE outcome = 'conflict';

-- Per target and resource since a time: the write conflicts (409/412), the
-- merges and how many of them need a person, the last conflict, and the
-- fields of ours that people had changed on the remote (the merge found
-- theirs different from the base; with no base, every field that differed).
-- Only resources with a conflict or a merge in the window appear, hottest
-- first; max_rows (NULL: all) bounds the answer before requests are counted,
-- since counting them reads each resource's attempts.
-- +goose StatementBegin
CREATE FUNCTION stagesync.hot_resources_since(since timestamptz, max_rows integer DEFAULT NULL)
RETURNS TABLE (target text, resource_id text, requests bigint, conflicts bigint,
               conflict_rate float8, merges bigint, needs_review bigint,
               last_conflict_at timestamptz, changed_fields text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH c AS (
        SELECT a.target, a.resource_id, count(*) AS conflicts, max(a.created_at) AS last_conflict_at
        FROM stagesync.attempts a
        WHERE a.outcome = 'conflict' AND a.created_at >= hot_resources_since.since
          AND a.resource_id IS NOT NULL
        GROUP BY 1, 2
    ), m AS (
        SELECT m.target, m.resource_id, count(*) AS merges,
               count(*) FILTER (WHERE m.outcome = 'needs_review') AS needs_review
        FROM stagesync.merges m
        WHERE m.created_at >= hot_resources_since.since
        GROUP BY 1, 2
    ), f AS (
        SELECT m.target, m.resource_id, array_agg(DISTINCT d.key ORDER BY d.key) AS changed_fields
        FROM stagesync.merges m
        CROSS JOIN LATERAL jsonb_each_text(m.decisions) AS d (key, value)
        WHERE m.created_at >= hot_resources_since.since
          AND d.value <> 'already_equal'
          AND (m.base IS NULL OR (m.base -> d.key) IS DISTINCT FROM (m.theirs -> d.key))
        GROUP BY 1, 2
    ), hot AS (
        SELECT coalesce(c.target, m.target) AS target,
               coalesce(c.resource_id, m.resource_id) AS resource_id,
               coalesce(c.conflicts, 0) AS conflicts,
               coalesce(m.merges, 0) AS merges,
               coalesce(m.needs_review, 0) AS needs_review,
               c.last_conflict_at
        FROM c FULL JOIN m ON m.target = c.target AND m.resource_id = c.resource_id
        ORDER BY 3 DESC, 4 DESC, 6 DESC NULLS LAST, 1, 2
        LIMIT hot_resources_since.max_rows
    )
    SELECT h.target, h.resource_id, r.requests, h.conflicts,
           (CASE WHEN r.requests = 0 THEN 0
                 ELSE round(h.conflicts::numeric / r.requests, 4) END)::float8,
           h.merges, h.needs_review, h.last_conflict_at,
           coalesce(f.changed_fields, '{}')
    FROM hot h
    CROSS JOIN LATERAL (
        SELECT count(*) AS requests
        FROM stagesync.attempts a
        WHERE a.target = h.target AND a.resource_id = h.resource_id
          AND a.created_at >= hot_resources_since.since
    ) r
    LEFT JOIN f ON f.target = h.target AND f.resource_id = h.resource_id
    ORDER BY h.conflicts DESC, h.merges DESC, h.last_conflict_at DESC NULLS LAST, h.target, h.resource_id;
$$;
-- +goose StatementEnd

CREATE VIEW stagesync.hot_resources AS
SELECT * FROM stagesync.hot_resources_since(now() - interval '24 hours');

-- New functions are executable by PUBLIC unless revoked (00003 revoked only
-- the functions that existed then).
REVOKE ALL ON FUNCTION stagesync.resource_history(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.hot_resources_since(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION stagesync.resource_history(text, text) TO stagesync_reporting;
GRANT EXECUTE ON FUNCTION stagesync.hot_resources_since(timestamptz, integer) TO stagesync_reporting;
GRANT SELECT ON stagesync.hot_resources TO stagesync_reporting;

-- +goose Down
REVOKE ALL ON stagesync.hot_resources FROM stagesync_reporting;
DROP VIEW stagesync.hot_resources;
DROP FUNCTION stagesync.hot_resources_since(timestamptz, integer);
DROP INDEX stagesync.attempts_conflicts_idx;
DROP FUNCTION stagesync.resource_history(text, text);
