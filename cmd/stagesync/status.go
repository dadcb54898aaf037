package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

// terminalStates are the end states of a change, in the order reports show
// them (SPEC §3.4).
var terminalStates = []string{"applied", "merged", "noop", "dead", "rejected"}

func cmdStatus(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the local server)")
	asJSON := fs.Bool("json", false, "print one JSON document (for scripts) instead of tables")
	watch := fs.Bool("watch", false, "refresh until interrupted, with a progress bar and ETA for the backlog")
	interval := fs.Duration("interval", 2*time.Second, "refresh interval of --watch")
	untilDrained := fs.Bool("until-drained", false, "with --watch: exit once nothing is pending or processing")
	deadMax := fs.Int("dead", 10, "how many of the latest dead letters to show")
	fs.Usage = func() {
		fmt.Fprintln(stdout, "usage: stagesync status [--json | --watch [--interval 2s] [--until-drained]] [--dead N] [--database-url URL]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("status: unexpected arguments %q", fs.Args())
	case *watch && *asJSON:
		return fmt.Errorf("status: --watch and --json don't combine; run --json repeatedly instead")
	case *interval < 100*time.Millisecond:
		return fmt.Errorf("status: --interval must be at least 100ms, got %v", *interval)
	case *deadMax < 0 || *deadMax > 1000:
		return fmt.Errorf("status: --dead must be between 0 and 1000, got %d", *deadMax)
	}
	pool, err := db.NewPool(ctx, databaseURL(*dbURL, getenv), 4)
	if err != nil {
		return err
	}
	defer pool.Close()

	if *watch {
		return watchStatus(ctx, pool, watchOpts{
			stdout: stdout, interval: *interval, untilDrained: *untilDrained, deadMax: *deadMax, now: time.Now,
		})
	}
	rep, err := collectStatus(ctx, pool, time.Now(), *deadMax)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeStatusJSON(stdout, rep)
	}
	return writeStatusText(stdout, rep)
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
	GeneratedAt time.Time       `json:"generated_at"`
	Backlog     []backlogRow    `json:"backlog"`
	Totals      backlogTotals   `json:"totals"`
	LastHour    []lastHourRow   `json:"last_hour"`
	DeadLetters []deadLetterRow `json:"dead_letters"`
}

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

// collectStatus reads everything `status` shows. now is the report's time:
// the last hour ends there and pending ages are measured from it.
func collectStatus(ctx context.Context, pool *pgxpool.Pool, now time.Time, deadMax int) (*statusReport, error) {
	q := db.New()
	rep := &statusReport{GeneratedAt: now.UTC(), Backlog: []backlogRow{}, LastHour: []lastHourRow{}, DeadLetters: []deadLetterRow{}}

	backlog, err := q.StatusBacklog(ctx, pool)
	if err != nil {
		return nil, fmt.Errorf("read backlog: %w", err)
	}
	jobs, err := riverJobs(ctx, pool)
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
	attempts, err := q.AttemptsCountSince(ctx, pool, since)
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
	finished, err := q.ChangesFinishedSince(ctx, pool, since)
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

	if deadMax > 0 {
		dead, err := q.DeadLettersLatest(ctx, pool, int32(deadMax))
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

// riverJobs counts River's live jobs (not completed, cancelled or
// discarded) per queue and state.
func riverJobs(ctx context.Context, pool *pgxpool.Pool) (map[string]map[string]int64, error) {
	rows, err := db.New().RiverQueueDepth(ctx, pool)
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
	fmt.Fprintf(w, "%-*s  %9s  %10s  %14s  %8s  %7s  %5s  %5s  %8s\n", tw, "LAST HOUR", "requests", "conflicts", "conflict rate", "applied", "merged", "noop", "dead", "rejected")
	for _, h := range rep.LastHour {
		fmt.Fprintf(w, "%-*s  %9d  %10d  %14s  %8d  %7d  %5d  %5d  %8d\n", tw, h.Target, h.Requests, h.Conflicts, formatPercent(h.ConflictRate),
			h.Finished["applied"], h.Finished["merged"], h.Finished["noop"], h.Finished["dead"], h.Finished["rejected"])
	}

	fmt.Fprintf(w, "\nIN FLIGHT: %d changes processing", rep.Totals.Processing)
	var running, queued, scheduled int64
	for _, b := range rep.Backlog {
		running += b.JobsRunning
		queued += b.JobsAvailable
		scheduled += b.JobsScheduled
	}
	fmt.Fprintf(w, ", %d jobs running, %d jobs queued, %d jobs scheduled for a retry\n", running, queued, scheduled)

	if len(rep.DeadLetters) == 0 {
		_, err := fmt.Fprintf(w, "\nDEAD LETTERS: none\n")
		return err
	}
	fmt.Fprintf(w, "\nDEAD LETTERS (latest %d; requeue with: stagesync requeue --id ID)\n", len(rep.DeadLetters))
	tab := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tab, "id\ttarget\tresource\tstatus\tattempts\tfinished\tlast error\n")
	for _, d := range rep.DeadLetters {
		fin := "-"
		if d.FinishedAt != nil {
			fin = d.FinishedAt.Format(time.DateTime)
		}
		fmt.Fprintf(tab, "%d\t%s\t%s\t%s\t%d\t%s\t%s\n", d.ID, d.Target, oneLine(d.ResourceID, 40), d.Status, d.Attempts, fin, oneLine(d.LastError, 120))
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
	deadMax      int
	now          func() time.Time
}

// watchStatus refreshes the status until ctx ends (or, with untilDrained,
// until the backlog is empty). Progress counts the changes finished since
// the watch began against those still open. On a terminal the screen is
// redrawn; otherwise one progress line is printed per refresh, which reads
// well in logs and CI.
func watchStatus(ctx context.Context, pool *pgxpool.Pool, o watchOpts) error {
	tty := isTerminal(o.stdout)
	start := o.now()
	meter := rateMeter{window: 30 * time.Second}
	q := db.New()
	ticker := time.NewTicker(o.interval)
	defer ticker.Stop()
	for {
		now := o.now()
		rep, err := collectStatus(ctx, pool, now, o.deadMax)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		fin, err := q.ChangesFinishedSince(ctx, pool, start)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("count finished changes: %w", err)
		}
		var done int64
		for _, f := range fin {
			done += f.N
		}
		open := rep.Totals.Pending + rep.Totals.Processing
		meter.add(now, done)
		line := progressLine(done, done+open, meter.rate(), 40)
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
			return nil
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
