package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

// terminalStates are the end states of a change, in the order reports show
// them (SPEC §3.4).
var terminalStates = []string{"applied", "merged", "noop", "dead", "rejected"}

func cmdStatus(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "status", stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the PG* variables as psql uses them)")
	asJSON := fs.Bool("json", false, "print one JSON document (for scripts) instead of tables")
	watch := fs.Bool("watch", false, "refresh until interrupted, with a progress bar and ETA for the backlog")
	interval := fs.Duration("interval", 2*time.Second, "refresh interval of --watch")
	untilDrained := fs.Bool("until-drained", false, "watch (implies --watch) and exit 0 once work has appeared and nothing is pending or processing")
	waitForWork := fs.Duration("wait-for-work", time.Minute, "with --until-drained: how long to wait for work to appear when there is none, then exit 1; 0 exits 0 at once")
	deadMax := fs.Int("dead", 10, "how many of the latest dead letters to show")
	hotMax := fs.Int("hot", 10, "how many hot resources (most conflicts in the last 24 hours) to show")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		return fmt.Errorf("status: unexpected arguments %q", pos)
	case (*watch || *untilDrained) && *asJSON:
		return fmt.Errorf("status: --watch and --until-drained don't combine with --json; run --json repeatedly instead")
	case *interval < 100*time.Millisecond:
		return fmt.Errorf("status: --interval must be at least 100ms, got %v", *interval)
	case *deadMax < 0 || *deadMax > 1000:
		return fmt.Errorf("status: --dead must be between 0 and 1000, got %d", *deadMax)
	case *hotMax < 0 || *hotMax > 1000:
		return fmt.Errorf("status: --hot must be between 0 and 1000, got %d", *hotMax)
	case *waitForWork < 0:
		return fmt.Errorf("status: --wait-for-work must not be negative, got %v", *waitForWork)
	}
	pool, err := connect(ctx, resolveDatabase(*dbURL, "", getenv), 4)
	if err != nil {
		return err
	}
	defer pool.Close()

	limits := statusLimits{dead: *deadMax, hot: *hotMax}
	// A script that asks to wait until drained means it: one snapshot and
	// exit 0 would let it move on with the backlog still there.
	if *watch || *untilDrained {
		return watchStatus(ctx, pool, watchOpts{
			stdout: stdout, interval: *interval, untilDrained: *untilDrained, waitForWork: *waitForWork, limits: limits, now: time.Now,
		})
	}
	rep, err := readStatus(ctx, pool, time.Now(), limits)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeStatusJSON(stdout, rep)
	}
	return writeStatusText(stdout, rep)
}

// statusLimits bounds the lists of a status report.
type statusLimits struct {
	dead, hot int
}

// readOnlySnapshot runs fn in one REPEATABLE READ, read-only transaction,
// so every query in it sees the same instant: a report's figures add up.
func readOnlySnapshot(ctx context.Context, pool *pgxpool.Pool, fn func(pgx.Tx) error) error {
	return pgx.BeginTxFunc(ctx, pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, fn)
}

// readStatus is collectStatus in a snapshot of its own.
func readStatus(ctx context.Context, pool *pgxpool.Pool, now time.Time, limits statusLimits) (*statusReport, error) {
	var rep *statusReport
	err := readOnlySnapshot(ctx, pool, func(tx pgx.Tx) error {
		var err error
		rep, err = collectStatus(ctx, tx, now, limits)
		return err
	})
	return rep, err
}

func writeStatusJSON(w io.Writer, rep *statusReport) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(rep); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// statusReport is what `stagesync status --json` prints.
type statusReport struct {
	GeneratedAt time.Time      `json:"generated_at"`
	Backlog     []backlogRow   `json:"backlog"`
	Totals      backlogTotals  `json:"totals"`
	Health      []targetHealth `json:"health"`
	Processes   []processRow   `json:"processes"`
	LastHour    []lastHourRow  `json:"last_hour"`
	// ConflictAlerts are the targets' conflict rates over their alert
	// windows, the figures of stagesync_conflict_ratio.
	ConflictAlerts []conflictAlertRow `json:"conflict_alerts"`
	HotResources   []hotResource      `json:"hot_resources"`
	DeadLetters    []deadLetterRow    `json:"dead_letters"`
	// Tables are stagesync's tables (and River's job table), largest
	// first: what retention keeps in check.
	Tables []tableSize `json:"tables"`
}

// tableSize is one table's size on disk (indexes and TOAST included) and
// the planner's row estimate.
type tableSize struct {
	Table string `json:"table"`
	Bytes int64  `json:"bytes"`
	// EstimatedRows is PostgreSQL's estimate; nil (JSON null) before the
	// table was first analysed, so that no script sums a -1.
	EstimatedRows *int64 `json:"estimated_rows"`
}

