package processor

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/stagesync/stagesync/db"
)

// The monitor watches each target from the database, the same way in every
// process: every MonitorEvery (10s) it reads each target's conflict rate
// over its alert window into stagesync_conflict_ratio and logs when a
// target crosses its alert threshold; every ProgressEvery (30s) it logs a
// progress line per target while there is work. The figures come from the
// shared tables, not from this process's own requests, so every process
// reports the same values; only one process per target logs (see
// MonitorLoggers in queries/monitor.sql), so several processes do not
// repeat each line.

// ConflictAlertMinRequests is how many requests a target must have made in
// its alert window before its conflict rate can count as above the
// threshold: one conflict in two requests is 50%, and not a reason to wake
// anyone.
const ConflictAlertMinRequests = 20

// conflictRecoverShare is how far under its threshold a target's conflict
// rate must fall before the alert counts as over: 80% of it (4% for a 5%
// alert). The margin keeps a rate hovering at the threshold from logging a
// WARN and an INFO on every check. `status` and the page show the rate
// against the threshold itself.
const conflictRecoverShare = 0.8

// Monitor timing defaults.
const (
	monitorEvery  = 10 * time.Second
	progressEvery = 30 * time.Second
	// progressSettle is how far behind now a progress line's interval
	// ends, so changes and requests being recorded at that moment have
	// committed when the line counts them (see MonitorProgress).
	progressSettle = 5 * time.Second
	// hotInWarn is how many of the hottest resources the WARN line names.
	hotInWarn = 3
)

// ConflictAlert is one target's conflict rate over its alert window, as the
// monitor, `stagesync status` and the status page see it.
type ConflictAlert struct {
	Target string
	// Threshold is the target's alert.conflict_rate, as registered.
	Threshold float64
	// Window is the target's alert.window, as registered.
	Window time.Duration
	// Requests are the HTTP requests made to the target in the window
	// (every attempts row, whatever its outcome); Conflicts those answered
	// with a conflict status (409/412).
	Requests, Conflicts int64
}

// Ratio is Conflicts over Requests, 0 without requests.
func (a ConflictAlert) Ratio() float64 {
	if a.Requests == 0 {
		return 0
	}
	return float64(a.Conflicts) / float64(a.Requests)
}

// Over reports whether the target is above its alert: more than Threshold
// of at least ConflictAlertMinRequests requests were conflicts.
func (a ConflictAlert) Over() bool {
	return a.Requests >= ConflictAlertMinRequests && a.Ratio() > a.Threshold
}

// recovered reports whether a target that was over its alert is back under
// it: under conflictRecoverShare of the threshold, or too few requests left
// in the window to judge.
func (a ConflictAlert) recovered() bool {
	return a.Requests < ConflictAlertMinRequests || a.Ratio() <= a.Threshold*conflictRecoverShare
}

// readMonitorTargets runs MonitorTargets in tx, without JIT.
func readMonitorTargets(ctx context.Context, tx pgx.Tx) ([]db.MonitorTargetsRow, error) {
	q := db.New()
	if err := q.MonitorJITOff(ctx, tx); err != nil {
		return nil, fmt.Errorf("turn JIT off: %w", err)
	}
	rows, err := q.MonitorTargets(ctx, tx)
	if err != nil {
		return nil, fmt.Errorf("read conflict rates over the alert windows: %w", err)
	}
	return rows, nil
}

func conflictAlertOf(r db.MonitorTargetsRow) ConflictAlert {
	return ConflictAlert{
		Target: r.Target, Threshold: r.Threshold, Window: time.Duration(r.WindowSeconds * float64(time.Second)),
		Requests: r.Requests, Conflicts: r.Conflicts,
	}
}

// ReadConflictAlerts returns every registered target's conflict-rate alert,
// sorted by target, read in tx.
func ReadConflictAlerts(ctx context.Context, tx pgx.Tx) ([]ConflictAlert, error) {
	rows, err := readMonitorTargets(ctx, tx)
	if err != nil {
		return nil, err
	}
	out := make([]ConflictAlert, len(rows))
	for i, r := range rows {
		out[i] = conflictAlertOf(r)
	}
	return out, nil
}

