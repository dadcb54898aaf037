-- Retention (issue 10 §5): the periodic cleanup deletes, target by target,
-- finished changes and audit rows older than the configured periods, oldest
-- first, a small batch per statement (each its own short transaction) over
-- the (target, time) indexes of 00006. "id = ANY (ARRAY(...))" keeps the
-- delete itself a primary-key lookup of the picked rows (with "id IN
-- (...)" the planner may hash-join against a scan of the whole table).

-- name: RetentionTargets :many
-- Every registered target, configured in this process or not: rows of a
-- target no longer configured follow the global periods.
SELECT name FROM stagesync.targets ORDER BY name;

-- name: RetentionDeleteChanges :execrows
-- Deletes up to @max changes of @target that finished before @cutoff. A row
-- has finished_at only in a terminal state (changes_finished_iff_terminal),
-- so pending and processing changes are never touched. SKIP LOCKED passes
-- rows a requeue is moving; the outer condition is checked again on a row
-- that changed meanwhile, so a change requeued since it was picked stays.
DELETE FROM stagesync.changes c
WHERE c.id = ANY (ARRAY(
    SELECT f.id
    FROM stagesync.changes f
    WHERE f.target = @target AND f.finished_at < @cutoff::timestamptz
    ORDER BY f.finished_at
    LIMIT @max
    FOR UPDATE SKIP LOCKED
))
  AND c.finished_at < @cutoff::timestamptz;

-- name: RetentionDeleteAttempts :execrows
-- Deletes up to @max attempts of @target made before @cutoff. Attempts are
-- only ever inserted, so nothing else holds their rows.
DELETE FROM stagesync.attempts a
WHERE a.id = ANY (ARRAY(
    SELECT o.id
    FROM stagesync.attempts o
    WHERE o.target = @target AND o.created_at < @cutoff
    ORDER BY o.created_at
    LIMIT @max
));

-- name: RetentionDeleteMerges :execrows
-- Deletes up to @max merges of @target made before @cutoff.
DELETE FROM stagesync.merges m
WHERE m.id = ANY (ARRAY(
    SELECT o.id
    FROM stagesync.merges o
    WHERE o.target = @target AND o.created_at < @cutoff
    ORDER BY o.created_at
    LIMIT @max
));

-- name: RetentionDeleteBatchRequests :execrows
-- Deletes up to @max batch POSTs of @target made before @cutoff: audit
-- rows like attempts (whose batch_id names them).
DELETE FROM stagesync.batch_requests b
WHERE b.id = ANY (ARRAY(
    SELECT o.id
    FROM stagesync.batch_requests o
    WHERE o.target = @target AND o.created_at < @cutoff
    ORDER BY o.created_at
    LIMIT @max
));

-- name: RetentionRecord :exec
-- One row per cleanup run: the actor is the processor's login.
INSERT INTO stagesync.admin_actions (action, params, affected)
VALUES ('retention', @params, @affected);
