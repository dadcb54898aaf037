package processor

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
)

// PlanOptions choose what Plan describes.
type PlanOptions struct {
	// Target limits the plan to one configured target; "" means all.
	Target string
	// Limit is the most resources described, oldest open change first.
	// Defaults to 50.
	Limit int
}

// PlannedStep is one thing the next worker of a resource would do: send a
// request, or end changes without one.
type PlannedStep struct {
	Target     string  `json:"target"`
	ResourceID string  `json:"resource_id"`
	ChangeIDs  []int64 `json:"change_ids"`
	// Method, URL, IfMatch, IfNoneMatch, IdempotencyKey and Body are the
	// request. Method is empty when the changes end without one (see
	// Outcome). Body is the JSON body after coalescing (for a PUT, the
	// document with the fields applied).
	Method         string         `json:"method,omitempty"`
	URL            string         `json:"url,omitempty"`
	IfMatch        string         `json:"if_match,omitempty"`
	IfNoneMatch    string         `json:"if_none_match,omitempty"`
	IdempotencyKey string         `json:"idempotency_key,omitempty"`
	Body           map[string]any `json:"body,omitempty"`
	// First is what must happen before the request, whose If-Match then
	// comes from it (IfMatch is empty): PlanLookupFirst,
	// PlanResolveInDoubtFirst or PlanAfterPrevious. Empty: nothing.
	First string `json:"first,omitempty"`
	// Outcome is how the changes end without a request (noop, rejected).
	Outcome string `json:"outcome,omitempty"`
	// Note says why, in words.
	Note string `json:"note,omitempty"`
}

// What a planned request waits for (PlannedStep.First).
const (
	// PlanLookupFirst: no usable ETag is stored; a batch ETag lookup or a
	// GET comes first.
	PlanLookupFirst = "lookup first"
	// PlanResolveInDoubtFirst: an earlier write may have landed without its
	// answer being recorded; it is resolved first.
	PlanResolveInDoubtFirst = "resolve in-doubt write first"
	// PlanAfterPrevious: the ETag comes from the answer to the resource's
	// previous step.
	PlanAfterPrevious = "after the previous step"
)

