-- Channels the processor LISTENs on, on a dedicated connection
-- (processor/dispatch.go).

-- name: ListenChanges :exec
-- Inserts into stagesync.changes and requeues notify here.
LISTEN stagesync_changes;

-- name: ListenCoordination :exec
-- Processes coming and going ("processes") and target pauses
-- ("pause <target>") notify here.
LISTEN stagesync_coord;
