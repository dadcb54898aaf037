-- Per resource, the highest-id rule for existence, as field_versions is for
-- fields: write_version is the id of the newest create or update whose
-- values stagesync settled (the resource existed for it), delete_version
-- the id of the newest delete it settled. A change committed late (a lower
-- id made visible after a higher one was applied) is dropped when they say
-- a newer change decided otherwise: a create or update older than the
-- newest delete (its values were erased), a delete older than the newest
-- create, update or delete. NULL: none settled yet.
--
-- Columns rather than reserved keys of field_versions: two ids are needed
-- (which kind of change was newest decides what a late one loses), and
-- field_versions keys are field names, of which only "id" is refused at
-- INSERT (changes_fields_no_id); a column can never clash with a field.

--
-- changes.rejected_not_found marks a change rejected only because the
-- remote had no such resource (a 404, or missing from a batch ETag
-- lookup). When an older create of the same resource applies (it committed
-- late), such rejections of newer changes are put back to pending in the
-- same transaction, to be worked after it (queries/changes.sql
-- ChangesReviveNotFound).

-- +goose Up
ALTER TABLE stagesync.resources
    ADD COLUMN write_version bigint,
    ADD COLUMN delete_version bigint;
ALTER TABLE stagesync.changes
    ADD COLUMN rejected_not_found boolean NOT NULL DEFAULT false;
CREATE INDEX changes_not_found_idx ON stagesync.changes (target, resource_id, id)
    WHERE rejected_not_found;

-- +goose Down
DROP INDEX stagesync.changes_not_found_idx;
ALTER TABLE stagesync.changes DROP COLUMN rejected_not_found;
ALTER TABLE stagesync.resources
    DROP COLUMN delete_version,
    DROP COLUMN write_version;