// Plan describes what the next requests for open changes (pending, or
// claimed by a job that has not finished them) would be, resource by
// resource, without sending anything or changing any row: it reads in one
// read-only transaction and runs the applier's own decisions (the
// per-field ordering by field_versions, coalescing into segments, the
// no-op check against the stored state, the lookups a missing ETag needs,
// in-doubt writes) up to the request each would send. Requests after the
// first of a resource depend on its answer; they are listed with what they
// wait for.
func Plan(ctx context.Context, pool *pgxpool.Pool, cfg *Config, opts PlanOptions) ([]PlannedStep, error) {
	targets := cfg.TargetNames()
	if opts.Target != "" {
		if cfg.Targets[opts.Target] == nil {
			return nil, fmt.Errorf("plan: target %q is not in the config (it has %v)", opts.Target, targets)
		}
		targets = []string{opts.Target}
	}
	if opts.Limit <= 0 {
		opts.Limit = 50
	}
	q := db.New()
	var steps []PlannedStep
	err := pgx.BeginTxFunc(ctx, pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		open, err := q.ChangesOpenResources(ctx, tx, db.ChangesOpenResourcesParams{Targets: targets, Max: int32(opts.Limit)})
		if err != nil {
			return fmt.Errorf("list resources with open changes: %w", err)
		}
		byTarget := map[string][]string{}
		for _, o := range open {
			byTarget[o.Target] = append(byTarget[o.Target], o.ResourceID)
		}
		planned := map[string][]PlannedStep{}
		for _, name := range slices.Sorted(maps.Keys(byTarget)) {
			t := cfg.Targets[name]
			ids := slices.Sorted(slices.Values(byTarget[name]))
			runs, err := loadRuns(ctx, q, tx, t, ids)
			if err != nil {
				return fmt.Errorf("target %s: %w", name, err)
			}
			a := &applier{t: t, r: &remote{t: t}}
			for _, rr := range runs {
				planned[name+"\x00"+rr.id] = a.plan(rr)
			}
		}
		for _, o := range open {
			steps = append(steps, planned[o.Target+"\x00"+o.ResourceID]...)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return steps, nil
}

// plan is run without the network: the steps the resource's next worker
// would take, up to and including each request it would send.
func (a *applier) plan(rr *resourceRun) []PlannedStep {
	var steps []PlannedStep
	ended := func(cs []openChange) {
		for _, c := range cs {
			if o := rr.outcomes[c.id]; o != nil && o.status != statusProcessing {
				note := o.detail
				if o.errText != "" {
					note = joinDetail(o.errText, note)
				}
				steps = append(steps, PlannedStep{Target: a.t.Name, ResourceID: rr.id, ChangeIDs: []int64{c.id}, Outcome: o.status, Note: note})
			}
		}
	}
	ended(rr.changes) // fields that can't be read
	before := maps.Clone(rr.outcomes)
	live := a.live(rr)
	for _, c := range rr.changes {
		if _, was := before[c.id]; !was {
			ended([]openChange{c}) // superseded by newer changes
		}
	}

	st := rr.state
	first := ""
	if d := rr.inDoubt; d != nil {
		if open := d.carried(live); len(open) > 0 && d.Method != "" {
			steps = append(steps, a.step(rr, open, d.request(rr.id), "",
				"resolve the in-doubt write first: the very request whose answer was lost is sent again; a conflict means a GET and the in-doubt merge"))
			live = without(live, open)
		} else {
			steps = append(steps, a.step(rr, live, request{method: http.MethodGet, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(live)}, "",
				"resolve the in-doubt write first: GET the resource; its first write merges under the in-doubt rules"))
		}
		first = PlanResolveInDoubtFirst
	}
	lookup := "a GET of the resource"
	if a.batchLookup(rr) {
		lookup = "the job's batch ETag lookup (" + a.t.BaseURL + a.t.BatchETagPath + "?ids=…)"
	}
	for _, seg := range segments(live, a.t.MaxCoalesce) {
		switch seg[0].op {
		case "create":
			steps = append(steps, a.step(rr, seg, a.createRequest(rr, seg, fold(seg)), first, "create: only if the resource does not exist yet; if it does, a GET and a merge with an unknown base"))
		case "delete":
			note := ""
			if first == "" && deleteFetchFirst(st) {
				first, note = PlanLookupFirst, "no ETag stored: a GET of the resource first (already gone: noop)"
			}
			steps = append(steps, a.step(rr, seg, a.deleteRequest(rr, seg, st), first, note))
		default:
			fields := fold(seg)
			note := ""
			switch {
			case first != "":
			case st.holds(fields):
				steps = append(steps, PlannedStep{Target: a.t.Name, ResourceID: rr.id, ChangeIDs: changeIDs(seg), Outcome: statusNoop,
					Note: fmt.Sprintf("nothing sent: the stored state of the remote (ETag %s) already shows these values", cleanText(st.etag, 100))})
				continue
			case a.fetchFirst(st):
				first, note = PlanLookupFirst, "no usable ETag stored: its ETag comes from "+lookup+" first (a resource already holding these values ends noop)"
				if a.t.UpdateMethod == http.MethodPut {
					note += "; the body is the fetched document with these fields applied"
				}
			}
			steps = append(steps, a.step(rr, seg, a.writeRequest(rr, seg, st, fields), first, note))
		}
		if first == "" {
			first = PlanAfterPrevious
		}
	}
	return steps
}

// step describes req as the next worker would send it. A request that waits
// for something first (first) has no If-Match yet.
func (a *applier) step(rr *resourceRun, cs []openChange, req request, first, note string) PlannedStep {
	if req.idemKey && req.key == "" {
		req.key = idempotencyKey(a.t.Name, req)
	}
	s := PlannedStep{
		Target: a.t.Name, ResourceID: rr.id, ChangeIDs: changeIDs(cs),
		Method: req.method, URL: req.url, IfMatch: req.ifMatch, IfNoneMatch: req.ifNoneMatch,
		IdempotencyKey: req.key, First: first, Note: note,
	}
	if first != "" {
		// Its If-Match and key come from what happens first.
		s.IfMatch, s.IdempotencyKey = "", ""
	}
	if m, ok := req.body.(map[string]any); ok {
		s.Body = m
	}
	return s
}
