-- The SQL contract of stagesync (SPEC §3): the staging table the upstream
-- writes to, the state and audit tables the processor keeps, and their
-- indexes. Views, functions and roles follow in later files.

-- +goose Up
CREATE SCHEMA IF NOT EXISTS stagesync;

-- Targets are written by the processor from its config at start; the FK from
-- changes makes an unknown target fail at INSERT time.
CREATE TABLE stagesync.targets (
    name          text PRIMARY KEY,
    base_url      text NOT NULL,
    item_path     text NOT NULL,
    update_method text NOT NULL DEFAULT 'PATCH',
    settings      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT targets_name_valid CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    CONSTRAINT targets_item_path_has_id CHECK (position('{id}' in item_path) > 0),
    CONSTRAINT targets_update_method_valid CHECK (update_method IN ('PATCH', 'PUT'))
);

CREATE TABLE stagesync.changes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target          text NOT NULL,
    resource_id     text NOT NULL,
    op              text NOT NULL DEFAULT 'update',
    fields          jsonb NOT NULL DEFAULT '{}',
    source          text NOT NULL DEFAULT current_user,
    idempotency_key text,
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    applied_etag    text,
    CONSTRAINT changes_target_known FOREIGN KEY (target)
        REFERENCES stagesync.targets (name) ON UPDATE CASCADE,
    CONSTRAINT changes_target_not_empty CHECK (target <> ''),
    CONSTRAINT changes_resource_id_not_empty CHECK (resource_id <> ''),
    CONSTRAINT changes_resource_id_too_long CHECK (octet_length(resource_id) <= 512),
    -- Control characters in an id are never legitimate and would make URLs
    -- and logs ambiguous.
    CONSTRAINT changes_resource_id_no_control_chars CHECK (resource_id !~ '[[:cntrl:]]'),
    CONSTRAINT changes_op_valid CHECK (op IN ('update', 'create', 'delete')),
    CONSTRAINT changes_fields_is_object CHECK (jsonb_typeof(fields) = 'object'),
    -- 64 KiB of JSON text per change: far above any CRM record, far below
    -- what would make a coalesced request or a merge row unreasonable.
    CONSTRAINT changes_fields_too_large CHECK (octet_length(fields::text) <= 65536),
    CONSTRAINT changes_update_has_fields CHECK (op <> 'update' OR fields <> '{}'),
    CONSTRAINT changes_delete_has_no_fields CHECK (op <> 'delete' OR fields = '{}'),
    CONSTRAINT changes_fields_no_id CHECK (NOT fields ? 'id'),
    CONSTRAINT changes_source_not_empty CHECK (source <> ''),
    CONSTRAINT changes_idempotency_key_not_blank CHECK (idempotency_key IS NULL OR idempotency_key ~ '[^[:space:]]'),
    CONSTRAINT changes_idempotency_key_no_control_chars CHECK (idempotency_key !~ '[[:cntrl:]]'),
    CONSTRAINT changes_idempotency_key_too_long CHECK (octet_length(idempotency_key) <= 200),
    CONSTRAINT changes_status_valid CHECK (status IN ('pending', 'processing', 'applied', 'merged', 'noop', 'dead', 'rejected')),
    CONSTRAINT changes_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT changes_finished_iff_terminal CHECK (
        (status IN ('pending', 'processing')) = (finished_at IS NULL))
);

