-- Functions that read River's job table. River's migrations run before
-- ours (db.Migrate), so river_job exists when these bodies are checked; they
-- are SQL functions so that sqlc, which only knows our schema, sees just
-- their signatures.
--
-- Both pin search_path to public, where River's tables live by default
-- (db.Migrate gives rivermigrate no schema), with pg_temp named last:
-- unnamed, pg_temp is searched first, and a caller's temporary table called
-- river_job would stand in for River's, even in the SECURITY DEFINER function.

-- +goose Up
-- +goose StatementBegin
-- SECURITY DEFINER: reporting may see queue depths without reading River's
-- job rows (whose args name resources).
CREATE FUNCTION stagesync.river_queue_depth()
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

-- The safety net for work whose River job is gone (discarded after its
-- attempts, or deleted by hand): processing changes not touched since the
-- cutoff with no live apply job for their resource go back to pending, and
-- the dispatcher gives them a new job. A change with a live job (queued,
-- scheduled for a retry, or running) is never touched.
-- +goose StatementBegin
CREATE FUNCTION stagesync.reset_orphaned_changes(cutoff timestamptz)
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

REVOKE ALL ON FUNCTION stagesync.river_queue_depth() FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.reset_orphaned_changes(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION stagesync.river_queue_depth() TO stagesync_reporting;

-- +goose Down
DROP FUNCTION stagesync.reset_orphaned_changes(timestamptz);
DROP FUNCTION stagesync.river_queue_depth();
