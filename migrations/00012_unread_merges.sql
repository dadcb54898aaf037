-- A conflict answered by writing again at once with the ETag the conflict
-- answer carried (every field to write has policy ours: see
-- processor/apply.go rewriteUnread) records a merges row without theirs and
-- with the decision took_ours_unread. Which fields the person changed is
-- then not known, so hot_resources_since does not list that merge's fields
-- among the fields people changed (it still counts the conflict and the
-- merge).

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.hot_resources_since(since timestamptz, max_rows integer DEFAULT NULL)
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
          AND d.value NOT IN ('already_equal', 'took_ours_unread')
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

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.hot_resources_since(since timestamptz, max_rows integer DEFAULT NULL)
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