// monitor is the state of this process's monitor loop; only its goroutine
// uses it.
type monitor struct {
	every, progressEvery, settle time.Duration
	// over holds the targets this process counts as above their alert,
	// whether or not it logged the crossing: a process that takes over the
	// logging (the logging one stopped) then neither repeats the WARN nor
	// misses the INFO.
	over map[string]bool
	// logs holds the targets this process logs for, as of the last check.
	logs map[string]bool
	// since is where the next progress line's interval starts (the
	// database's clock); zero until the first progress query.
	since time.Time
	// failing remembers which queries are failing, to log once.
	failing map[string]bool
}

func newMonitor(o Options) *monitor {
	m := &monitor{every: o.MonitorEvery, progressEvery: o.ProgressEvery, settle: progressSettle,
		over: map[string]bool{}, logs: map[string]bool{}, failing: map[string]bool{}}
	if m.every <= 0 {
		m.every = monitorEvery
	}
	if m.progressEvery <= 0 {
		m.progressEvery = progressEvery
	}
	return m
}

// runMonitor checks at once and then on its timers until ctx ends.
func (p *Processor) runMonitor(ctx context.Context) {
	m := p.mon
	// step runs one step with a deadline and returns how long it took.
	step := func(name string, f func(context.Context) error) time.Duration {
		start := time.Now()
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		m.note(ctx, p.logger, name, f(sctx))
		return time.Since(start)
	}
	// The conflict check reads every request of the alert windows; on a
	// very busy target that takes a while, and the check then waits
	// longer, so it never takes more than a twentieth of the database's
	// time for this process.
	check := time.NewTimer(max(m.every, 20*step("conflict rates", p.checkConflicts)))
	defer check.Stop()
	step("progress", p.logProgress)
	progress := time.NewTicker(m.progressEvery)
	defer progress.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-check.C:
			check.Reset(max(m.every, 20*step("conflict rates", p.checkConflicts)))
		case <-progress.C:
			step("progress", p.logProgress)
		}
	}
}

// note logs a monitor query's failure once when it starts failing and once
// when it works again.
func (m *monitor) note(ctx context.Context, logger *slog.Logger, what string, err error) {
	switch {
	case err != nil && ctx.Err() != nil:
	case err != nil && !m.failing[what]:
		m.failing[what] = true
		logger.WarnContext(ctx, "monitor: reading the database failed; retrying", "query", what, "error", err)
	case err == nil && m.failing[what]:
		m.failing[what] = false
		logger.InfoContext(ctx, "monitor: reading the database works again", "query", what)
	}
}

// checkConflicts reads every target's conflict rate over its alert window,
// sets the gauges of this process's targets, and logs a crossing of the
// threshold (WARN) or a recovery (INFO) if this process logs for the
// target.
func (p *Processor) checkConflicts(ctx context.Context) error {
	m := p.mon
	var rows []db.MonitorTargetsRow
	err := pgx.BeginTxFunc(ctx, p.pool, pgx.TxOptions{AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var err error
		rows, err = readMonitorTargets(ctx, tx)
		return err
	})
	if err != nil {
		return err
	}
	loggers, err := p.q.MonitorLoggers(ctx, p.pool)
	if err != nil {
		return fmt.Errorf("read which process logs for each target: %w", err)
	}
	clear(m.logs)
	for _, l := range loggers {
		if l.ClientID == p.live.clientID {
			m.logs[l.Target] = true
		}
	}
	for _, r := range rows {
		if _, ours := p.cfg.Targets[r.Target]; !ours {
			continue
		}
		a := conflictAlertOf(r)
		p.metrics.setConflictAlert(a, r.Paused)
		switch {
		case !m.over[a.Target] && a.Over():
			m.over[a.Target] = true
			if m.logs[a.Target] {
				p.logger.WarnContext(ctx, "conflict rate above the alert threshold", p.alertAttrs(ctx, a, true)...)
			}
		case m.over[a.Target] && a.recovered():
			m.over[a.Target] = false
			if m.logs[a.Target] {
				attrs := p.alertAttrs(ctx, a, false)
				if a.Requests < ConflictAlertMinRequests {
					// Quiet, not healed: the remote may be no calmer.
					attrs = append(attrs, "reason", fmt.Sprintf("fewer than %d requests in the window to judge by", ConflictAlertMinRequests))
				}
				p.logger.InfoContext(ctx, "conflict rate back under the alert threshold", attrs...)
			}
		}
	}
	return nil
}