-- Unique per upstream, for the rows that carry a key. Partial, so the many
-- rows without one cost no entry on each of their updates; a retried insert
-- uses plain ON CONFLICT DO NOTHING (or names the predicate:
-- ON CONFLICT (source, idempotency_key) WHERE idempotency_key IS NOT NULL).
CREATE UNIQUE INDEX changes_idempotency_key_unique ON stagesync.changes (source, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Finding pending work must stay cheap with millions of finished rows: these
-- partial indexes only hold open (or failed) changes, so they stay as small
-- as the backlog. Every index here is paid twice per change (claim, finish),
-- so there are few others.
CREATE INDEX changes_pending_idx ON stagesync.changes (id) WHERE status = 'pending';
-- resource_id leads: lookups name a few resources of a target, and a
-- target-first index tempts the planner (with stale statistics during a
-- burst) into scanning the whole backlog of the target.
CREATE INDEX changes_open_resource_idx ON stagesync.changes (resource_id, target, id)
    WHERE status IN ('pending', 'processing');
CREATE INDEX changes_failed_idx ON stagesync.changes (finished_at DESC, id DESC)
    WHERE status IN ('dead', 'rejected');
-- For hourly reports over a recent window (conflict_rates_since).
CREATE INDEX changes_finished_at_idx ON stagesync.changes (finished_at)
    WHERE finished_at IS NOT NULL;

-- The last known remote representation of each resource: its ETag (what
-- If-Match sends) and snapshot (the three-way merge base).
CREATE TABLE stagesync.resources (
    target         text NOT NULL REFERENCES stagesync.targets (name) ON UPDATE CASCADE,
    resource_id    text NOT NULL,
    etag           text,
    snapshot       jsonb,
    deleted        boolean NOT NULL DEFAULT false,
    fetched_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    last_change_id bigint,
    PRIMARY KEY (target, resource_id)
);

-- One row per HTTP request made to a remote.
CREATE TABLE stagesync.attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target        text NOT NULL,
    resource_id   text,
    change_ids    bigint[] NOT NULL DEFAULT '{}',
    method        text NOT NULL,
    url           text NOT NULL,
    if_match      text,
    status_code   integer,
    response_etag text,
    duration_ms   double precision NOT NULL,
    outcome       text NOT NULL,
    error         text,
    job_id        bigint,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT attempts_outcome_valid CHECK (
        outcome IN ('applied', 'fetched', 'conflict', 'retryable', 'fatal', 'transport_error'))
);
CREATE INDEX attempts_created_idx ON stagesync.attempts (created_at);
CREATE INDEX attempts_resource_idx ON stagesync.attempts (target, resource_id, id);

-- One row per conflict the three-way merge resolved (or refused to).
CREATE TABLE stagesync.merges (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target      text NOT NULL,
    resource_id text NOT NULL,
    change_ids  bigint[] NOT NULL,
    base        jsonb,
    ours        jsonb NOT NULL,
    theirs      jsonb,
    result      jsonb NOT NULL,
    decisions   jsonb NOT NULL,
    outcome     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT merges_outcome_valid CHECK (outcome IN ('merged', 'noop', 'needs_review'))
);
CREATE INDEX merges_resource_idx ON stagesync.merges (target, resource_id, id);
CREATE INDEX merges_created_idx ON stagesync.merges (created_at);

CREATE TABLE stagesync.admin_actions (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor      text NOT NULL DEFAULT session_user,
    action     text NOT NULL,
    params     jsonb NOT NULL DEFAULT '{}',
    affected   integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- +goose StatementBegin
CREATE FUNCTION stagesync.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER changes_touch_updated_at BEFORE UPDATE ON stagesync.changes
    FOR EACH ROW EXECUTE FUNCTION stagesync.touch_updated_at();
CREATE TRIGGER targets_touch_updated_at BEFORE UPDATE ON stagesync.targets
    FOR EACH ROW EXECUTE FUNCTION stagesync.touch_updated_at();

-- One notification per INSERT statement (not per row): a 10,000-row batch
-- from the CRM wakes the processor once.
-- +goose StatementBegin
CREATE FUNCTION stagesync.notify_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stagesync_changes', TG_OP);
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER changes_notify AFTER INSERT ON stagesync.changes
    FOR EACH STATEMENT EXECUTE FUNCTION stagesync.notify_changes();

-- +goose Down
DROP SCHEMA stagesync CASCADE;
