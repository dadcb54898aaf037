package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"

	"github.com/stagesync/stagesync/db"
)

// record writes one round's results in one transaction: attempts, merges,
// resource state, change states and retry jobs.
func (p *Processor) record(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	var (
		attempts  []db.AttemptsInsertParams
		merges    []db.MergesInsertParams
		resources []db.ResourceUpsertParams
		retries   []river.InsertManyParams
		finished  = map[string]int{}
	)
	type recordKey struct {
		status, errText, etag string
		add                   int32
	}
	groups := map[recordKey][]int64{}
	var order []recordKey
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
			rp, err := resourceParams(t.Name, rr)
			if err != nil {
				return err
			}
			resources = append(resources, rp)
		}
		for _, c := range rr.changes {
			o := rr.outcome(c.id)
			k := recordKey{o.status, o.errText, o.etag, o.addAttempts}
			if _, ok := groups[k]; !ok {
				order = append(order, k)
			}
			groups[k] = append(groups[k], c.id)
			if o.status != statusProcessing {
				finished[o.status]++
			}
		}
		if !rr.retryAt.IsZero() {
			retries = append(retries, river.InsertManyParams{
				Args:       ApplyArgs{Target: t.Name, ResourceIDs: []string{rr.id}},
				InsertOpts: &river.InsertOpts{Queue: queueName(t.Name), ScheduledAt: rr.retryAt},
			})
		}
	}
	changes := make([]db.ChangesRecordParams, 0, len(order))
	for _, k := range order {
		changes = append(changes, db.ChangesRecordParams{
			Status: k.status, AddAttempts: k.add, LastError: nonEmpty(k.errText), AppliedETag: nonEmpty(k.etag), IDs: groups[k],
		})
	}

	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
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
		if len(resources) > 0 {
			if err := batchErr(p.q.ResourceUpsert(ctx, tx, resources).Exec); err != nil {
				return fmt.Errorf("store resources: %w", err)
			}
		}
		if err := batchErr(p.q.ChangesRecord(ctx, tx, changes).Exec); err != nil {
			return fmt.Errorf("record change states: %w", err)
		}
		if len(retries) > 0 {
			if _, err := p.client.InsertManyTx(ctx, tx, retries); err != nil {
				return fmt.Errorf("schedule retries: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record results of %d resources: %w", len(runs), err)
	}
	for status, n := range finished {
		p.metrics.observeFinished(t.Name, status, n)
	}
	if len(retries) > 0 {
		p.logger.DebugContext(ctx, "retries scheduled", "target", t.Name, "resources", len(retries))
	}
	return nil
}

// batchErr runs a sqlc :batchexec result and returns its first error.
func batchErr(exec func(func(int, error))) error {
	var errs []error
	exec(func(_ int, err error) {
		if err != nil {
			errs = append(errs, err)
		}
	})
	return errors.Join(errs...)
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func attemptParams(target string, jobID int64, a attemptRecord) db.AttemptsInsertParams {
	ap := db.AttemptsInsertParams{
		Target: target, ResourceID: a.resourceID, ChangeIDs: a.changeIDs, Method: a.method, URL: a.url,
		IfMatch: nonEmpty(a.ifMatch), ResponseETag: nonEmpty(a.responseETag),
		DurationMs: float64(a.duration.Microseconds()) / 1000, Outcome: a.outcome, Error: nonEmpty(a.errText),
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
		b, err = json.Marshal(v)
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

func resourceParams(target string, rr *resourceRun) (db.ResourceUpsertParams, error) {
	st := rr.state
	rp := db.ResourceUpsertParams{Target: target, ResourceID: rr.id, ETag: nonEmpty(st.etag), Deleted: st.deleted, FetchedAt: st.fetchedAt}
	if st.snapshot != nil {
		b, err := json.Marshal(st.snapshot)
		if err != nil {
			return rp, fmt.Errorf("encode snapshot of %q: %w", rr.id, err)
		}
		rp.Snapshot = b
	}
	if n := len(rr.changes); n > 0 {
		last := rr.changes[n-1].id
		rp.LastChangeID = &last
	}
	return rp, nil
}
