-- A resource_id of only Unicode spaces (U+00A0, U+3000, zero-width
-- spaces, fillers such as U+3164 and U+2800, ...) looks as blank as one of
-- ASCII spaces, on the status page, in logs and on the remote:
-- changes_check_inserted refuses it too. And a resource_id holding a bidi
-- control (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C) shows
-- reversed or reordered wherever it is printed, so an operator would read
-- another id than the one stored: refused as changes_resource_id_no_bidi.

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.changes_check_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
    known text;
    -- Unicode's spaces, zero-width characters and fillers: an id of only
    -- these looks blank wherever it is shown; and the bidi controls. Built
    -- with chr() so that the function also compiles in a database whose
    -- encoding is not UTF8 (there only the ASCII space counts).
    utf8 constant boolean := pg_catalog.current_setting('server_encoding') OPERATOR(pg_catalog.=) 'UTF8';
    blanks text := CASE WHEN utf8
        THEN ' ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(ARRAY(
            SELECT pg_catalog.chr(cp) FROM pg_catalog.unnest(ARRAY[173, 160, 847, 4447, 4448, 5760, 6068, 6069,
                6158, 8192, 8193, 8194, 8195, 8196, 8197, 8198, 8199, 8200, 8201, 8202, 8203, 8204, 8205,
                8232, 8233, 8239, 8287, 8288, 8289, 8290, 8291, 8292, 10240, 12288, 12644, 65279, 65440]) AS cp), '')
        ELSE ' ' END;
    bidi text := CASE WHEN utf8
        THEN pg_catalog.array_to_string(ARRAY(
            SELECT pg_catalog.chr(cp) FROM pg_catalog.unnest(ARRAY[1564, 8206, 8207, 8234, 8235, 8236, 8237, 8238,
                8294, 8295, 8296, 8297]) AS cp), '')
        ELSE '' END;
BEGIN
    -- Per statement the blanks are built once; per row this costs about
    -- half a microsecond: btrim and @? are the cheapest tests (a regex or
    -- jsonb_path_exists cost more). Control characters are refused before,
    -- by changes_valid, so a blank id is one of spaces only.
    SELECT n.target, n.resource_id,
           n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}' AS deep,
           pg_catalog.btrim(n.resource_id, blanks) OPERATOR(pg_catalog.=) '' AS blank,
           pg_catalog.translate(n.resource_id, bidi, '') OPERATOR(pg_catalog.<>) n.resource_id AS reordered
    INTO bad
    FROM inserted n
    LEFT JOIN stagesync.targets t ON t.name OPERATOR(pg_catalog.=) n.target
    WHERE t.name IS NULL
       OR pg_catalog.btrim(n.resource_id, blanks) OPERATOR(pg_catalog.=) ''
       OR pg_catalog.translate(n.resource_id, bidi, '') OPERATOR(pg_catalog.<>) n.resource_id
       OR n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}'
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF bad.deep THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_fields_too_deep',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'fields',
            MESSAGE = format('fields of resource %s nests objects and arrays more than 32 levels deep',
                             to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_fields_too_deep of table stagesync.changes.',
            HINT = 'Flatten the value: a value may sit inside at most 32 objects or arrays.';
    ELSIF bad.blank THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_resource_id_not_empty',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'resource_id',
            MESSAGE = format('resource_id must not be empty or only spaces; got %s', to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_resource_id_not_empty of table stagesync.changes.',
            HINT = 'Set resource_id to the id of the resource on the remote.';
    ELSIF bad.reordered THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_resource_id_no_bidi',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'resource_id',
            MESSAGE = format('resource_id must not contain bidi controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C): they reorder how it is shown; got %s',
                             to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_resource_id_no_bidi of table stagesync.changes.',
            HINT = 'Set resource_id to the id of the resource on the remote, without direction marks.';
    END IF;
    SELECT string_agg(k.name, ', ' ORDER BY k.name) INTO known
    FROM (SELECT t.name FROM stagesync.targets t ORDER BY t.name LIMIT 20) k;
    RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'changes_target_known',
        SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'target',
        MESSAGE = CASE WHEN known IS NULL
            THEN format('unknown target %s: no target is configured yet', to_jsonb(left(bad.target, 64)))
            ELSE format('unknown target %s; the configured targets are: %s', to_jsonb(left(bad.target, 64)), known) END,
        DETAIL = 'The row breaks foreign key constraint changes_target_known of table stagesync.changes.',
        HINT = 'stagesync run registers the targets of its config file when it starts.';
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.changes_check_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
    known text;
BEGIN
    -- Per row this costs about half a microsecond: btrim and @? are the
    -- cheapest tests (a regex or jsonb_path_exists cost more). Control
    -- characters are refused before, by changes_valid, so a blank id is one
    -- of spaces only.
    SELECT n.target, n.resource_id,
           n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}' AS deep,
           btrim(n.resource_id) OPERATOR(pg_catalog.=) '' AS blank
    INTO bad
    FROM inserted n
    LEFT JOIN stagesync.targets t ON t.name OPERATOR(pg_catalog.=) n.target
    WHERE t.name IS NULL
       OR btrim(n.resource_id) OPERATOR(pg_catalog.=) ''
       OR n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}'
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF bad.deep THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_fields_too_deep',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'fields',
            MESSAGE = format('fields of resource %s nests objects and arrays more than 32 levels deep',
                             to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_fields_too_deep of table stagesync.changes.',
            HINT = 'Flatten the value: a value may sit inside at most 32 objects or arrays.';
    ELSIF bad.blank THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'changes_resource_id_not_empty',
            SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'resource_id',
            MESSAGE = format('resource_id must not be empty or only spaces; got %s', to_jsonb(left(bad.resource_id, 40))),
            DETAIL = 'The row breaks rule changes_resource_id_not_empty of table stagesync.changes.',
            HINT = 'Set resource_id to the id of the resource on the remote.';
    END IF;
    SELECT string_agg(k.name, ', ' ORDER BY k.name) INTO known
    FROM (SELECT t.name FROM stagesync.targets t ORDER BY t.name LIMIT 20) k;
    RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'changes_target_known',
        SCHEMA = 'stagesync', TABLE = 'changes', COLUMN = 'target',
        MESSAGE = CASE WHEN known IS NULL
            THEN format('unknown target %s: no target is configured yet', to_jsonb(left(bad.target, 64)))
            ELSE format('unknown target %s; the configured targets are: %s', to_jsonb(left(bad.target, 64)), known) END,
        DETAIL = 'The row breaks foreign key constraint changes_target_known of table stagesync.changes.',
        HINT = 'stagesync run registers the targets of its config file when it starts.';
END
$$;
-- +goose StatementEnd