// alertAttrs are an alert line's figures; with hot, also the resources
// with the most conflicts in the window.
func (p *Processor) alertAttrs(ctx context.Context, a ConflictAlert, hot bool) []any {
	attrs := []any{"target", a.Target,
		"conflict_rate", formatShare(a.Ratio()), "threshold", formatShare(a.Threshold), "window", a.Window.String(),
		"requests", a.Requests, "conflicts", a.Conflicts}
	if !hot {
		return attrs
	}
	rows, err := p.q.MonitorHotResources(ctx, p.pool, db.MonitorHotResourcesParams{
		Since: time.Now().Add(-a.Window), Target: a.Target, MaxRows: hotInWarn,
	})
	if err != nil {
		// The alert matters more than its detail.
		return append(attrs, "hot_resources_error", err.Error())
	}
	var b strings.Builder
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s (%d conflicts in %d requests", r.ResourceID, r.Conflicts, r.Requests)
		if len(r.ChangedFields) > 0 {
			fmt.Fprintf(&b, "; people changed %s", strings.Join(r.ChangedFields, ", "))
		}
		b.WriteString(")")
	}
	return append(attrs, "hot_resources", b.String())
}

// logProgress logs one line per target this process logs for that has
// work: changes pending or processing now, or changes finished or requests
// made in the interval since the last line. An idle target gets no line.
func (p *Processor) logProgress(ctx context.Context) error {
	m := p.mon
	var targets []string
	for _, name := range p.cfg.TargetNames() {
		if m.logs[name] {
			targets = append(targets, name)
		}
	}
	if len(targets) == 0 {
		m.since = time.Time{} // a later first line starts from then
		return nil
	}
	first, since := m.since.IsZero(), m.since
	if first {
		// Only until is wanted: an interval that is empty, and cheap.
		since = time.Now()
	}
	rows, err := p.q.MonitorProgress(ctx, p.pool, db.MonitorProgressParams{
		Targets: targets, Since: since, SettleSeconds: m.settle.Seconds(),
	})
	if err != nil {
		return fmt.Errorf("read progress: %w", err)
	}
	if len(rows) == 0 {
		return nil
	}
	m.since = rows[0].Until
	if first {
		return nil // that query only found where the first interval starts
	}
	interval := m.since.Sub(since)
	for _, r := range rows {
		finished := r.Applied + r.Merged + r.Noop + r.Dead + r.Rejected
		if finished == 0 && r.Requests == 0 && r.Pending == 0 && r.Processing == 0 {
			continue // idle
		}
		rate := 0.0
		if interval > 0 {
			rate = float64(finished) / interval.Seconds()
		}
		conflictRate := 0.0
		if r.Requests > 0 {
			conflictRate = float64(r.Conflicts) / float64(r.Requests)
		}
		oldest := "-"
		if r.Pending > 0 {
			oldest = time.Duration(r.OldestPendingSeconds * float64(time.Second)).Round(time.Second).String()
		}
		p.logger.InfoContext(ctx, "progress",
			"target", r.Target,
			"interval", interval.Round(time.Millisecond).String(),
			"finished", finished,
			"applied", r.Applied, "merged", r.Merged, "noop", r.Noop, "dead", r.Dead, "rejected", r.Rejected,
			"rate", formatPerSecond(rate),
			"pending", r.Pending, "processing", r.Processing, "oldest_pending", oldest,
			"requests", r.Requests, "conflicts", r.Conflicts, "conflict_rate", formatShare(conflictRate))
	}
	return nil
}

// formatShare renders a share as a percentage: 0.0723 → "7.2%", 0.05 →
// "5%".
func formatShare(f float64) string {
	return strconv.FormatFloat(math.Round(f*1000)/10, 'f', -1, 64) + "%"
}

// formatPerSecond renders a rate: "0/s", "0.4/s", "12.3/s", "1250/s".
func formatPerSecond(r float64) string {
	switch {
	case r <= 0:
		return "0/s"
	case r < 100:
		return strconv.FormatFloat(math.Round(r*10)/10, 'f', -1, 64) + "/s"
	default:
		return strconv.FormatFloat(math.Round(r), 'f', -1, 64) + "/s"
	}
}
