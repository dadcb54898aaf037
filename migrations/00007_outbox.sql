-- The write path's durable intents and what it knows of a resource's
-- representation: an outbox row for every request about to leave (so the
-- outcome of every request is decidable after any crash), which fields a
-- stored snapshot covers (the merge base may be partial), and ETags whose
-- bytes are not valid UTF-8.

-- +goose Up
-- One row per request the processor is about to send, committed after the
-- target's gate admits it and before it leaves. The round that sent it
-- deletes it in the transaction that records its attempts row. A row still
-- here when a job next locks its resource (a killed process, a failed
-- recording, a terminated connection) is a request the remote may have seen
-- without stagesync recording the answer: it becomes an attempts row with
-- outcome 'unknown', and the newest such write makes the resource in doubt.
CREATE SEQUENCE stagesync.outbox_id_seq;
CREATE TABLE stagesync.outbox (
    id              bigint PRIMARY KEY DEFAULT nextval('stagesync.outbox_id_seq'),
    target          text NOT NULL,
    -- NULL for a batch ETag lookup, which names many resources.
    resource_id     text,
    change_ids      bigint[] NOT NULL DEFAULT '{}',
    method          text NOT NULL,
    url             text NOT NULL,
    -- if_match is readable text; if_match_raw holds the exact bytes sent
    -- when they are not valid UTF-8 (a remote's odd ETag echoed back).
    if_match        text,
    if_match_raw    bytea,
    if_none_match   text,
    idempotency_key text,
    -- The JSON body of a write, as sent.
    body            jsonb,
    job_id          bigint,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER SEQUENCE stagesync.outbox_id_seq OWNED BY stagesync.outbox.id;
CREATE INDEX outbox_resource_idx ON stagesync.outbox (target, resource_id)
    WHERE resource_id IS NOT NULL;
CREATE INDEX outbox_lookup_idx ON stagesync.outbox (created_at)
    WHERE resource_id IS NULL;
GRANT SELECT ON stagesync.outbox TO stagesync_reporting;

-- snapshot_fields: the fields the snapshot covers when it is partial (a
-- batch lookup asked only for the fields the merge needs); NULL when the
-- snapshot is the whole representation. A field outside it has an unknown
-- merge base. etag_raw: the ETag's bytes when they are not valid UTF-8;
-- etag then holds a readable, escaped form and If-Match sends etag_raw.
ALTER TABLE stagesync.resources
    ADD COLUMN snapshot_fields text[],
    ADD COLUMN etag_raw bytea;

-- Batch ETag lookups name no resource, so no job locking a resource finds
-- them. One whose job attempt is over (the job ended, or was run again since
-- the row was written, e.g. after its process died) was never recorded: it
-- becomes an 'unknown' attempts row. Returns how many it swept.
-- +goose StatementBegin
CREATE FUNCTION stagesync.outbox_sweep_lookups()
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH swept AS (
        DELETE FROM stagesync.outbox o
        WHERE o.resource_id IS NULL
          AND NOT EXISTS (
              SELECT 1 FROM public.river_job j
              WHERE j.id = o.job_id
                AND j.state = 'running'
                AND j.attempted_at <= o.created_at
          )
        RETURNING o.*
    ), recorded AS (
        INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url, if_match,
            duration_ms, outcome, error, job_id, created_at)
        SELECT s.target, NULL, s.change_ids, s.method, s.url, s.if_match, 0, 'unknown',
               'the process that sent this request ended before recording its answer', s.job_id, s.created_at
        FROM swept s
        RETURNING 1
    )
    SELECT count(*)::integer FROM recorded;
$$;
-- +goose StatementEnd
REVOKE ALL ON FUNCTION stagesync.outbox_sweep_lookups() FROM PUBLIC;

-- +goose Down
DROP FUNCTION stagesync.outbox_sweep_lookups();
ALTER TABLE stagesync.resources
    DROP COLUMN etag_raw,
    DROP COLUMN snapshot_fields;
REVOKE ALL ON stagesync.outbox FROM stagesync_reporting;
DROP TABLE stagesync.outbox;
