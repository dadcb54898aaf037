-- A refused credential (401, or 407 from a proxy) pauses a target like
-- throttling does (processor/gate.go), but it does not end by itself: the
-- pause lasts backoff.max and is renewed by the next refusal. An operator
-- who fixed the credential calls stagesync.lift_pause(target) to resume at
-- once, in every process:
--
-- * paused_until and pause_reason are cleared and pause_lifted_at is set;
--   processes learn it from the notification 'lift <target>' on
--   stagesync_coord, or, if they missed it, from pause_lifted_at, read with
--   the pauses every second.
-- * The target's apply jobs scheduled for later (the resources waiting for
--   the pause's end, and backoff retries) become available now.
-- * An admin_actions row records who lifted which pause.
--
-- SECURITY DEFINER so stagesync_admin needs no write rights on targets or
-- River's table; search_path pinned and every object named with its schema
-- (see 00006).

-- +goose Up
ALTER TABLE stagesync.targets ADD COLUMN pause_lifted_at timestamptz;

-- +goose StatementBegin
-- wake_target_jobs makes the target's apply jobs scheduled for later
-- available now, and returns how many. lift_pause calls it, and so does
-- each process that learns of a lift (again a second later), for a retry
-- job a job in flight recorded for the old pause's end after the lift.
CREATE FUNCTION stagesync.wake_target_jobs(target text) RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH w AS (
        UPDATE public.river_job j
        SET state = 'available'::public.river_job_state, scheduled_at = pg_catalog.now()
        WHERE j.queue OPERATOR(pg_catalog.=) ('stagesync_' OPERATOR(pg_catalog.||) wake_target_jobs.target)
          AND j.kind OPERATOR(pg_catalog.=) 'stagesync_apply'
          AND j.state OPERATOR(pg_catalog.=) 'scheduled'::public.river_job_state
        RETURNING 1
    )
    SELECT pg_catalog.count(*)::integer FROM w;
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION stagesync.lift_pause(target text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was_paused boolean;
    reason text;
    until timestamptz;
    woken integer;
BEGIN
    IF lift_pause.target IS NULL THEN
        RAISE EXCEPTION 'lift_pause: target is required'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT stagesync.lift_pause(''territory'') resumes target territory.';
    END IF;
    SELECT t.paused_until OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp(), t.pause_reason, t.paused_until
    INTO was_paused, reason, until
    FROM stagesync.targets t
    WHERE t.name OPERATOR(pg_catalog.=) lift_pause.target
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lift_pause: unknown target %', pg_catalog.quote_literal(lift_pause.target)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    was_paused := coalesce(was_paused, false);

    UPDATE stagesync.targets t
    SET paused_until = NULL, pause_reason = NULL, pause_lifted_at = pg_catalog.clock_timestamp()
    WHERE t.name OPERATOR(pg_catalog.=) lift_pause.target;

    woken := stagesync.wake_target_jobs(lift_pause.target);

    INSERT INTO stagesync.admin_actions (actor, action, params, affected)
    VALUES (session_user, 'lift_pause',
            pg_catalog.jsonb_build_object('target', lift_pause.target, 'was_paused', was_paused,
                                          'pause_reason', reason, 'paused_until', until),
            woken);
    PERFORM pg_catalog.pg_notify('stagesync_coord', 'lift ' OPERATOR(pg_catalog.||) lift_pause.target);
    RETURN was_paused;
END
$$;
-- +goose StatementEnd

REVOKE ALL ON FUNCTION stagesync.wake_target_jobs(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION stagesync.lift_pause(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION stagesync.lift_pause(text) TO stagesync_admin;

-- +goose Down
DROP FUNCTION stagesync.lift_pause(text);
DROP FUNCTION stagesync.wake_target_jobs(text);
ALTER TABLE stagesync.targets DROP COLUMN pause_lifted_at;
