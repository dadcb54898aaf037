-- name: TargetUpsert :exec
-- The processor writes its configured targets at start; settings holds the
-- non-secret part of the config for operators to read.
INSERT INTO stagesync.targets (name, base_url, item_path, update_method, settings)
VALUES (@name, @base_url, @item_path, @update_method, @settings)
ON CONFLICT (name) DO UPDATE
SET base_url = EXCLUDED.base_url,
    item_path = EXCLUDED.item_path,
    update_method = EXCLUDED.update_method,
    settings = EXCLUDED.settings;

-- name: TargetPause :exec
-- Pauses a target for every process: extends paused_until (never shortens
-- it) and notifies the other processes, which pause at once. The time is
-- the database's clock plus the delay, so hosts' clocks need not agree.
WITH paused AS (
    UPDATE stagesync.targets
    SET paused_until = clock_timestamp() + make_interval(secs => @seconds::float8),
        pause_reason = @reason::text
    WHERE name = @name::text
      AND (paused_until IS NULL
           OR paused_until < clock_timestamp() + make_interval(secs => @seconds::float8))
    RETURNING name
)
SELECT pg_notify('stagesync_coord', 'pause ' || name) FROM paused;

-- name: TargetsPaused :many
-- The targets paused right now, with how long they still are, measured on
-- the database's clock.
SELECT name, coalesce(pause_reason, '')::text AS pause_reason,
       extract(epoch FROM paused_until - clock_timestamp())::float8 AS remaining_seconds
FROM stagesync.targets
WHERE name = ANY (@names::text[]) AND paused_until > clock_timestamp()
ORDER BY name;

-- name: TargetsPauseLifts :many
-- When each target's pause was last lifted by stagesync.lift_pause: a
-- process that missed the notification lifts its own pause when this
-- changes.
SELECT name, pause_lifted_at
FROM stagesync.targets
WHERE name = ANY (@names::text[]) AND pause_lifted_at IS NOT NULL
ORDER BY name;

-- name: TargetWakeJobs :one
-- Makes the target's apply jobs scheduled for later available now (its
-- pause was lifted).
SELECT stagesync.wake_target_jobs(@target::text)::integer AS woken;