// targetHealth is one registered target's pause (throttling applies to every
// process) and what each live process serving it sees of the remote.
type targetHealth struct {
	Target string `json:"target"`
	// PausedUntil is set while the target is paused (only a future time).
	PausedUntil *time.Time      `json:"paused_until"`
	PauseReason *string         `json:"pause_reason"`
	Processes   []processHealth `json:"processes"`
}

// processHealth is one target_health row.
type processHealth struct {
	ClientID string `json:"client_id"`
	Hostname string `json:"hostname"`
	PID      int32  `json:"pid"`
	// InflightLimit is the adaptive limit of requests in flight (AIMD),
	// at most Concurrency.
	InflightLimit int32 `json:"inflight_limit"`
	Concurrency   int32 `json:"concurrency"`
	// RateShare is this process's share of the target's rate limit
	// (requests/s); nil when unlimited.
	RateShare           *float64   `json:"rate_share"`
	LastSuccessAt       *time.Time `json:"last_success_at"`
	LastErrorAt         *time.Time `json:"last_error_at"`
	LastError           *string    `json:"last_error"`
	ConsecutiveFailures int32      `json:"consecutive_failures"`
	UpdatedAt           time.Time  `json:"updated_at"`
}

// processRow is one live `stagesync run` process.
type processRow struct {
	ClientID    string    `json:"client_id"`
	Hostname    string    `json:"hostname"`
	PID         int32     `json:"pid"`
	Targets     []string  `json:"targets"`
	StartedAt   time.Time `json:"started_at"`
	HeartbeatAt time.Time `json:"heartbeat_at"`
}

// conflictAlertRow is one target's conflict rate over its alert window
// (alert.window) against its threshold (alert.conflict_rate).
type conflictAlertRow struct {
	Target string `json:"target"`
	// ConflictRate is Conflicts over Requests (0 without requests).
	ConflictRate  float64 `json:"conflict_rate"`
	Threshold     float64 `json:"threshold"`
	WindowSeconds float64 `json:"window_seconds"`
	Requests      int64   `json:"requests"`
	Conflicts     int64   `json:"conflicts"`
	// MinRequests is how many requests the window must hold before the
	// rate counts as above the threshold.
	MinRequests int64 `json:"min_requests"`
	// Above is set when the target is above its alert; Summary says it in
	// words ("conflict rate 7.2% over the last 15m, above the 5% alert").
	Above   bool   `json:"above"`
	Summary string `json:"summary"`
}

func conflictAlertRowOf(a processor.ConflictAlert) conflictAlertRow {
	r := conflictAlertRow{Target: a.Target, ConflictRate: math.Round(a.Ratio()*10000) / 10000, Threshold: a.Threshold,
		WindowSeconds: a.Window.Seconds(), Requests: a.Requests, Conflicts: a.Conflicts,
		MinRequests: processor.ConflictAlertMinRequests, Above: a.Over()}
	r.Summary = fmt.Sprintf("conflict rate %s over the last %s", formatPercent(a.Ratio()), formatWindow(a.Window))
	switch {
	case r.Above:
		r.Summary += fmt.Sprintf(", above the %s alert", formatTickPercent(a.Threshold))
	case a.Requests < processor.ConflictAlertMinRequests:
		r.Summary += fmt.Sprintf("; too few requests (%d of %d) to judge it against the %s alert", a.Requests, processor.ConflictAlertMinRequests, formatTickPercent(a.Threshold))
	default:
		r.Summary += fmt.Sprintf(", under the %s alert", formatTickPercent(a.Threshold))
	}
	return r
}

