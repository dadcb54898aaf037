-- name: TargetHealthUpsert :exec
-- What this process sees of one target, written every few seconds
-- (processor/health.go). rate_share is NULL for a target without a rate
-- limit; the times are NULL until the first success or error.
INSERT INTO stagesync.target_health AS h (
    target, client_id, inflight_limit, concurrency, rate_share,
    last_success_at, last_error_at, last_error, consecutive_failures, updated_at)
VALUES (@target, @client_id, @inflight_limit, @concurrency, sqlc.narg(rate_share)::float8,
    sqlc.narg(last_success_at)::timestamptz, sqlc.narg(last_error_at)::timestamptz,
    sqlc.narg(last_error)::text, @consecutive_failures, now())
ON CONFLICT (target, client_id) DO UPDATE
SET inflight_limit = EXCLUDED.inflight_limit,
    concurrency = EXCLUDED.concurrency,
    rate_share = EXCLUDED.rate_share,
    last_success_at = EXCLUDED.last_success_at,
    last_error_at = EXCLUDED.last_error_at,
    last_error = EXCLUDED.last_error,
    consecutive_failures = EXCLUDED.consecutive_failures,
    updated_at = now();
