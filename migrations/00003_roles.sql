-- Least-privilege roles (SPEC §3.6). Roles are cluster-wide while the schema
-- is per database, so creating them tolerates their existence: several
-- stagesync databases (and parallel test databases) share one server.

-- +goose Up
-- +goose StatementBegin
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['stagesync_upstream', 'stagesync_reporting', 'stagesync_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created concurrently by a migration of another database
            END;
        END IF;
    END LOOP;
    IF NOT pg_has_role('stagesync_admin', 'stagesync_reporting', 'MEMBER') THEN
        BEGIN
            GRANT stagesync_reporting TO stagesync_admin;
        EXCEPTION WHEN unique_violation OR duplicate_object THEN
            NULL;
        END;
    END IF;
END
$$;
-- +goose StatementEnd

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA stagesync FROM PUBLIC;
GRANT USAGE ON SCHEMA stagesync TO stagesync_upstream, stagesync_reporting;

-- The upstream may insert the columns that describe a change, and read its
-- own rows (RETURNING, checking status) — never update, delete or see others,
-- nor read anything else (SPEC §3.6). The foreign key check against targets
-- runs as the table owner, so it needs no grant on targets.
GRANT INSERT (target, resource_id, op, fields, source, idempotency_key)
    ON stagesync.changes TO stagesync_upstream;
GRANT SELECT ON stagesync.changes TO stagesync_upstream;

ALTER TABLE stagesync.changes ENABLE ROW LEVEL SECURITY;
-- source is who wrote the row; forcing it to the login keeps it trustworthy
-- and scopes (source, idempotency_key) to one upstream.
CREATE POLICY changes_upstream_insert ON stagesync.changes
    FOR INSERT TO stagesync_upstream WITH CHECK (source = current_user);
CREATE POLICY changes_upstream_select ON stagesync.changes
    FOR SELECT TO stagesync_upstream USING (source = current_user);
CREATE POLICY changes_reporting_select ON stagesync.changes
    FOR SELECT TO stagesync_reporting USING (true);

GRANT SELECT ON stagesync.conflict_rates, stagesync.backlog, stagesync.dead_letters,
    stagesync.changes, stagesync.targets, stagesync.resources, stagesync.attempts,
    stagesync.merges, stagesync.admin_actions
    TO stagesync_reporting;
GRANT EXECUTE ON FUNCTION stagesync.change_history(bigint) TO stagesync_reporting;
GRANT EXECUTE ON FUNCTION stagesync.conflict_rates_since(timestamptz) TO stagesync_reporting;
GRANT EXECUTE ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean)
    TO stagesync_admin;

-- +goose Down
REVOKE ALL ON FUNCTION stagesync.requeue(bigint[], text, timestamptz, timestamptz, boolean)
    FROM stagesync_admin;
REVOKE ALL ON FUNCTION stagesync.change_history(bigint) FROM stagesync_reporting;
REVOKE ALL ON FUNCTION stagesync.conflict_rates_since(timestamptz) FROM stagesync_reporting;
REVOKE ALL ON ALL TABLES IN SCHEMA stagesync FROM stagesync_upstream, stagesync_reporting;
DROP POLICY changes_reporting_select ON stagesync.changes;
DROP POLICY changes_upstream_select ON stagesync.changes;
DROP POLICY changes_upstream_insert ON stagesync.changes;
ALTER TABLE stagesync.changes DISABLE ROW LEVEL SECURITY;
REVOKE USAGE ON SCHEMA stagesync FROM stagesync_upstream, stagesync_reporting;
