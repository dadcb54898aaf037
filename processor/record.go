package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/rivertype"

	"github.com/stagesync/stagesync/db"
)

// record writes one round's results in one transaction: attempts, merges,
// resource state, change states, retry jobs, and the deletion of the
// round's durable intents. If that transaction fails, each resource is
// recorded alone, so an answer PostgreSQL can't take costs only its own
// resource (see recordUnrecordable).
func (p *Processor) record(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	err := p.recordRuns(ctx, conn, t, jobID, runs)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil || conn.Conn().IsClosed() || !recordable(err) {
		// No database to record in: the job fails, and its outbox rows
		// make the next worker resolve what it sent.
		return err
	}
	if len(runs) == 1 {
		if uerr := p.recordUnrecordable(ctx, conn, t, jobID, runs[0], err); uerr != nil {
			return errors.Join(err, uerr)
		}
		return nil
	}
	p.logger.WarnContext(ctx, "recording a round failed; recording its resources one by one", "target", t.Name, "resources", len(runs), "error", err)
	for _, rr := range runs {
		err := p.recordRuns(ctx, conn, t, jobID, []*resourceRun{rr})
		if err == nil {
			continue
		}
		if ctx.Err() != nil || conn.Conn().IsClosed() {
			return err
		}
		if uerr := p.recordUnrecordable(ctx, conn, t, jobID, rr, err); uerr != nil {
			return errors.Join(err, uerr)
		}
	}
	return nil
}

// recordable is false for errors where recording again would not help.
func recordable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr)
}

