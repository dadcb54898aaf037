package processor

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/stagesync/stagesync/db"
)

// record writes one round's results in one transaction: attempts, merges,
// resource state, change states and retry jobs.
func (p *Processor) record(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	var (
		attempts  []db.AttemptsInsertParams
		merges    []db.MergesInsertParams
		resources = db.ResourcesUpsertParams{Target: t.Name}
		changes   db.ChangesRecordParams
		retries   []river.InsertManyParams
		finished  = map[string]int{}
	)
	for _, rr := range runs {
		for _, at := range rr.attempts {
			attempts = append(attempts, attemptParams(t.Name, jobID, at))
		}
		for _, m := range rr.merges {
			mp, err := mergeParams(t.Name, rr.id, m)
			if err != nil {
				return err
			}
			merges = append(merges, mp)
		}
		if rr.stateDirty {
			if err := addResource(&resources, rr); err != nil {
				return err
			}
		}
		for _, c := range rr.changes {
			o := rr.outcome(c.id)
			changes.IDs = append(changes.IDs, c.id)
			changes.Statuses = append(changes.Statuses, o.status)
			changes.AddAttempts = append(changes.AddAttempts, o.addAttempts)
			changes.LastErrors = append(changes.LastErrors, cleanText(o.errText, maxErrorText))
			changes.AppliedETags = append(changes.AppliedETags, o.etag)
			if o.status != statusProcessing {
				finished[o.status]++
			}
		}
		if !rr.retryAt.IsZero() {
			retries = append(retries, river.InsertManyParams{
				Args:       ApplyArgs{Target: t.Name, ResourceIDs: []string{rr.id}},
				InsertOpts: &river.InsertOpts{Queue: QueueName(t.Name), ScheduledAt: rr.retryAt},
			})
		}
	}

	var inserted []*rivertype.JobInsertResult
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		var err error
		if len(attempts) > 0 {
			if _, err := p.q.AttemptsInsert(ctx, tx, attempts); err != nil {
				return fmt.Errorf("insert attempts: %w", err)
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
		if len(retries) > 0 {
			if inserted, err = p.client.InsertManyTx(ctx, tx, retries); err != nil {
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
		p.logger.DebugContext(ctx, "retries scheduled", "target", t.Name, "resources", len(retries))
	}
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
	ap := db.AttemptsInsertParams{
		Target: target, ResourceID: a.resourceID, ChangeIDs: a.changeIDs, Method: a.method, URL: a.url,
		IfMatch: nonEmpty(a.ifMatch), ResponseETag: nonEmpty(a.responseETag),
		DurationMs: float64(a.duration.Microseconds()) / 1000, Outcome: a.outcome, Error: nonEmpty(cleanText(a.errText, maxErrorText)),
		JobID: &jobID, CreatedAt: a.at,
	}
	if ap.ChangeIDs == nil {
		ap.ChangeIDs = []int64{}
	}
	if a.statusCode != 0 {
		sc := int32(a.statusCode)
		ap.StatusCode = &sc
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

// addResource appends a resource's state to the set-based upsert.
func addResource(p *db.ResourcesUpsertParams, rr *resourceRun) error {
	st := rr.state
	snap := ""
	if st.snapshot != nil {
		b, err := json.Marshal(pgSafe(st.snapshot))
		if err != nil {
			return fmt.Errorf("encode snapshot of %q: %w", rr.id, err)
		}
		snap = string(b)
	}
	var last int64
	if n := len(rr.changes); n > 0 {
		last = rr.changes[n-1].id
	}
	p.ResourceIDs = append(p.ResourceIDs, rr.id)
	p.ETags = append(p.ETags, st.etag)
	p.Snapshots = append(p.Snapshots, snap)
	p.Deleted = append(p.Deleted, st.deleted)
	p.LastChangeIDs = append(p.LastChangeIDs, last)
	return nil
}
