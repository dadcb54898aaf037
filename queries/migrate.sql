-- name: MigrationLock :exec
-- MigrationLock makes db.Migrate and db.MigrateDown take turns, around
-- River's and goose's migrations both. It is session-scoped, not
-- transaction-scoped: one dedicated connection holds it while the migrators
-- run their transactions on other connections.
SELECT pg_advisory_lock(hashtextextended('stagesync.migrate', 0));

-- name: MigrationUnlock :exec
-- MigrationUnlock releases MigrationLock on the connection that holds it.
SELECT pg_advisory_unlock(hashtextextended('stagesync.migrate', 0));
