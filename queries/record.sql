-- name: AttemptsInsertMany :exec
-- The attempts rows of finished resources. Set-based rather than COPY, so
-- it travels in one pipelined batch with the other statements that record
-- them: a flush costs one round trip (processor/record.go). Empty strings
-- and zeros stand for NULL; change ids travel as array literals ('{1,2}'),
-- since PostgreSQL arrays can't nest unevenly.
INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url, if_match,
    if_none_match, status_code, response_etag, duration_ms, outcome, error, job_id,
    batch_id, created_at)
SELECT @target::text, nullif(u.resource_id, ''), u.change_ids::bigint[], u.method, u.url,
       nullif(u.if_match, ''), nullif(u.if_none_match, ''), nullif(u.status_code, 0),
       nullif(u.response_etag, ''), u.duration_ms, u.outcome, nullif(u.error, ''),
       @job_id::bigint, nullif(u.batch_id, 0), u.created_at
FROM (
    SELECT unnest(@resource_ids::text[]) AS resource_id,
           unnest(@change_ids::text[]) AS change_ids,
           unnest(@methods::text[]) AS method,
           unnest(@urls::text[]) AS url,
           unnest(@if_matches::text[]) AS if_match,
           unnest(@if_none_matches::text[]) AS if_none_match,
           unnest(@status_codes::integer[]) AS status_code,
           unnest(@response_etags::text[]) AS response_etag,
           unnest(@durations_ms::float8[]) AS duration_ms,
           unnest(@outcomes::text[]) AS outcome,
           unnest(@errors::text[]) AS error,
           unnest(@batch_ids::bigint[]) AS batch_id,
           unnest(@created_ats::timestamptz[]) AS created_at
) AS u;

-- name: MergesInsertMany :exec
-- The merges rows of finished resources, like AttemptsInsertMany; JSON
-- documents travel as text ('' for a NULL base or theirs).
INSERT INTO stagesync.merges (target, resource_id, change_ids, base, ours, theirs, result,
    decisions, outcome, created_at)
SELECT @target::text, u.resource_id, u.change_ids::bigint[], nullif(u.base, '')::jsonb,
       u.ours::jsonb, nullif(u.theirs, '')::jsonb, u.result::jsonb, u.decisions::jsonb,
       u.outcome, u.created_at
FROM (
    SELECT unnest(@resource_ids::text[]) AS resource_id,
           unnest(@change_ids::text[]) AS change_ids,
           unnest(@bases::text[]) AS base,
           unnest(@ours::text[]) AS ours,
           unnest(@theirs::text[]) AS theirs,
           unnest(@results::text[]) AS result,
           unnest(@decisions::text[]) AS decisions,
           unnest(@outcomes::text[]) AS outcome,
           unnest(@created_ats::timestamptz[]) AS created_at
) AS u;
