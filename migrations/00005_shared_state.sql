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

-- +goose Down
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
