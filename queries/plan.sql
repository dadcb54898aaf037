-- name: ChangesOpenResources :many
-- The resources with open changes (pending, or claimed into a job), oldest
-- open change first, for `stagesync plan`.
SELECT target, resource_id, min(id)::bigint AS first_id
FROM stagesync.changes
WHERE status IN ('pending', 'processing') AND target = ANY (@targets::text[])
GROUP BY target, resource_id
ORDER BY min(id)
LIMIT @max;
