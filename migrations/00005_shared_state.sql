-- State shared between processes and read by operators: per-field
-- provenance and in-doubt writes on resources, the live processes and their
-- per-target health, target pauses for throttling, and the attempt outcomes
-- for requests whose answer never arrived or said "not modified".

-- +goose Up
-- field_versions: for each field, the id of the newest change whose value
-- stagesync has settled (written, found already there, or set aside by a
-- policy). A change that commits late with a lower id never overwrites it.
-- in_doubt: a write that may have reached the remote without its answer
-- being recorded (a crash, a dropped connection, a timeout, a missing batch
-- item): {method, url, if_match, if_none_match, idempotency_key, body,
-- change_ids, at}. It is resolved before the resource's next write.
ALTER TABLE stagesync.resources
    ADD COLUMN field_versions jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN in_doubt jsonb,
    ADD CONSTRAINT resources_field_versions_is_object CHECK (jsonb_typeof(field_versions) = 'object');

-- unknown: the request may have reached the remote but no answer was
-- recorded. not_modified: a conditional GET answered 304.
ALTER TABLE stagesync.attempts DROP CONSTRAINT attempts_outcome_valid;
ALTER TABLE stagesync.attempts ADD CONSTRAINT attempts_outcome_valid CHECK (
    outcome IN ('applied', 'fetched', 'not_modified', 'conflict', 'retryable', 'fatal',
                'transport_error', 'unknown'));

-- Throttling pauses a whole target, for every process: no request to it
-- leaves before paused_until.
ALTER TABLE stagesync.targets
    ADD COLUMN paused_until timestamptz,
    ADD COLUMN pause_reason text;

-- One row per running `stagesync run` process. The process holds the
-- session-level advisory lock lock_key while it lives, so PostgreSQL itself
-- says when it died (its session ends): liveness is not a heartbeat timer.
CREATE TABLE stagesync.processes (
    client_id    text PRIMARY KEY,
    lock_key     bigint NOT NULL UNIQUE,
    -- The login of the process's sessions: only a session of this login
    -- holding lock_key makes the process alive (advisory locks are open to
    -- every role, so another role could otherwise hold the key for it).
    login        text NOT NULL DEFAULT session_user,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    targets      text[] NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Per target and process: what the process sees of the remote. Written by
-- the process every few seconds; operators read it (status, status page).
CREATE TABLE stagesync.target_health (
    target               text NOT NULL REFERENCES stagesync.targets (name) ON UPDATE CASCADE ON DELETE CASCADE,
    client_id            text NOT NULL REFERENCES stagesync.processes (client_id) ON DELETE CASCADE,
    inflight_limit       integer NOT NULL,
    concurrency          integer NOT NULL,
    rate_share           double precision,
    last_success_at      timestamptz,
    last_error_at        timestamptz,
    last_error           text,
    consecutive_failures integer NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, client_id)
);

GRANT SELECT ON stagesync.processes, stagesync.target_health TO stagesync_reporting;

-- Why a change ended as it did when the state alone does not say: a noop
-- superseded by a newer change, fields kept from the remote by a policy.
-- last_error stays for what went wrong.
ALTER TABLE stagesync.changes ADD COLUMN outcome_detail text;

-- change_history's last event carries outcome_detail.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.change_history(change_id bigint)
RETURNS TABLE (at timestamptz, event text, method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE AS $$
    SELECT h.at, h.event, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, 0::bigint AS seq, 'staged' AS event,
               NULL::text AS method, NULL::text AS url, NULL::integer AS status_code,
               NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM stagesync.changes c WHERE c.id = change_history.change_id
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.method, a.url, a.status_code, a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error,
                                  'change_ids', a.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.attempts a
          ON a.target = c.target AND a.resource_id = c.resource_id
         AND a.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions,
                                  'change_ids', m.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.merges m
          ON m.target = c.target AND m.resource_id = c.resource_id
         AND m.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT c.finished_at, 2, 0, 'finished', NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts, 'outcome_detail', c.outcome_detail)
        FROM stagesync.changes c
        WHERE c.id = change_history.change_id AND c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.change_history(change_id bigint)
RETURNS TABLE (at timestamptz, event text, method text, url text,
               status_code integer, outcome text, detail jsonb)
LANGUAGE sql STABLE AS $$
    SELECT h.at, h.event, h.method, h.url, h.status_code, h.outcome, h.detail
    FROM (
        SELECT c.created_at AS at, 0 AS ord, 0::bigint AS seq, 'staged' AS event,
               NULL::text AS method, NULL::text AS url, NULL::integer AS status_code,
               NULL::text AS outcome,
               jsonb_build_object('op', c.op, 'fields', c.fields, 'source', c.source,
                                  'idempotency_key', c.idempotency_key) AS detail
        FROM stagesync.changes c WHERE c.id = change_history.change_id
        UNION ALL
        SELECT a.created_at, 1, a.id, 'attempt', a.method, a.url, a.status_code, a.outcome,
               jsonb_build_object('if_match', a.if_match, 'response_etag', a.response_etag,
                                  'duration_ms', a.duration_ms, 'error', a.error,
                                  'change_ids', a.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.attempts a
          ON a.target = c.target AND a.resource_id = c.resource_id
         AND a.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT m.created_at, 1, m.id, 'merge', NULL, NULL, NULL, m.outcome,
               jsonb_build_object('base', m.base, 'ours', m.ours, 'theirs', m.theirs,
                                  'result', m.result, 'decisions', m.decisions,
                                  'change_ids', m.change_ids)
        FROM stagesync.changes c
        JOIN stagesync.merges m
          ON m.target = c.target AND m.resource_id = c.resource_id
         AND m.change_ids @> ARRAY[c.id]
        WHERE c.id = change_history.change_id
        UNION ALL
        SELECT c.finished_at, 2, 0, 'finished', NULL, NULL, NULL, c.status,
               jsonb_build_object('applied_etag', c.applied_etag, 'last_error', c.last_error,
                                  'attempts', c.attempts)
        FROM stagesync.changes c
        WHERE c.id = change_history.change_id AND c.finished_at IS NOT NULL
    ) h
    ORDER BY h.at, h.ord, h.seq;
$$;
-- +goose StatementEnd
ALTER TABLE stagesync.changes DROP COLUMN outcome_detail;
REVOKE ALL ON stagesync.processes, stagesync.target_health FROM stagesync_reporting;
DROP TABLE stagesync.target_health;
DROP TABLE stagesync.processes;
ALTER TABLE stagesync.targets DROP COLUMN pause_reason, DROP COLUMN paused_until;
ALTER TABLE stagesync.attempts DROP CONSTRAINT attempts_outcome_valid;
ALTER TABLE stagesync.attempts ADD CONSTRAINT attempts_outcome_valid CHECK (
    outcome IN ('applied', 'fetched', 'conflict', 'retryable', 'fatal', 'transport_error'));
ALTER TABLE stagesync.resources
    DROP CONSTRAINT resources_field_versions_is_object,
    DROP COLUMN in_doubt,
    DROP COLUMN field_versions;