// formatWindow renders an alert window without zero units: 15m, 1h, 1h30m.
func formatWindow(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// hotResource is one row of stagesync.hot_resources (the last 24 hours).
type hotResource struct {
	Target         string     `json:"target"`
	ResourceID     string     `json:"resource_id"`
	Requests       int64      `json:"requests"`
	Conflicts      int64      `json:"conflicts"`
	ConflictRate   float64    `json:"conflict_rate"`
	Merges         int64      `json:"merges"`
	NeedsReview    int64      `json:"needs_review"`
	LastConflictAt *time.Time `json:"last_conflict_at"`
	// ChangedFields are the fields of the upstream's changes that people
	// had changed on the remote (what the merges had to decide).
	ChangedFields []string `json:"changed_fields"`
}

// hotWindow is the span of the hot-resource report, as in the
// stagesync.hot_resources view.
const hotWindow = 24 * time.Hour

// backlogRow is one target's open work: changes not yet terminal, and the
// River jobs of its queue that will carry them.
type backlogRow struct {
	Target     string `json:"target"`
	Pending    int64  `json:"pending"`
	Processing int64  `json:"processing"`
	// OldestPendingAt is nil when nothing is pending.
	OldestPendingAt      *time.Time `json:"oldest_pending_at"`
	OldestPendingSeconds float64    `json:"oldest_pending_seconds"`
	// JobsAvailable are River jobs of the target's queue ready to run,
	// JobsRunning those being worked, JobsScheduled those waiting for a
	// later time (retries and backoff: River's scheduled, retryable and
	// pending states).
	JobsAvailable int64 `json:"jobs_available"`
	JobsRunning   int64 `json:"jobs_running"`
	JobsScheduled int64 `json:"jobs_scheduled"`
}

type backlogTotals struct {
	Pending    int64 `json:"pending"`
	Processing int64 `json:"processing"`
}

// lastHourRow is one target's traffic over the hour before GeneratedAt.
type lastHourRow struct {
	Target       string           `json:"target"`
	Requests     int64            `json:"requests"`
	Conflicts    int64            `json:"conflicts"`
	ConflictRate float64          `json:"conflict_rate"`
	Finished     map[string]int64 `json:"finished"`
}

type deadLetterRow struct {
	ID         int64      `json:"id"`
	Target     string     `json:"target"`
	ResourceID string     `json:"resource_id"`
	Status     string     `json:"status"`
	Attempts   int32      `json:"attempts"`
	LastError  string     `json:"last_error"`
	FinishedAt *time.Time `json:"finished_at"`
}

// collectStatus reads everything `status` shows, through tx (a snapshot:
// readOnlySnapshot). now is the report's time: the last hour ends there and
// pending ages are measured from it.
func collectStatus(ctx context.Context, tx pgx.Tx, now time.Time, limits statusLimits) (*statusReport, error) {
	q := db.New()
	rep := &statusReport{GeneratedAt: now.UTC(), Backlog: []backlogRow{}, Health: []targetHealth{}, Processes: []processRow{},
		LastHour: []lastHourRow{}, ConflictAlerts: []conflictAlertRow{}, HotResources: []hotResource{}, DeadLetters: []deadLetterRow{}}

	backlog, err := q.StatusBacklog(ctx, tx)
	if err != nil {
		return nil, fmt.Errorf("read backlog: %w", err)
	}
	jobs, err := riverJobs(ctx, tx)
	if err != nil {
		return nil, err
	}
	for _, b := range backlog {
		row := backlogRow{Target: b.Target, Pending: b.Pending, Processing: b.Processing}
		if b.Pending > 0 {
			at := b.OldestPendingAt.UTC()
			row.OldestPendingAt = &at
			row.OldestPendingSeconds = max(0, math.Round(now.Sub(at).Seconds()*1000)/1000)
		}
		j := jobs[processor.QueueName(b.Target)]
		row.JobsAvailable, row.JobsRunning = j["available"], j["running"]
		row.JobsScheduled = j["scheduled"] + j["retryable"] + j["pending"]
		rep.Backlog = append(rep.Backlog, row)
		rep.Totals.Pending += b.Pending
		rep.Totals.Processing += b.Processing
	}

	since := now.Add(-time.Hour)
	hour := map[string]*lastHourRow{}
	get := func(target string) *lastHourRow {
		if r, ok := hour[target]; ok {
			return r
		}
		r := &lastHourRow{Target: target, Finished: map[string]int64{}}
		for _, s := range terminalStates {
			r.Finished[s] = 0
		}
		hour[target] = r
		return r
	}
	for _, b := range backlog {
		get(b.Target)
	}
	attempts, err := q.AttemptsCountSince(ctx, tx, since)
	if err != nil {
		return nil, fmt.Errorf("count requests of the last hour: %w", err)
	}
	for _, a := range attempts {
		r := get(a.Target)
		r.Requests += a.N
		if a.Outcome == "conflict" {
			r.Conflicts += a.N
		}
	}
	finished, err := q.ChangesFinishedSince(ctx, tx, since)
	if err != nil {
		return nil, fmt.Errorf("count changes finished in the last hour: %w", err)
	}
	for _, f := range finished {
		get(f.Target).Finished[f.Status] += f.N
	}
	for _, t := range slices.Sorted(maps.Keys(hour)) {
		r := hour[t]
		if r.Requests > 0 {
			r.ConflictRate = math.Round(float64(r.Conflicts)/float64(r.Requests)*10000) / 10000
		}
		rep.LastHour = append(rep.LastHour, *r)
	}

	alerts, err := processor.ReadConflictAlerts(ctx, tx)
	if err != nil {
		return nil, err
	}
	for _, a := range alerts {
		rep.ConflictAlerts = append(rep.ConflictAlerts, conflictAlertRowOf(a))
	}

	if err := collectHealth(ctx, q, tx, now, rep); err != nil {
		return nil, err
	}
	if limits.hot > 0 {
		hot, err := q.StatusHotResources(ctx, tx, db.StatusHotResourcesParams{Since: now.Add(-hotWindow), MaxRows: int32(limits.hot)})
		if err != nil {
			return nil, fmt.Errorf("read hot resources: %w", err)
		}
		for _, h := range hot {
			row := hotResource{Target: h.Target, ResourceID: h.ResourceID, Requests: h.Requests, Conflicts: h.Conflicts, ConflictRate: h.ConflictRate,
				Merges: h.Merges, NeedsReview: h.NeedsReview, ChangedFields: h.ChangedFields}
			if h.LastConflictAt.After(time.Unix(0, 0)) {
				at := h.LastConflictAt.UTC()
				row.LastConflictAt = &at
			}
			if row.ChangedFields == nil {
				row.ChangedFields = []string{}
			}
			rep.HotResources = append(rep.HotResources, row)
		}
	}

	tables, err := q.StatusTableSizes(ctx, tx)
	if err != nil {
		return nil, fmt.Errorf("read table sizes: %w", err)
	}
	rep.Tables = make([]tableSize, 0, len(tables))
	for _, t := range tables {
		ts := tableSize{Table: t.TableName, Bytes: t.Bytes}
		if t.EstimatedRows >= 0 {
			ts.EstimatedRows = &t.EstimatedRows
		}
		rep.Tables = append(rep.Tables, ts)
	}

	if limits.dead > 0 {
		dead, err := q.DeadLettersLatest(ctx, tx, int32(limits.dead))
		if err != nil {
			return nil, fmt.Errorf("read dead letters: %w", err)
		}
		for _, d := range dead {
			row := deadLetterRow{ID: d.ID, Target: d.Target, ResourceID: d.ResourceID, Status: d.Status, Attempts: d.Attempts, FinishedAt: d.FinishedAt}
			if d.LastError != nil {
				row.LastError = *d.LastError
			}
			if row.FinishedAt != nil {
				t := row.FinishedAt.UTC()
				row.FinishedAt = &t
			}
			rep.DeadLetters = append(rep.DeadLetters, row)
		}
	}
	return rep, nil
}

// collectHealth reads the targets' pauses, their per-process health and the
// live processes.
func collectHealth(ctx context.Context, q *db.Queries, tx pgx.Tx, now time.Time, rep *statusReport) error {
	health, err := q.StatusTargetHealth(ctx, tx)
	if err != nil {
		return fmt.Errorf("read target health: %w", err)
	}
	for _, h := range health {
		if n := len(rep.Health); n == 0 || rep.Health[n-1].Target != h.Target {
			th := targetHealth{Target: h.Target, Processes: []processHealth{}}
			if h.PausedUntil != nil && h.PausedUntil.After(now) {
				th.PausedUntil, th.PauseReason = utcPtr(h.PausedUntil), h.PauseReason
			}
			rep.Health = append(rep.Health, th)
		}
		if h.ClientID == nil {
			continue // no process serves the target
		}
		ph := processHealth{ClientID: *h.ClientID, Hostname: deref(h.Hostname), RateShare: h.RateShare,
			LastSuccessAt: utcPtr(h.LastSuccessAt), LastErrorAt: utcPtr(h.LastErrorAt), LastError: h.LastError}
		if h.Pid != nil {
			ph.PID = *h.Pid
		}
		if h.InflightLimit != nil {
			ph.InflightLimit = *h.InflightLimit
		}
		if h.Concurrency != nil {
			ph.Concurrency = *h.Concurrency
		}
		if h.ConsecutiveFailures != nil {
			ph.ConsecutiveFailures = *h.ConsecutiveFailures
		}
		if h.UpdatedAt != nil {
			ph.UpdatedAt = h.UpdatedAt.UTC()
		}
		th := &rep.Health[len(rep.Health)-1]
		th.Processes = append(th.Processes, ph)
	}
	procs, err := q.StatusProcesses(ctx, tx)
	if err != nil {
		return fmt.Errorf("read processes: %w", err)
	}
	for _, p := range procs {
		rep.Processes = append(rep.Processes, processRow{ClientID: p.ClientID, Hostname: p.Hostname, PID: p.Pid, Targets: p.Targets,
			StartedAt: p.StartedAt.UTC(), HeartbeatAt: p.HeartbeatAt.UTC()})
	}
	return nil
}

// riverJobs counts River's live jobs (not completed, cancelled or
// discarded) per queue and state.
func riverJobs(ctx context.Context, conn db.DBTX) (map[string]map[string]int64, error) {
	rows, err := db.New().RiverQueueDepth(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("count River jobs: %w", err)
	}
	out := map[string]map[string]int64{}
	for _, r := range rows {
		if out[r.Queue] == nil {
			out[r.Queue] = map[string]int64{}
		}
		out[r.Queue][r.State] += r.Jobs
	}
	return out, nil
}

func writeStatusText(w io.Writer, rep *statusReport) error {
	// Fixed-width columns: names left, figures right.
	tw := len("LAST HOUR")
	for _, b := range rep.Backlog {
		tw = max(tw, len(b.Target))
	}
	for _, h := range rep.LastHour {
		tw = max(tw, len(h.Target))
	}
	fmt.Fprintf(w, "%-*s  %9s  %10s  %14s  %12s  %11s  %14s\n", tw, "BACKLOG", "pending", "processing", "oldest pending", "jobs running", "jobs queued", "jobs scheduled")
	for _, b := range rep.Backlog {
		age := "-"
		if b.OldestPendingAt != nil {
			age = formatAge(time.Duration(b.OldestPendingSeconds * float64(time.Second)))
		}
		fmt.Fprintf(w, "%-*s  %9d  %10d  %14s  %12d  %11d  %14d\n", tw, b.Target, b.Pending, b.Processing, age, b.JobsRunning, b.JobsAvailable, b.JobsScheduled)
	}
	fmt.Fprintf(w, "%-*s  %9d  %10d\n\n", tw, "total", rep.Totals.Pending, rep.Totals.Processing)

	if err := writeHealthText(w, rep); err != nil {
		return err
	}

	fmt.Fprintf(w, "%-*s  %9s  %10s  %14s  %8s  %7s  %5s  %5s  %8s\n", tw, "LAST HOUR", "requests", "conflicts", "conflict rate", "applied", "merged", "noop", "dead", "rejected")
	for _, h := range rep.LastHour {
		// From the counts, as the alert section computes it: the stored
		// rate is rounded, and rounding twice can show 14.1% beside 14.2%.
		rate := h.ConflictRate
		if h.Requests > 0 {
			rate = float64(h.Conflicts) / float64(h.Requests)
		}
		fmt.Fprintf(w, "%-*s  %9d  %10d  %14s  %8d  %7d  %5d  %5d  %8d\n", tw, h.Target, h.Requests, h.Conflicts, formatPercent(rate),
			h.Finished["applied"], h.Finished["merged"], h.Finished["noop"], h.Finished["dead"], h.Finished["rejected"])
	}

	if err := writeAlertsText(w, rep); err != nil {
		return err
	}

	fmt.Fprintf(w, "\nIN FLIGHT: %d changes processing", rep.Totals.Processing)
	var running, queued, scheduled int64
	for _, b := range rep.Backlog {
		running += b.JobsRunning
		queued += b.JobsAvailable
		scheduled += b.JobsScheduled
	}
	fmt.Fprintf(w, ", %d jobs running, %d jobs queued, %d jobs scheduled for a retry\n", running, queued, scheduled)

	if err := writeHotText(w, rep); err != nil {
		return err
	}

	if err := writeTablesText(w, rep); err != nil {
		return err
	}

	if len(rep.DeadLetters) == 0 {
		_, err := fmt.Fprintf(w, "\nDEAD LETTERS: none\n")
		return err
	}
	fmt.Fprintf(w, "\nDEAD LETTERS (latest %d; requeue one, once its cause is fixed, with %s requeue and the flags in its row)\n", len(rep.DeadLetters), self)
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tab, "id\ttarget\tresource\tstatus\tattempts\tfinished\trequeue with\tlast error\n")
	for _, d := range rep.DeadLetters {
		fin := "-"
		if d.FinishedAt != nil {
			fin = d.FinishedAt.Format(time.DateTime)
		}
		fmt.Fprintf(tab, "%d\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", d.ID, d.Target, oneLine(d.ResourceID, 40), d.Status, d.Attempts, fin,
			RequeueFlags([]int64{d.ID}, d.Status == "rejected"), oneLine(d.LastError, 120))
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	_, err := fmt.Fprintf(w, "what happened to one: %s history --change ID\n", self)
	return err
}

// staleHealth is how old a target_health row may be before status calls it
// stale: processes rewrite theirs every few seconds.
const staleHealth = time.Minute

// writeHealthText prints each target's health, one line per process that
// serves it, and the live processes.
func writeHealthText(w io.Writer, rep *statusReport) error {
	now := rep.GeneratedAt
	ago := func(t *time.Time) string {
		if t == nil {
			return "never"
		}
		return formatAge(max(0, now.Sub(*t))) + " ago"
	}
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tab, "HEALTH\tstate\tprocess\tin-flight limit\tlast success\tfailures\tlast error\n")
	for _, h := range rep.Health {
		pause := ""
		if h.PausedUntil != nil {
			pause = fmt.Sprintf("PAUSED %s (until %s)", formatAge(h.PausedUntil.Sub(now)), h.PausedUntil.Format(time.TimeOnly))
			if h.PauseReason != nil && *h.PauseReason != "" {
				pause += ": " + oneLine(*h.PauseReason, 80)
			}
		}
		if len(h.Processes) == 0 {
			state := "no live process serves it"
			if pause != "" {
				state = pause + "; " + state
			}
			fmt.Fprintf(tab, "%s\t%s\t-\t-\t-\t-\t-\n", h.Target, state)
			continue
		}
		for _, p := range h.Processes {
			state := "ok"
			switch {
			case pause != "":
				state = pause
			case p.ConsecutiveFailures > 0:
				state = "FAILING"
			}
			if now.Sub(p.UpdatedAt) > staleHealth {
				state += " (stale: updated " + ago(&p.UpdatedAt) + ")"
			}
			lastErr := "-"
			if p.LastErrorAt != nil {
				lastErr = ago(p.LastErrorAt) + ": " + oneLine(deref(p.LastError), 100)
			}
			fmt.Fprintf(tab, "%s\t%s\t%s\t%d/%d\t%s\t%d\t%s\n", h.Target, state, processName(p.Hostname, p.PID),
				p.InflightLimit, p.Concurrency, ago(p.LastSuccessAt), p.ConsecutiveFailures, lastErr)
		}
	}
	if len(rep.Health) == 0 {
		fmt.Fprintf(tab, "(no targets registered)\n")
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}

	if len(rep.Processes) == 0 {
		_, err := fmt.Fprintf(w, "\nPROCESSES: none running (nothing is being applied)\n\n")
		return err
	}
	fmt.Fprintf(w, "\nPROCESSES (%d live)\n", len(rep.Processes))
	tab = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tab, "process\tclient id\ttargets\tstarted\theartbeat\n")
	for _, p := range rep.Processes {
		fmt.Fprintf(tab, "%s\t%s\t%s\t%s\t%s\n", processName(p.Hostname, p.PID), oneLine(p.ClientID, 60),
			oneLine(strings.Join(p.Targets, ","), 60), p.StartedAt.Format(time.DateTime), ago(&p.HeartbeatAt))
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	_, err := fmt.Fprintln(w)
	return err
}

