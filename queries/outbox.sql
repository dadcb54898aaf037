-- name: OutboxInsert :many
-- Makes the requests about to leave durable, many goroutines' rows in one
-- statement (group commit). It runs on the session holding the resources'
-- locks, so a job whose session ended can write none. Returns the id of
-- each row by its ordinal in the arrays.
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
           unnest(@job_ids::bigint[]) AS job_id
), numbered AS (
    SELECT nextval('stagesync.outbox_id_seq') AS id, u.* FROM u
), written AS (
    INSERT INTO stagesync.outbox (id, target, resource_id, change_ids, method, url, if_match,
        if_match_raw, if_none_match, idempotency_key, body, job_id)
    SELECT n.id, @target::text, nullif(n.resource_id, ''), n.change_ids::bigint[], n.method, n.url,
           nullif(n.if_match, ''), n.if_match_raw, nullif(n.if_none_match, ''),
           nullif(n.idempotency_key, ''), nullif(n.body, '')::jsonb, nullif(n.job_id, 0)
    FROM numbered n
)
SELECT n.ord::integer AS ord, n.id::bigint AS id FROM numbered n;

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
