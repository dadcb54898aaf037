-- name: AttemptsInsert :copyfrom
INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url, if_match,
    if_none_match, status_code, response_etag, duration_ms, outcome, error, job_id,
    batch_id, created_at)
VALUES (@target, @resource_id, @change_ids, @method, @url, @if_match,
    @if_none_match, @status_code, @response_etag, @duration_ms, @outcome, @error, @job_id,
    @batch_id, @created_at);

-- name: MergesInsert :copyfrom
INSERT INTO stagesync.merges (target, resource_id, change_ids, base, ours, theirs, result,
    decisions, outcome, created_at)
VALUES (@target, @resource_id, @change_ids, @base, @ours, @theirs, @result,
    @decisions, @outcome, @created_at);
