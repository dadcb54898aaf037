package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/stagesync/stagesync/db"
)

func cmdHistory(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "history", stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the PG* variables as psql uses them)")
	changeID := fs.Int64("change", 0, "the change id to show")
	target := fs.String("target", "", "with --resource: the resource's target (needed only when several targets know the id)")
	resourceID := fs.String("resource", "", "the resource id to show, with every change staged for it")
	asJSON := fs.Bool("json", false, "print one JSON document: the change rows, the resource's stored state and the raw events")
	limit := fs.Int("limit", 500, "show at most the latest N events (0: all)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	hq := historyQuery{changeID: *changeID, target: *target, resourceID: *resourceID}
	switch {
	case len(pos) > 0:
		return fmt.Errorf("history: unexpected arguments %q", pos)
	case *limit < 0:
		return fmt.Errorf("history: --limit must not be negative, got %d", *limit)
	}
	if err := hq.validate(); err != nil {
		return fmt.Errorf("history: %w", err)
	}
	pool, err := connect(ctx, resolveDatabase(*dbURL, "", getenv), 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	rep, err := loadHistory(ctx, pool, hq, *limit)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return fmt.Errorf("write history: %w", err)
		}
		return nil
	}
	return writeHistoryText(stdout, rep)
}

// historyQuery names one change, or one resource (the target may be left
// for the database to find).
type historyQuery struct {
	changeID           int64
	target, resourceID string
}

func (h historyQuery) validate() error {
	switch {
	case h.changeID < 0:
		return fmt.Errorf("--change must be a positive change id, got %d", h.changeID)
	case h.changeID > 0 && (h.resourceID != "" || h.target != ""):
		return errors.New("give --change, or --resource (with --target), not both")
	case h.changeID == 0 && h.resourceID == "":
		return errors.New("give --change N, or --resource ID (with --target T when several targets know the id)")
	}
	return nil
}

// errNotFound is a lookup that found nothing; the page answers 404.
var errNotFound = errors.New("not found")

// ambiguousResourceError is a resource id several targets know, looked up
// without a target.
type ambiguousResourceError struct {
	resourceID string
	targets    []string
}

func (e *ambiguousResourceError) Error() string {
	return fmt.Sprintf("resource %q is known to the targets %s: give --target", e.resourceID, strings.Join(e.targets, ", "))
}

// historyReport is what `history --json` prints and the history page shows.
type historyReport struct {
	// Target and ResourceID name the resource the history is about (for a
	// change: the change's resource).
	Target     string `json:"target"`
	ResourceID string `json:"resource_id"`
	// ChangeID is the change asked for; 0 for a resource's history.
	ChangeID int64 `json:"change_id,omitempty"`
	// Changes are the staged rows the events concern, oldest first.
	Changes []historyChange `json:"changes"`
	// Resource is what stagesync stores of the resource now; nil if nothing.
	Resource *historyResource `json:"resource"`
	// Events are the rows of change_history / resource_history, the latest
	// Limit of them; Omitted says how many earlier ones were left out.
	Events  []historyEvent `json:"events"`
	Omitted int            `json:"omitted_events"`
	// TotalChanges counts the changes staged for the resource (or the one
	// change), also those whose events --limit left out.
	TotalChanges int `json:"total_changes"`
}

type historyChange struct {
	ID             int64           `json:"id"`
	Op             string          `json:"op"`
	Fields         json.RawMessage `json:"fields"`
	Source         string          `json:"source"`
	IdempotencyKey *string         `json:"idempotency_key"`
	Status         string          `json:"status"`
	Attempts       int32           `json:"attempts"`
	LastError      *string         `json:"last_error"`
	OutcomeDetail  *string         `json:"outcome_detail"`
	AppliedETag    *string         `json:"applied_etag"`
	CreatedAt      time.Time       `json:"created_at"`
	FinishedAt     *time.Time      `json:"finished_at"`
}

