-- A resource_id of only Unicode spaces (U+00A0, U+3000, zero-width
-- spaces, ...) looks as blank as one of ASCII spaces, on the status page, in
-- logs and on the remote: changes_check_inserted refuses it too.

-- +goose Up
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION stagesync.changes_check_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
    known text;
    -- Unicode's spaces and zero-width characters: an id of only these looks
    -- blank wherever it is shown. Built with chr() so that the function
    -- also compiles in a database whose encoding is not UTF8 (there only
    -- the ASCII space counts).
    blanks text := CASE WHEN pg_catalog.current_setting('server_encoding') OPERATOR(pg_catalog.=) 'UTF8'
        THEN ' ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(ARRAY(
            SELECT pg_catalog.chr(cp) FROM pg_catalog.unnest(ARRAY[160, 5760, 8192, 8193, 8194, 8195, 8196,
                8197, 8198, 8199, 8200, 8201, 8202, 8203, 8204, 8205, 8232, 8233, 8239, 8287, 8288,
                12288, 65279]) AS cp), '')
        ELSE ' ' END;
BEGIN
    -- Per statement the blanks are built once; per row this costs about
    -- half a microsecond: btrim and @? are the cheapest tests (a regex or
    -- jsonb_path_exists cost more). Control characters are refused before,
    -- by changes_valid, so a blank id is one of spaces only.
    SELECT n.target, n.resource_id,
           n.fields OPERATOR(pg_catalog.@?) 'strict $.**{33}' AS deep,
           pg_catalog.btrim(n.resource_id, blanks) OPERATOR(pg_catalog.=) '' AS blank
    INTO bad
    FROM inserted n
    LEFT JOIN stagesync.targets t ON t.name OPERATOR(pg_catalog.=) n.target
    WHERE t.name IS NULL
       OR pg_catalog.btrim(n.resource_id, blanks) OPERATOR(pg_catalog.=) ''
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
