-- name: OutboxInsert :many
-- Makes the requests about to leave durable, many goroutines' rows in one
-- statement (group commit). A row naming a lock session (lock_pid > 0) is
-- written only while that session still holds the resource's advisory lock:
-- a job whose connection was terminated has lost the lock, another job may
-- hold it now, and the request must not leave. Returns the id of each row
-- written, by its ordinal in the arrays; a missing ordinal was refused.
WITH u AS (
    SELECT unnest(@ords::integer[]) AS ord,
           unnest(@resource_ids::text[]) AS resource_id,
           unnest(@change_ids::text[]) AS change_ids,
           unnest(@methods::text[]) AS method,
           unnest(@urls::text[]) AS url,
           unnest(@if_matches::text[]) AS if_match,
           unnest(@if_match_raws::bytea[]) AS if_match_raw,
           unnest(@if_none_matches::text[]) AS if_none_match,
           unnest(@idempotency_keys::text[]) AS idempotency_key,
           unnest(@bodies::text[]) AS body,
           unnest(@job_ids::bigint[]) AS job_id,
           unnest(@lock_pids::integer[]) AS lock_pid
), allowed AS (
    SELECT nextval('stagesync.outbox_id_seq') AS id, u.*
    FROM u
    WHERE u.lock_pid = 0
       OR EXISTS (
           SELECT 1 FROM pg_catalog.pg_locks l
           WHERE l.locktype = 'advisory' AND l.granted AND l.pid = u.lock_pid AND l.objsubid = 1
             AND ((l.classid::bigint << 32) | l.objid::bigint)
                 = hashtextextended(@target::text || '/' || u.resource_id, 0)
       )
), written AS (
    INSERT INTO stagesync.outbox (id, target, resource_id, change_ids, method, url, if_match,
        if_match_raw, if_none_match, idempotency_key, body, job_id)
    SELECT a.id, @target::text, nullif(a.resource_id, ''), a.change_ids::bigint[], a.method, a.url,
           nullif(a.if_match, ''), a.if_match_raw, nullif(a.if_none_match, ''),
           nullif(a.idempotency_key, ''), nullif(a.body, '')::jsonb, nullif(a.job_id, 0)
    FROM allowed a
)
SELECT a.ord::integer AS ord, a.id::bigint AS id FROM allowed a;

-- name: OutboxLeftovers :many
-- Requests for the locked resources that were made durable but never
-- recorded: their answers are unknown. The caller holds the resources'
-- locks, so no request for them is in flight.
SELECT id, resource_id, change_ids, method, url, if_match, if_match_raw, if_none_match,
       idempotency_key, body, job_id, created_at
FROM stagesync.outbox
WHERE target = @target AND resource_id = ANY (@resource_ids::text[])
ORDER BY id;

-- name: OutboxDelete :exec
-- Removes the rows of requests whose outcome the same transaction records.
DELETE FROM stagesync.outbox WHERE id = ANY (@ids::bigint[]);

-- name: OutboxSweepLookups :one
SELECT stagesync.outbox_sweep_lookups()::integer AS swept;
