-- name: ChangesClaimPending :many
-- Claims the oldest pending changes of the given targets and marks them
-- processing. covered says the resource already had processing changes
-- before this statement, i.e. a job exists that will take these too (its
-- worker takes every open change of a resource while it holds the lock).
WITH picked AS (
    SELECT p.id
    FROM stagesync.changes p
    WHERE p.status = 'pending' AND p.target = ANY (@targets::text[])
    ORDER BY p.id
    LIMIT @max
    FOR UPDATE SKIP LOCKED
)
UPDATE stagesync.changes c
SET status = 'processing'
FROM picked
WHERE c.id = picked.id
RETURNING c.id, c.target, c.resource_id,
    EXISTS (
        SELECT 1 FROM stagesync.changes o
        WHERE o.target = c.target AND o.resource_id = c.resource_id
          AND o.status = 'processing'
    ) AS covered;

-- name: ChangesListOpen :many
-- The open changes of the locked resources, in the order they must apply,
-- at most @max of them: a job works a deep backlog in rounds of bounded
-- memory. A resource cut off by the limit gets its prefix now (in id
-- order) and the rest next round.
SELECT id, resource_id, op, fields, attempts, created_at, settled
FROM stagesync.changes
WHERE target = @target
  AND resource_id = ANY (@resource_ids::text[])
  AND status IN ('pending', 'processing')
ORDER BY resource_id, id
LIMIT @max;

-- name: ChangesRecord :exec
-- Records the outcome of many changes in one statement: a terminal state,
-- or 'processing' with the attempts counted when a retry job is scheduled.
-- Empty strings stand for NULL in the parallel arrays. outcome_detail says
-- why a terminal change ended as it did (superseded fields, fields kept
-- from the remote). rejected_not_found says a rejection was only because
-- the remote had no such resource (see ChangesReviveNotFound).
UPDATE stagesync.changes c
SET status = u.status,
    attempts = c.attempts + u.add_attempts,
    -- A change that waited behind a failing one (processing, nothing
    -- attempted) keeps the error it had.
    last_error = CASE WHEN u.status = 'processing' AND u.last_error = '' THEN c.last_error
                      ELSE nullif(u.last_error, '') END,
    applied_etag = coalesce(nullif(u.applied_etag, ''), c.applied_etag),
    outcome_detail = CASE WHEN u.status IN ('pending', 'processing') THEN c.outcome_detail
                          ELSE nullif(u.outcome_detail, '') END,
    finished_at = CASE WHEN u.status IN ('pending', 'processing') THEN NULL ELSE now() END,
    rejected_not_found = u.status = 'rejected' AND u.not_found,
    -- Fields a read settled while the change stays open (see 00019).
    settled = CASE WHEN u.status NOT IN ('pending', 'processing') THEN NULL
                   WHEN u.settled = '' THEN c.settled
                   ELSE u.settled::jsonb END
FROM (
    SELECT unnest(@ids::bigint[]) AS id,
           unnest(@statuses::text[]) AS status,
           unnest(@add_attempts::integer[]) AS add_attempts,
           unnest(@last_errors::text[]) AS last_error,
           unnest(@applied_etags::text[]) AS applied_etag,
           unnest(@outcome_details::text[]) AS outcome_detail,
           unnest(@not_founds::boolean[]) AS not_found,
           unnest(@settled::text[]) AS settled
) AS u
WHERE c.id = u.id
  AND c.status IN ('pending', 'processing');

-- name: ChangesReviveNotFound :exec
-- Puts back to pending the changes rejected only because the resource did
-- not exist yet, when an older create of the same resource has just
-- applied (it committed late): per resource, those with an id above the
-- create's (@create_ids). Runs in the transaction that records the create,
-- whose caller holds the resource's lock; the job's next round (or the
-- claimer, notified) works them after the create.
WITH revived AS (
    UPDATE stagesync.changes c
    SET status = 'pending', rejected_not_found = false, finished_at = NULL,
        outcome_detail = NULL, applied_etag = NULL,
        last_error = 'worked again: rejected as not found before its older create #' || u.after_id
            || ' committed and applied (' || coalesce(c.last_error, '') || ')'
    FROM (
        SELECT unnest(@resource_ids::text[]) AS resource_id,
               unnest(@create_ids::bigint[]) AS after_id
    ) AS u
    WHERE c.target = @target AND c.resource_id = u.resource_id AND c.id > u.after_id
      AND c.rejected_not_found AND c.status = 'rejected'
    RETURNING 1
)
SELECT pg_notify('stagesync_changes', 'REQUEUE') FROM (SELECT 1 FROM revived LIMIT 1) AS r;

-- name: ChangesResetOrphaned :one
SELECT stagesync.reset_orphaned_changes(@cutoff::timestamptz)::integer AS reset;

-- name: ChangesGiveUp :execrows
-- Ends dead the processing changes of resources whose apply job River gave
-- up on (its last attempt failed): nothing will work them, and sending them
-- back to pending would fail the same way forever. The caller holds the
-- resources' locks.
UPDATE stagesync.changes
SET status = 'dead', last_error = @reason::text, finished_at = now()
WHERE target = @target AND resource_id = ANY (@resource_ids::text[])
  AND status = 'processing';