type historyResource struct {
	ETag         *string         `json:"etag"`
	Snapshot     json.RawMessage `json:"snapshot"`
	Deleted      bool            `json:"deleted"`
	FetchedAt    *time.Time      `json:"fetched_at"`
	LastChangeID *int64          `json:"last_change_id"`
	// InDoubt is a write that may have reached the remote without its
	// answer being recorded; the next worker resolves it first.
	InDoubt json.RawMessage `json:"in_doubt"`
}

// historyEvent is one row of change_history or resource_history.
type historyEvent struct {
	At         time.Time       `json:"at"`
	Event      string          `json:"event"`
	ChangeIDs  []int64         `json:"change_ids"`
	Method     string          `json:"method,omitempty"`
	URL        string          `json:"url,omitempty"`
	StatusCode int32           `json:"status_code,omitempty"`
	Outcome    string          `json:"outcome,omitempty"`
	Detail     json.RawMessage `json:"detail"`
}

// loadHistory reads one change's or one resource's history in one
// read-only snapshot, keeping the latest limit events (0: all).
func loadHistory(ctx context.Context, conn interface {
	BeginTx(context.Context, pgx.TxOptions) (pgx.Tx, error)
}, hq historyQuery, limit int) (*historyReport, error) {
	rep := &historyReport{Changes: []historyChange{}, Events: []historyEvent{}}
	err := pgx.BeginTxFunc(ctx, conn, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		q := db.New()
		if hq.changeID > 0 {
			rows, err := q.HistoryChangesGet(ctx, tx, []int64{hq.changeID})
			if err != nil {
				return fmt.Errorf("read change %d: %w", hq.changeID, err)
			}
			if len(rows) == 0 {
				return fmt.Errorf("change %d: %w (it never existed, or retention removed it)", hq.changeID, errNotFound)
			}
			rep.ChangeID, rep.Target, rep.ResourceID = hq.changeID, rows[0].Target, rows[0].ResourceID
			evs, err := q.HistoryChangeEvents(ctx, tx, hq.changeID)
			if err != nil {
				return fmt.Errorf("read the history of change %d: %w", hq.changeID, err)
			}
			for _, e := range evs {
				ids := []int64{hq.changeID}
				if e.Event == "attempt" || e.Event == "merge" {
					ids = changeIDsOf(e.Detail, ids)
				}
				rep.Events = append(rep.Events, historyEvent{At: e.At, Event: e.Event, ChangeIDs: ids, Method: e.Method, URL: e.URL, StatusCode: e.StatusCode, Outcome: e.Outcome, Detail: e.Detail})
			}
		} else {
			rep.Target, rep.ResourceID = hq.target, hq.resourceID
			if rep.Target == "" {
				targets, err := q.HistoryResourceTargets(ctx, tx, hq.resourceID)
				if err != nil {
					return fmt.Errorf("find the targets of resource %q: %w", hq.resourceID, err)
				}
				switch len(targets) {
				case 0:
					return fmt.Errorf("resource %q: %w: no target has a stored state, a request or a change for it", hq.resourceID, errNotFound)
				case 1:
					rep.Target = targets[0]
				default:
					return &ambiguousResourceError{resourceID: hq.resourceID, targets: targets}
				}
			}
			evs, err := q.HistoryResourceEvents(ctx, tx, db.HistoryResourceEventsParams{Target: rep.Target, ResourceID: rep.ResourceID})
			if err != nil {
				return fmt.Errorf("read the history of resource %q of target %q: %w", rep.ResourceID, rep.Target, err)
			}
			for _, e := range evs {
				rep.Events = append(rep.Events, historyEvent{At: e.At, Event: e.Event, ChangeIDs: e.ChangeIDs, Method: e.Method, URL: e.URL, StatusCode: e.StatusCode, Outcome: e.Outcome, Detail: e.Detail})
			}
		}
		for _, e := range rep.Events {
			if e.Event == "staged" {
				rep.TotalChanges++
			}
		}
		if limit > 0 && len(rep.Events) > limit {
			rep.Omitted = len(rep.Events) - limit
			rep.Events = rep.Events[rep.Omitted:]
		}

		res, err := q.HistoryResourceGet(ctx, tx, db.HistoryResourceGetParams{Target: rep.Target, ResourceID: rep.ResourceID})
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			return fmt.Errorf("read resource %q of target %q: %w", rep.ResourceID, rep.Target, err)
		default:
			rep.Resource = &historyResource{ETag: res.ETag, Snapshot: res.Snapshot, Deleted: res.Deleted, FetchedAt: res.FetchedAt, LastChangeID: res.LastChangeID, InDoubt: res.InDoubt}
		}
		if rep.ChangeID == 0 && len(rep.Events) == 0 && rep.Resource == nil {
			return fmt.Errorf("resource %q of target %q: %w", rep.ResourceID, rep.Target, errNotFound)
		}

		// The change rows the (kept) events name: for a change its own,
		// for a resource those staged for it.
		idSet := map[int64]bool{}
		if rep.ChangeID > 0 {
			idSet[rep.ChangeID] = true
		}
		for _, e := range rep.Events {
			if e.Event == "staged" || e.Event == "finished" {
				for _, id := range e.ChangeIDs {
					idSet[id] = true
				}
			}
		}
		rows, err := q.HistoryChangesGet(ctx, tx, slices.Sorted(maps.Keys(idSet)))
		if err != nil {
			return fmt.Errorf("read changes: %w", err)
		}
		for _, c := range rows {
			rep.Changes = append(rep.Changes, historyChange{
				ID: c.ID, Op: c.Op, Fields: c.Fields, Source: c.Source, IdempotencyKey: c.IdempotencyKey, Status: c.Status,
				Attempts: c.Attempts, LastError: c.LastError, OutcomeDetail: c.OutcomeDetail, AppliedETag: c.AppliedETag,
				CreatedAt: c.CreatedAt.UTC(), FinishedAt: utcPtr(c.FinishedAt),
			})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i := range rep.Events {
		rep.Events[i].At = rep.Events[i].At.UTC()
	}
	if rep.Resource != nil {
		rep.Resource.FetchedAt = utcPtr(rep.Resource.FetchedAt)
	}
	return rep, nil
}

func changeIDsOf(detail []byte, fallback []int64) []int64 {
	var d struct {
		ChangeIDs []int64 `json:"change_ids"`
	}
	if json.Unmarshal(detail, &d) == nil && len(d.ChangeIDs) > 0 {
		return d.ChangeIDs
	}
	return fallback
}

func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

// timelineEntry is one event prepared for people: the text timeline and
// the history page both render these.
type timelineEntry struct {
	At        time.Time
	Event     string // staged, request, merge, finished
	ChangeIDs []int64
	// Summary is the event in one line of plain text (untrusted parts
	// included: the page escapes it, the terminal version drops control
	// characters).
	Summary string
	// Error is the request's error text or a change's last error.
	Error string
	// Decisions are a merge's per-field decisions.
	Decisions []fieldDecision
	// Outcome classifies the event for styling: ok, conflict, failed or "".
	Outcome string
}

type fieldDecision struct {
	Field, Decision, Detail string
}

// timeline turns the events into entries.
func timeline(rep *historyReport) []timelineEntry {
	out := make([]timelineEntry, 0, len(rep.Events))
	for _, e := range rep.Events {
		te := timelineEntry{At: e.At, Event: e.Event, ChangeIDs: e.ChangeIDs}
		var d map[string]json.RawMessage
		_ = json.Unmarshal(e.Detail, &d) // a detail that isn't an object shows as empty
		str := func(k string) string {
			var s string
			if json.Unmarshal(d[k], &s) != nil {
				return ""
			}
			return s
		}
		switch e.Event {
		case "staged":
			te.Summary = fmt.Sprintf("%s %s", str("op"), compactJSON(d["fields"]))
			if s := str("source"); s != "" {
				te.Summary += " by " + s
			}
			if k := str("idempotency_key"); k != "" {
				te.Summary += " (idempotency key " + k + ")"
			}
		case "attempt":
			te.Event = "request"
			var b strings.Builder
			b.WriteString(e.Method + " " + e.URL)
			if m := str("if_match"); m != "" {
				b.WriteString(" · If-Match " + m)
			}
			if e.StatusCode > 0 {
				fmt.Fprintf(&b, " · → %d", e.StatusCode)
			} else {
				b.WriteString(" · → no answer")
			}
			if t := str("response_etag"); t != "" {
				b.WriteString(" · ETag " + t)
			}
			var ms float64
			if json.Unmarshal(d["duration_ms"], &ms) == nil {
				b.WriteString(" · " + formatMillis(ms))
			}
			b.WriteString(" · " + e.Outcome)
			te.Summary = b.String()
			te.Error = str("error")
			te.Outcome = requestClass(e.Outcome)
		case "merge":
			te.Summary = "merge: " + e.Outcome
			te.Decisions = mergeDecisions(d)
			te.Outcome = map[string]string{"merged": "ok", "noop": "ok", "needs_review": "failed"}[e.Outcome]
		case "finished":
			te.Summary = e.Outcome
			var attempts int
			if json.Unmarshal(d["attempts"], &attempts) == nil && attempts > 0 {
				te.Summary += fmt.Sprintf(" after %d attempt(s)", attempts)
			}
			if t := str("applied_etag"); t != "" {
				te.Summary += ", ETag " + t
			}
			if od := str("outcome_detail"); od != "" {
				te.Summary += ": " + od
			}
			te.Error = str("last_error")
			te.Outcome = map[string]string{"applied": "ok", "merged": "ok", "noop": "ok", "dead": "failed", "rejected": "failed"}[e.Outcome]
		default:
			te.Summary = e.Outcome
		}
		out = append(out, te)
	}
	return out
}

// mergeDecisions lists a merge's fields in name order with the values that
// decided them: ours for took_ours, theirs (and ours) otherwise.
func mergeDecisions(d map[string]json.RawMessage) []fieldDecision {
	var decisions map[string]string
	if json.Unmarshal(d["decisions"], &decisions) != nil {
		return nil
	}
	var ours, theirs, base map[string]json.RawMessage
	_ = json.Unmarshal(d["ours"], &ours)
	_ = json.Unmarshal(d["theirs"], &theirs)
	_ = json.Unmarshal(d["base"], &base)
	val := func(m map[string]json.RawMessage, f string) string {
		if v, ok := m[f]; ok {
			return compactJSON(v)
		}
		return "(absent)"
	}
	var out []fieldDecision
	for _, f := range slices.Sorted(maps.Keys(decisions)) {
		fd := fieldDecision{Field: f, Decision: decisions[f]}
		switch decisions[f] {
		case "took_ours":
			fd.Detail = "wrote " + val(ours, f)
			if base != nil && val(base, f) != val(theirs, f) {
				fd.Detail += " over the remote's " + val(theirs, f)
			}
		case "kept_theirs":
			fd.Detail = "kept the remote's " + val(theirs, f) + ", dropped upstream " + val(ours, f)
		case "needs_review":
			fd.Detail = "the remote has " + val(theirs, f) + ", upstream wants " + val(ours, f)
		case "already_equal":
			fd.Detail = "the remote already had " + val(theirs, f)
		}
		out = append(out, fd)
	}
	return out
}

func requestClass(outcome string) string {
	switch outcome {
	case "applied", "fetched", "not_modified":
		return "ok"
	case "conflict":
		return "conflict"
	default:
		return "failed"
	}
}

func compactJSON(raw json.RawMessage) string {
	if len(raw) == 0 {
		return "null"
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return string(raw)
	}
	// Shown to a person as staged: "a & b < c", not "a \u0026 b \u003c c".
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if enc.Encode(v) != nil {
		return string(raw)
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func formatMillis(ms float64) string {
	if ms < 10 {
		return strconv.FormatFloat(ms, 'f', 1, 64) + "ms"
	}
	return strconv.FormatFloat(ms, 'f', 0, 64) + "ms"
}

func writeHistoryText(w io.Writer, rep *historyReport) error {
	var b strings.Builder
	res := oneLine(rep.Target+"/"+rep.ResourceID, 200)
	if rep.ChangeID > 0 {
		fmt.Fprintf(&b, "CHANGE #%d of %s\n", rep.ChangeID, res)
	} else {
		if len(rep.Changes) < rep.TotalChanges {
			fmt.Fprintf(&b, "RESOURCE %s: %d change(s), %d of them in the events shown\n", res, rep.TotalChanges, len(rep.Changes))
		} else {
			fmt.Fprintf(&b, "RESOURCE %s: %d change(s)\n", res, len(rep.Changes))
		}
	}
	for _, c := range rep.Changes {
		state := c.Status
		if c.FinishedAt != nil {
			state += " at " + c.FinishedAt.Format("2006-01-02 15:04:05.000")
		}
		fmt.Fprintf(&b, "  #%-6d %-7s %s  staged %s by %s; %s after %d attempt(s)\n", c.ID, c.Op, oneLine(compactJSON(c.Fields), 120),
			c.CreatedAt.Format("2006-01-02 15:04:05.000"), oneLine(c.Source, 40), state, c.Attempts)
		if c.OutcomeDetail != nil && *c.OutcomeDetail != "" {
			fmt.Fprintf(&b, "          why: %s\n", oneLine(*c.OutcomeDetail, 300))
		}
		if c.LastError != nil && *c.LastError != "" {
			fmt.Fprintf(&b, "          last error: %s\n", oneLine(*c.LastError, 300))
		}
	}
	if r := rep.Resource; r != nil {
		fmt.Fprintf(&b, "  stored: ETag %s", oneLine(derefOr(r.ETag, "(none)"), 100))
		if r.FetchedAt != nil {
			fmt.Fprintf(&b, ", fetched %s", r.FetchedAt.Format("2006-01-02 15:04:05.000"))
		}
		if r.Deleted {
			b.WriteString(", deleted on the remote")
		}
		if r.LastChangeID != nil {
			fmt.Fprintf(&b, ", last change #%d", *r.LastChangeID)
		}
		b.WriteString("\n")
		if len(r.InDoubt) > 0 && string(r.InDoubt) != "null" {
			fmt.Fprintf(&b, "  IN DOUBT: a write may have reached the remote unrecorded: %s\n", oneLine(compactJSON(r.InDoubt), 300))
		}
	}
	if rep.ChangeID > 0 {
		fmt.Fprintf(&b, "  (every change of this resource: %s history --target %s --resource %s)\n", self, shellQuote(rep.Target), shellQuote(oneLine(rep.ResourceID, 200)))
	}

	fmt.Fprintf(&b, "\nTIMELINE (UTC)")
	if rep.Omitted > 0 {
		fmt.Fprintf(&b, ": the latest %d events; %d earlier ones left out (--limit 0 shows all)", len(rep.Events), rep.Omitted)
	}
	b.WriteString("\n")
	day := ""
	for _, e := range timeline(rep) {
		if d := e.At.Format(time.DateOnly); d != day {
			day = d
			fmt.Fprintf(&b, "%s\n", d)
		}
		ids := ""
		if rep.ChangeID == 0 || len(e.ChangeIDs) > 1 {
			ids = formatIDs(e.ChangeIDs) + "  "
		}
		fmt.Fprintf(&b, "  %s  %-8s  %s%s\n", e.At.Format("15:04:05.000"), e.Event, ids, oneLine(e.Summary, 400))
		for _, d := range e.Decisions {
			fmt.Fprintf(&b, "                          %-14s %-13s %s\n", oneLine(d.Field, 60), d.Decision, oneLine(d.Detail, 300))
		}
		if e.Error != "" {
			fmt.Fprintf(&b, "                          error: %s\n", oneLine(e.Error, 300))
		}
	}
	if len(rep.Events) == 0 {
		b.WriteString("  (no events)\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func formatIDs(ids []int64) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = "#" + strconv.FormatInt(id, 10)
	}
	return strings.Join(s, ",")
}

func derefOr(s *string, or string) string {
	if s == nil || *s == "" {
		return or
	}
	return *s
}
