-- Queries of `stagesync demo`, which plays the CRM: it stages changes the
-- way an upstream would and watches them finish.

-- name: DemoChangesInsert :many
-- One upstream batch in one statement. A retried batch carries the same
-- idempotency keys, so ON CONFLICT makes the retry insert nothing. rows is a
-- JSON array of {resource_id, fields, idempotency_key}; ids follow its order.
INSERT INTO stagesync.changes (target, resource_id, fields, source, idempotency_key)
SELECT @target::text, e.r ->> 'resource_id', e.r -> 'fields', @source::text, e.r ->> 'idempotency_key'
FROM jsonb_array_elements(@rows::jsonb) WITH ORDINALITY AS e (r, ord)
ORDER BY e.ord
ON CONFLICT DO NOTHING
RETURNING id;

-- name: DemoChangeGet :one
SELECT id, status, last_error
FROM stagesync.changes
WHERE id = @id;