// writeAlertsText prints each target's conflict rate over its alert window,
// marking the targets above their alert.
func writeAlertsText(w io.Writer, rep *statusReport) error {
	if len(rep.ConflictAlerts) == 0 {
		return nil
	}
	fmt.Fprintf(w, "\nCONFLICT ALERT (conflict rate over each target's alert.window; judged with at least %d requests)\n", processor.ConflictAlertMinRequests)
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, a := range rep.ConflictAlerts {
		state := "ok"
		if a.Above {
			state = "ABOVE"
		}
		fmt.Fprintf(tab, "%s\t%s\t%s (%d conflicts in %d requests)\n", a.Target, state, a.Summary, a.Conflicts, a.Requests)
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

func processName(host string, pid int32) string {
	return fmt.Sprintf("%s pid %d", oneLine(host, 60), pid)
}

func writeHotText(w io.Writer, rep *statusReport) error {
	if len(rep.HotResources) == 0 {
		_, err := fmt.Fprintf(w, "\nHOT RESOURCES (last 24 hours): none had a conflict\n")
		return err
	}
	fmt.Fprintf(w, "\nHOT RESOURCES (most conflicts in the last 24 hours; all: SELECT * FROM stagesync.hot_resources)\n")
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tab, "target\tresource\tconflicts\trequests\tconflict rate\tmerges\tneeds review\tlast conflict\tfields people changed\n")
	for _, h := range rep.HotResources {
		last := "-"
		if h.LastConflictAt != nil {
			last = formatAge(max(0, rep.GeneratedAt.Sub(*h.LastConflictAt))) + " ago"
		}
		fields := strings.Join(h.ChangedFields, ", ")
		if fields == "" {
			fields = "-"
		}
		fmt.Fprintf(tab, "%s\t%s\t%d\t%d\t%s\t%d\t%d\t%s\t%s\n", h.Target, oneLine(h.ResourceID, 40), h.Conflicts, h.Requests,
			formatPercent(h.ConflictRate), h.Merges, h.NeedsReview, last, oneLine(fields, 80))
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

type watchOpts struct {
	stdout       io.Writer
	interval     time.Duration
	untilDrained bool
	// waitForWork is how long --until-drained waits for work to appear.
	waitForWork time.Duration
	limits      statusLimits
	now         func() time.Time
}

// watchStatus refreshes the status until ctx ends (or, with untilDrained,
// until work has appeared and the backlog is empty). Progress counts the
// changes finished since the watch began against those still open, all read
// in one snapshot per refresh (see WatchBaseline), so done + open never
// shrinks and never exceeds what was staged. On a terminal the screen is
// redrawn; otherwise one progress line is printed per refresh, which reads
// well in logs and CI.
func watchStatus(ctx context.Context, pool *pgxpool.Pool, o watchOpts) error {
	tty := isTerminal(o.stdout)
	start := o.now()
	meter := rateMeter{window: 30 * time.Second}
	q := db.New()
	var base db.WatchBaselineRow
	var baseDone int64
	started := false
	ticker := time.NewTicker(o.interval)
	defer ticker.Stop()
	for {
		now := o.now()
		var rep *statusReport
		var finished int64
		err := readOnlySnapshot(ctx, pool, func(tx pgx.Tx) error {
			b, bDone := base, baseDone
			if !started {
				var err error
				if b, err = q.WatchBaseline(ctx, tx); err != nil {
					return fmt.Errorf("read where the watch starts: %w", err)
				}
				if bDone, err = q.WatchFinishedCount(ctx, tx, db.WatchFinishedCountParams(b)); err != nil {
					return fmt.Errorf("count finished changes: %w", err)
				}
			}
			var err error
			if rep, err = collectStatus(ctx, tx, now, o.limits); err != nil {
				return err
			}
			if finished, err = q.WatchFinishedCount(ctx, tx, db.WatchFinishedCountParams(b)); err != nil {
				return fmt.Errorf("count finished changes: %w", err)
			}
			base, baseDone, started = b, bDone, true
			return nil
		})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		done := finished - baseDone
		open := rep.Totals.Pending + rep.Totals.Processing
		meter.add(now, done)
		line := progressLine(done, done+open, meter.rate(), 40)
		waiting := o.untilDrained && done+open == 0
		if waiting && o.waitForWork > 0 {
			line = fmt.Sprintf("no work yet: waiting up to %v for changes to be staged (--wait-for-work)", o.waitForWork)
		}
		if tty {
			// Home, clear screen, then the whole status and the bar.
			fmt.Fprint(o.stdout, "\x1b[H\x1b[2J")
			fmt.Fprintf(o.stdout, "stagesync status  %s  (every %v, Ctrl-C to stop)\n\n", now.UTC().Format(time.DateTime), o.interval)
			if err := writeStatusText(o.stdout, rep); err != nil {
				return err
			}
			fmt.Fprintf(o.stdout, "\nsince %s: %s\n", start.UTC().Format(time.TimeOnly), line)
		} else if _, err := fmt.Fprintf(o.stdout, "%s  %s\n", now.UTC().Format(time.TimeOnly), line); err != nil {
			return fmt.Errorf("write progress: %w", err)
		}
		if o.untilDrained && open == 0 {
			switch {
			case !waiting:
				return nil
			case o.waitForWork == 0:
				return nil // asked not to wait: nothing is open, so it is drained
			case now.Sub(start) >= o.waitForWork:
				return fmt.Errorf("status: no work appeared within %v (--wait-for-work); nothing was drained", o.waitForWork)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
	}
}

// rateMeter estimates a rate of progress from (time, done) samples over a
// sliding window.
type rateMeter struct {
	window  time.Duration
	samples []rateSample
}

type rateSample struct {
	at   time.Time
	done int64
}

func (m *rateMeter) add(at time.Time, done int64) {
	m.samples = append(m.samples, rateSample{at, done})
	cut := 0
	for cut < len(m.samples)-2 && at.Sub(m.samples[cut+1].at) >= m.window {
		cut++
	}
	m.samples = m.samples[cut:]
}

// rate is done per second over the window; 0 until two samples exist.
func (m *rateMeter) rate() float64 {
	if len(m.samples) < 2 {
		return 0
	}
	first, last := m.samples[0], m.samples[len(m.samples)-1]
	d := last.at.Sub(first.at).Seconds()
	if d <= 0 {
		return 0
	}
	return float64(last.done-first.done) / d
}

// progressLine renders "[#####-----]  312/500   62%  180/s  ETA 1s".
func progressLine(done, total int64, rate float64, width int) string {
	line := progressBarText(done, total, width) + "  " + formatRate(rate) + "/s"
	switch remaining := total - done; {
	case remaining <= 0:
		return line + "  drained"
	case rate > 0:
		return line + "  ETA " + formatAge(time.Duration(float64(remaining)/rate*float64(time.Second)))
	default:
		return line + "  ETA -"
	}
}

// progressBarText renders "[#####-----]  312/500   62%".
func progressBarText(done, total int64, width int) string {
	frac := 1.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	frac = min(max(frac, 0), 1)
	fill := int(math.Round(frac * float64(width)))
	return fmt.Sprintf("[%s%s]  %d/%d  %3.0f%%", strings.Repeat("#", fill), strings.Repeat("-", width-fill), done, total, frac*100)
}

// progressBar draws progress on w: redrawn in place with \r on a terminal,
// else a line at most every `every`, so logs stay short.
type progressBar struct {
	w       io.Writer
	tty     bool
	every   time.Duration
	last    time.Time
	lastLen int
	meter   rateMeter
}

func newProgressBar(w io.Writer, every time.Duration) *progressBar {
	return &progressBar{w: w, tty: isTerminal(w), every: every, meter: rateMeter{window: 5 * time.Second}}
}

// update records progress and draws it if due.
func (p *progressBar) update(now time.Time, done, total int64) {
	p.meter.add(now, done)
	if !p.tty && now.Sub(p.last) < p.every {
		return
	}
	p.last = now
	p.draw(progressLine(done, total, p.meter.rate(), 40))
}

// finish draws the final state with a suffix and ends the line.
func (p *progressBar) finish(done, total int64, suffix string) {
	p.draw(progressBarText(done, total, 40) + "  " + suffix)
	if p.tty {
		fmt.Fprintln(p.w)
	}
}

// end closes a redrawn line with a note, so what follows starts on a new
// line.
func (p *progressBar) end(note string) {
	if p.tty {
		fmt.Fprintf(p.w, "  %s\n", note)
	}
}

func (p *progressBar) draw(line string) {
	if !p.tty {
		fmt.Fprintln(p.w, line)
		return
	}
	pad := max(0, p.lastLen-len(line))
	fmt.Fprintf(p.w, "\r%s%s", line, strings.Repeat(" ", pad))
	p.lastLen = len(line)
}

// isTerminal reports whether w is a character device (an interactive
// terminal) rather than a file, pipe or buffer.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func formatRate(r float64) string {
	switch {
	case r <= 0:
		return "0"
	case r < 10:
		return fmt.Sprintf("%.1f", r)
	default:
		return fmt.Sprintf("%.0f", r)
	}
}

func formatPercent(f float64) string {
	return fmt.Sprintf("%.1f%%", f*100)
}

// formatAge renders a duration for people: 850ms, 42s, 3m12s, 5h03m, 2d04h.
func formatAge(d time.Duration) string {
	switch {
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	default:
		return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
	}
}

// oneLine flattens s to one line of at most n runes, for tables. s may be a
// remote's error text, so besides folding whitespace it drops control
// characters (an ESC would start a terminal escape sequence) and bidi
// controls (which reorder what the terminal shows).
func oneLine(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsSpace(r) {
			return ' ' // folded below
		}
		if unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) {
			return -1
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}

// writeTablesText prints the tables' sizes, largest first.
func writeTablesText(w io.Writer, rep *statusReport) error {
	if len(rep.Tables) == 0 {
		return nil
	}
	fmt.Fprintf(w, "\nTABLES (size with indexes; rows as estimated by PostgreSQL; kept in check by retention)\n")
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tab, "table\tsize\trows\t\n")
	for _, t := range rep.Tables {
		fmt.Fprintf(tab, "%s\t%s\t%s\t\n", t.Table, formatBytes(t.Bytes), formatRows(t.EstimatedRows))
	}
	if err := tab.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// formatBytes prints a size in the largest unit that keeps it at or above
// one: 512 B, 1.5 MiB, 12 GiB.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, exp := float64(n)/unit, 0
	for v >= unit && exp < 4 {
		v /= unit
		exp++
	}
	if v < 10 {
		return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[exp])
	}
	return fmt.Sprintf("%.0f %ciB", v, "KMGTP"[exp])
}

// formatRows prints a row estimate, "-" when PostgreSQL has none yet.
func formatRows(n *int64) string {
	if n == nil {
		return "-"
	}
	return strconv.FormatInt(*n, 10)
}