// recordRuns records runs in one transaction.
func (p *Processor) recordRuns(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	var (
		attempts  []db.AttemptsInsertParams
		merges    []db.MergesInsertParams
		resources = db.ResourcesUpsertParams{Target: t.Name}
		changes   db.ChangesRecordParams
		retries   []scheduledRetry
		outboxIDs []int64
		sent      [][]attemptRecord
		finished  = map[string]int{}
	)
	for _, rr := range runs {
		for _, at := range rr.attempts {
			attempts = append(attempts, attemptParams(t.Name, jobID, at))
		}
		sent = append(sent, rr.attempts)
		outboxIDs = append(outboxIDs, rr.outboxIDs...)
		for _, m := range rr.merges {
			mp, err := mergeParams(t.Name, rr.id, m)
			if err != nil {
				return err
			}
			merges = append(merges, mp)
		}
		versions, moved := settledVersions(rr)
		if rr.stateDirty || moved {
			if err := addResource(&resources, rr, versions); err != nil {
				return err
			}
		}
		for _, c := range rr.changes {
			o := rr.outcome(c.id)
			changes.IDs = append(changes.IDs, c.id)
			changes.Statuses = append(changes.Statuses, o.status)
			changes.AddAttempts = append(changes.AddAttempts, o.addAttempts)
			changes.LastErrors = append(changes.LastErrors, cleanText(o.errText, maxErrorText))
			etag, _ := storedETag(o.etag)
			changes.AppliedETags = append(changes.AppliedETags, etag)
			changes.OutcomeDetails = append(changes.OutcomeDetails, cleanText(o.detail, maxErrorText))
			if o.status != statusProcessing {
				finished[o.status]++
			}
		}
		if !rr.retryAt.IsZero() {
			retries = append(retries, scheduledRetry{resourceID: rr.id, at: rr.retryAt})
		}
	}
	jobs := retryJobs(t, retries, time.Now())
	envs := batchEnvelopes(sent...)

	var inserted []*rivertype.JobInsertResult
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		var err error
		if len(envs) > 0 {
			if err := p.q.BatchRequestsInsert(ctx, tx, batchParams(t.Name, envs)); err != nil {
				return fmt.Errorf("insert batch requests: %w", err)
			}
		}
		if len(attempts) > 0 {
			if _, err := p.q.AttemptsInsert(ctx, tx, attempts); err != nil {
				return fmt.Errorf("insert attempts: %w", err)
			}
		}
		if len(outboxIDs) > 0 {
			if err := p.q.OutboxDelete(ctx, tx, outboxIDs); err != nil {
				return fmt.Errorf("delete recorded intents: %w", err)
			}
		}
		if len(merges) > 0 {
			if _, err := p.q.MergesInsert(ctx, tx, merges); err != nil {
				return fmt.Errorf("insert merges: %w", err)
			}
		}
		if len(resources.ResourceIDs) > 0 {
			if err := p.q.ResourcesUpsert(ctx, tx, resources); err != nil {
				return fmt.Errorf("store resources: %w", err)
			}
		}
		if len(changes.IDs) > 0 {
			if err := p.q.ChangesRecord(ctx, tx, changes); err != nil {
				return fmt.Errorf("record change states: %w", err)
			}
		}
		if len(jobs) > 0 {
			if inserted, err = p.client.InsertManyTx(ctx, tx, jobs); err != nil {
				return fmt.Errorf("schedule retries: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record results of %d resources: %w", len(runs), err)
	}
	for _, r := range inserted {
		p.waker.at(r.Job.ID, r.Job.ScheduledAt)
	}
	for status, n := range finished {
		p.metrics.observeFinished(t.Name, status, n)
	}
	if len(retries) > 0 {
		p.logger.DebugContext(ctx, "retries scheduled", "target", t.Name, "resources", len(retries), "jobs", len(jobs))
	}
	return nil
}

// settledVersions returns the resource's field_versions once this round's
// changes are recorded: for each field of a change that ended applied,
// merged or noop, the highest such change id. Dead and rejected changes
// settle nothing, except one an in-doubt write may have put on the remote.
// moved says it differs from the stored one.
func settledVersions(rr *resourceRun) (map[string]int64, bool) {
	versions, moved := rr.fieldVersions, false
	for _, c := range rr.changes {
		o := rr.outcome(c.id)
		switch o.status {
		case statusApplied, statusMerged, statusNoop:
		default:
			if !o.mayHaveLanded {
				continue
			}
		}
		for _, f := range c.carried {
			if versions[f] >= c.id {
				continue
			}
			if !moved {
				versions, moved = maps.Clone(versions), true
				if versions == nil {
					versions = map[string]int64{}
				}
			}
			versions[f] = c.id
		}
	}
	return versions, moved
}

// recordUnrecordable records what it can of a resource whose results the
// database refused (cause): its attempts without the remote's details, its
// changes dead with the reason (those refused or dead for a reason of
// their own keep it), and, when a write of the round may have
// landed, that write as the resource's in-doubt write, so the next worker
// checks it rather than forget it. The round's intents are deleted with it.
func (p *Processor) recordUnrecordable(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, rr *resourceRun, cause error) error {
	reason := cleanText("stagesync could not record the remote's answer for this resource: "+cause.Error(), maxErrorText)
	var attempts []db.AttemptsInsertParams
	for _, at := range rr.attempts {
		at.responseETag, at.errText = "", "not recorded in full: "+cause.Error()
		attempts = append(attempts, attemptParams(t.Name, jobID, at))
	}
	doubt := rr.inDoubt
	for _, at := range rr.attempts {
		if at.method != http.MethodGet && at.statusCode >= 200 && at.statusCode < 300 {
			// A write landed: its outcome is known but not recorded.
			doubt = &inDoubtWrite{Method: at.method, URL: at.url, ChangeIDs: at.changeIDs, At: at.at}
			doubt.setIfMatch(at.ifMatch)
		}
	}
	var changes db.ChangesRecordParams
	for _, c := range rr.changes {
		o := rr.outcome(c.id)
		status, lastError := statusDead, reason
		if o.status == statusRejected || o.status == statusDead {
			// Refused or given up for its own reason, which still holds.
			status, lastError = o.status, cleanText(o.errText, maxErrorText)
		}
		changes.IDs = append(changes.IDs, c.id)
		changes.Statuses = append(changes.Statuses, status)
		changes.AddAttempts = append(changes.AddAttempts, o.addAttempts)
		changes.LastErrors = append(changes.LastErrors, lastError)
		changes.AppliedETags = append(changes.AppliedETags, "")
		changes.OutcomeDetails = append(changes.OutcomeDetails, "")
	}
	inDoubt, err := doubt.encode()
	if err != nil {
		return err
	}
	envs := batchEnvelopes(rr.attempts)
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if len(envs) > 0 {
			if err := p.q.BatchRequestsInsert(ctx, tx, batchParams(t.Name, envs)); err != nil {
				return fmt.Errorf("insert batch requests: %w", err)
			}
		}
		if len(attempts) > 0 {
			if _, err := p.q.AttemptsInsert(ctx, tx, attempts); err != nil {
				return fmt.Errorf("insert attempts: %w", err)
			}
		}
		if len(rr.outboxIDs) > 0 {
			if err := p.q.OutboxDelete(ctx, tx, rr.outboxIDs); err != nil {
				return fmt.Errorf("delete recorded intents: %w", err)
			}
		}
		if inDoubt != "" {
			if err := p.q.ResourceMarkInDoubt(ctx, tx, db.ResourceMarkInDoubtParams{Target: t.Name, ResourceID: rr.id, InDoubt: []byte(inDoubt)}); err != nil {
				return fmt.Errorf("mark in doubt: %w", err)
			}
		}
		if err := p.q.ChangesRecord(ctx, tx, changes); err != nil {
			return fmt.Errorf("record change states: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record resource %q after its results were refused: %w", rr.id, err)
	}
	p.logger.WarnContext(ctx, "a resource's results could not be recorded; its changes end dead", "target", t.Name, "resource_id", rr.id, "error", cause)
	p.metrics.observeFinished(t.Name, statusDead, len(rr.changes))
	return nil
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// maxErrorText bounds error text in attempts and changes rows.
const maxErrorText = 2000

func attemptParams(target string, jobID int64, a attemptRecord) db.AttemptsInsertParams {
	ifMatch, _ := storedETag(a.ifMatch)
	respETag, _ := storedETag(a.responseETag)
	ifNoneMatch, _ := storedETag(a.ifNoneMatch)
	ap := db.AttemptsInsertParams{
		Target: target, ResourceID: a.resourceID, ChangeIDs: a.changeIDs, Method: a.method, URL: cleanText(a.url, maxErrorText),
		IfMatch: nonEmpty(cleanText(ifMatch, maxErrorText)), IfNoneMatch: nonEmpty(cleanText(ifNoneMatch, maxErrorText)),
		ResponseETag: nonEmpty(cleanText(respETag, maxErrorText)),
		DurationMs:   float64(a.duration.Microseconds()) / 1000, Outcome: a.outcome, Error: nonEmpty(cleanText(a.errText, maxErrorText)),
		JobID: &jobID, CreatedAt: a.at,
	}
	if ap.ChangeIDs == nil {
		ap.ChangeIDs = []int64{}
	}
	if a.statusCode != 0 {
		sc := int32(a.statusCode)
		ap.StatusCode = &sc
	}
	if n := len(a.batches); n > 0 && a.batches[n-1].id != 0 {
		ap.BatchID = &a.batches[n-1].id
	}
	return ap
}

func mergeParams(target, resourceID string, m mergeRecord) (db.MergesInsertParams, error) {
	mp := db.MergesInsertParams{Target: target, ResourceID: resourceID, ChangeIDs: m.changeIDs, Outcome: m.outcome, CreatedAt: m.at}
	var err error
	enc := func(v any) []byte {
		if err != nil {
			return nil
		}
		var b []byte
		b, err = json.Marshal(pgSafe(v))
		if err == nil && len(b) > maxSnapshotBytes {
			// The audit keeps the decisions; a representation this large
			// is summarized.
			b, err = json.Marshal(map[string]string{"stagesync_note": fmt.Sprintf("not stored: %d bytes, over the %d KiB limit", len(b), maxSnapshotBytes>>10)})
		}
		return b
	}
	if m.base != nil {
		mp.Base = enc(m.base)
	}
	mp.Ours = enc(m.ours)
	if m.theirs != nil {
		mp.Theirs = enc(m.theirs)
	}
	mp.Result = enc(m.result)
	mp.Decisions = enc(m.decisions)
	if err != nil {
		return mp, fmt.Errorf("encode merge of %q: %w", resourceID, err)
	}
	return mp, nil
}

// addResource appends a resource's state to the set-based upsert. What the
// remote sent is bounded and made storable here: an ETag that is not valid
// UTF-8 is kept as raw bytes beside a readable form; a snapshot field
// jsonb can't hold exactly (U+0000, a number beyond numeric's range, deep
// nesting) is left out and its base becomes unknown; a snapshot over
// maxSnapshotBytes is not stored (the base is unknown).
func addResource(p *db.ResourcesUpsertParams, rr *resourceRun, versions map[string]int64) error {
	st := rr.state
	snap, fields := "", ""
	if st.snapshot != nil {
		s, covers := storableSnapshot(st.snapshot, st.covers)
		b, err := json.Marshal(s)
		if err != nil {
			return fmt.Errorf("encode snapshot of %q: %w", rr.id, err)
		}
		if len(b) <= maxSnapshotBytes {
			snap = string(b)
			if covers != nil {
				f, _ := json.Marshal(sortedKeys(covers))
				fields = string(f)
			}
		}
	}
	fv, err := json.Marshal(versions)
	if err != nil {
		return fmt.Errorf("encode field versions of %q: %w", rr.id, err)
	}
	if versions == nil {
		fv = []byte("{}")
	}
	doubt, err := rr.inDoubt.encode()
	if err != nil {
		return fmt.Errorf("resource %q: %w", rr.id, err)
	}
	var last int64
	if n := len(rr.changes); n > 0 {
		last = rr.changes[n-1].id
	}
	etag, raw := storedETag(st.etag)
	p.ResourceIDs = append(p.ResourceIDs, rr.id)
	p.ETags = append(p.ETags, etag)
	p.ETagRaws = append(p.ETagRaws, raw)
	p.Snapshots = append(p.Snapshots, snap)
	p.SnapshotFields = append(p.SnapshotFields, fields)
	p.Deleted = append(p.Deleted, st.deleted)
	p.LastChangeIDs = append(p.LastChangeIDs, last)
	p.FieldVersions = append(p.FieldVersions, string(fv))
	p.InDoubts = append(p.InDoubts, doubt)
	return nil
}

// storableSnapshot drops the fields jsonb can't hold exactly; the result
// covers the fields it keeps (nil: all, when nothing was dropped from a
// whole representation).
func storableSnapshot(snap map[string]any, covers map[string]bool) (map[string]any, map[string]bool) {
	var bad []string
	for f, v := range snap {
		if strings.Contains(f, "\x00") || !storable(v, 1) {
			bad = append(bad, f)
		}
	}
	if len(bad) == 0 {
		return snap, covers
	}
	out := maps.Clone(snap)
	if covers == nil {
		covers = make(map[string]bool, len(snap))
		for f := range snap {
			covers[f] = true
		}
	} else {
		covers = maps.Clone(covers)
	}
	for _, f := range bad {
		delete(out, f)
		delete(covers, f)
	}
	return out, covers
}
