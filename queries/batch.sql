-- name: BatchRequestIDBlock :one
-- The first of 64 batch_requests ids for this process to hand out (the
-- sequence steps by 64).
SELECT nextval('stagesync.batch_requests_id_seq')::bigint AS first;

-- name: BatchRequestsInsert :exec
-- Records batch POSTs. Every job whose writes a POST carried records it in
-- the transaction that records those writes; the first one wins.
WITH u AS (
    SELECT unnest(@ids::bigint[]) AS id,
           unnest(@urls::text[]) AS url,
           unnest(@items::integer[]) AS items,
           unnest(@status_codes::integer[]) AS status_code,
           unnest(@durations_ms::double precision[]) AS duration_ms,
           unnest(@outcomes::text[]) AS outcome,
           unnest(@errors::text[]) AS error,
           unnest(@created_ats::timestamptz[]) AS created_at
)
INSERT INTO stagesync.batch_requests (id, target, url, items, status_code, duration_ms,
    outcome, error, created_at)
SELECT u.id, @target::text, u.url, u.items, nullif(u.status_code, 0), u.duration_ms,
       u.outcome, nullif(u.error, ''), u.created_at
FROM u
ON CONFLICT (id) DO NOTHING;
