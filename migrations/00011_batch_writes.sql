-- Batch writes (OData 4.01 JSON $batch) and conditional GETs. Each write that
-- travels in a batch keeps its own attempts row (its own status, ETag and
-- outcome, as a single request would have); the batch POST that carried it
-- is one row of stagesync.batch_requests, which attempts.batch_id names.
-- So attempts still counts requests as the remote handled them (one per
-- write, whatever envelope it came in: what conflict rates divide by), and
-- the HTTP requests made are the attempts rows without a batch_id plus the
-- batch_requests rows.

-- +goose Up
-- Ids are handed out by each process in blocks (one nextval per 64 batch
-- POSTs), so a POST costs no round trip to the database; a block's unused
-- ids are simply never used.
CREATE SEQUENCE stagesync.batch_requests_id_seq INCREMENT BY 64;

-- One row per batch POST that left, whatever its answer: items is how many
-- writes it carried; status_code is the POST's own status (NULL: no
-- answer). outcome: answered (200 with the items' answers: see their
-- attempts rows), too_large (413: the writes were sent again in smaller
-- batches), failed (another status for the whole batch: its writes are
-- retried), transport_error (no answer, and nothing can have reached the
-- remote), unknown (the POST may have reached the remote but its answer is
-- missing or unreadable: its writes are in doubt). Written in the
-- transaction that records its items (by every job whose writes it carried,
-- once).
CREATE TABLE stagesync.batch_requests (
    id          bigint PRIMARY KEY,
    target      text NOT NULL,
    url         text NOT NULL,
    items       integer NOT NULL,
    status_code integer,
    duration_ms double precision NOT NULL,
    outcome     text NOT NULL,
    error       text,
    created_at  timestamptz NOT NULL,
    CONSTRAINT batch_requests_items_positive CHECK (items > 0),
    CONSTRAINT batch_requests_outcome_valid CHECK (
        outcome IN ('answered', 'too_large', 'failed', 'transport_error', 'unknown'))
);
ALTER SEQUENCE stagesync.batch_requests_id_seq OWNED BY stagesync.batch_requests.id;
-- Per target and time: retention deletes a target's old rows through it.
CREATE INDEX batch_requests_target_created_idx ON stagesync.batch_requests (target, created_at);
GRANT SELECT ON stagesync.batch_requests TO stagesync_reporting;

-- batch_id: the batch POST (stagesync.batch_requests.id) a write travelled
-- in; NULL for a request sent on its own. No foreign key: an item's row and
-- its batch's row are written by the same transaction, and retention may
-- age the two tables apart. if_none_match: the If-None-Match sent (a create's
-- "*", a conditional GET's stored ETag).
ALTER TABLE stagesync.attempts
    ADD COLUMN batch_id bigint,
    ADD COLUMN if_none_match text;

-- +goose Down
ALTER TABLE stagesync.attempts
    DROP COLUMN if_none_match,
    DROP COLUMN batch_id;
REVOKE ALL ON stagesync.batch_requests FROM stagesync_reporting;
DROP TABLE stagesync.batch_requests;
