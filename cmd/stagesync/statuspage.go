package main

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
)

// The status page is plain server-rendered HTML with inline SVG: it works
// with JavaScript off, loads nothing from elsewhere and refreshes itself with
// a meta refresh.

//go:embed statuspage.html
var statusPageHTML string

//go:embed historypage.html
var historyPageHTML string

var pageTmpl = template.Must(template.Must(template.New("status").Parse(statusPageHTML)).New("historypage").Parse(historyPageHTML))

const (
	// historySize is how many backlog samples the page keeps: an hour at
	// the default 5s interval.
	historySize = 720
	// pageDeadLetters is how many of the latest dead letters the page lists.
	pageDeadLetters = 20
	// pageHotResources is how many hot resources the page lists.
	pageHotResources = 10
	// pageConflictHours is how far back the conflict-rate charts reach.
	pageConflictHours = 24
	// pageMaxAge is how old a served status page may be: every request
	// within it gets the same rendering, so any number of viewers cost one
	// set of queries per period.
	pageMaxAge = 2 * time.Second
	// historyRenders bounds history lookups served at once; more wait.
	historyRenders = 2
	// pageQueryTimeout bounds one page's database reads.
	pageQueryTimeout = 5 * time.Second
	// defaultAlertRate is the conflict-rate threshold drawn for a target
	// whose registered settings predate the alert key (its config default).
	defaultAlertRate = 0.05
)

// backlogSample is the backlog and throughput at one moment, summed over
// all targets.
type backlogSample struct {
	at         time.Time
	pending    int64
	processing int64
	// finished is how many changes reached a terminal state since the
	// previous sample, over interval.
	finished int64
	interval time.Duration
}

// backlogHistory is a ring buffer of samples, newest last. Each process
// samples on its own, so the charts cover the time since it started (at
// most historySize samples).
type backlogHistory struct {
	mu    sync.Mutex
	ring  []backlogSample
	start int
	n     int
}

func newBacklogHistory(size int) *backlogHistory {
	return &backlogHistory{ring: make([]backlogSample, size)}
}

func (h *backlogHistory) add(s backlogSample) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n < len(h.ring) {
		h.ring[(h.start+h.n)%len(h.ring)] = s
		h.n++
		return
	}
	h.ring[h.start] = s
	h.start = (h.start + 1) % len(h.ring)
}

// samples returns a copy, oldest first.
func (h *backlogHistory) samples() []backlogSample {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]backlogSample, h.n)
	for i := range h.n {
		out[i] = h.ring[(h.start+i)%len(h.ring)]
	}
	return out
}

// sampleBacklog records a sample at once and then every `every` until ctx
// ends. A failed sample is skipped (the chart shows a gap in time) and
// logged once per outage.
func sampleBacklog(ctx context.Context, pool *pgxpool.Pool, h *backlogHistory, every time.Duration, logger *slog.Logger) {
	q := db.New()
	prev := time.Now()
	failing := false
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		now := time.Now()
		s, err := takeSample(ctx, q, pool, prev, now)
		switch {
		case err == nil:
			h.add(s)
			prev = now
			if failing {
				logger.InfoContext(ctx, "backlog sampling recovered")
			}
			failing = false
		case ctx.Err() != nil:
			return
		case !failing:
			logger.WarnContext(ctx, "backlog sampling failed; the status page's charts will have a gap", "error", err)
			failing = true
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

func takeSample(ctx context.Context, q *db.Queries, pool *pgxpool.Pool, prev, now time.Time) (backlogSample, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s := backlogSample{at: now, interval: now.Sub(prev)}
	err := readOnlySnapshot(ctx, pool, func(tx pgx.Tx) error {
		rows, err := q.StatusBacklog(ctx, tx)
		if err != nil {
			return fmt.Errorf("read backlog: %w", err)
		}
		for _, r := range rows {
			s.pending += r.Pending
			s.processing += r.Processing
		}
		fin, err := q.ChangesFinishedSince(ctx, tx, prev)
		if err != nil {
			return fmt.Errorf("count finished changes: %w", err)
		}
		for _, f := range fin {
			s.finished += f.N
		}
		return nil
	})
	return s, err
}

// statusPage is the template's data.
type statusPage struct {
	GeneratedAt     string
	Error           string
	Backlog         []pageBacklog
	TotalPending    int64
	TotalProcessing int64
	Health          []pageHealth
	Processes       []pageProcess
	Throughput      string
	BacklogChart    lineChart
	ThroughputChart lineChart
	Conflicts       []conflictChart
	// Alerts are the targets above their conflict-rate alert now.
	Alerts      []pageAlert
	Hot         []pageHot
	DeadLetters []pageDeadLetter
	// Tables are the tables' sizes, largest first.
	Tables []pageTable
	// Targets fill the search form's target choice; Query and
	// QueryTarget its fields (empty here).
	Targets            []string
	Query, QueryTarget string
}

// pageAlert is a target above its conflict-rate alert.
type pageAlert struct {
	Target, Summary     string
	Conflicts, Requests int64
}

type pageBacklog struct {
	Target, OldestPending string
	Pending, Processing   int64
}

// pageHealth is one target (and one process serving it) in the health
// table. Class is ok, failing, paused or idle.
type pageHealth struct {
	Target, State, Class, Process, Limit, LastSuccess, LastErrorAt, LastError string
	Failures                                                                  int32
}

type pageProcess struct {
	Process, ClientID, Targets, Started, Heartbeat string
}

type pageHot struct {
	Target, ResourceID, Rate, LastConflict, Fields string
	Conflicts, Requests, Merges, NeedsReview       int64
}

// pageTable is one table's size on disk and estimated rows.
type pageTable struct{ Table, Size, Rows string }

type pageDeadLetter struct {
	ID                                                int64
	Target, ResourceID, Status, FinishedAt, LastError string
	Attempts                                          int32
	// Requeue is the command that requeues it (--include-rejected for a
	// rejected change).
	Requeue string
}

// lineChart is an SVG line chart in a fixed viewBox.
type lineChart struct {
	Width, Height int
	Left, Right   int // plot area x range
	Top, Bottom   int // plot area y range
	Ticks         []chartTick
	XFrom, XTo    string
	Lines         []chartLine
	Empty         bool
}

// chartTick is a labelled horizontal grid line at height Y.
type chartTick struct {
	Y     float64
	Label string
}

type chartLine struct {
	Class, Label, Points, Last string
}

// conflictChart is one target's conflict rate per hour as SVG bars, plus
// the figures as a table.
type conflictChart struct {
	Target string
	Width  int
	Height int
	Left   int
	Right  int
	Top    int
	Bottom int
	Ticks  []chartTick
	// Threshold is the alert's conflict rate and ThresholdY its height.
	Threshold  string
	ThresholdY float64
	Bars       []conflictBar
	Rows       []conflictRow
	// Now is the conflict rate over the alert window in words, and NowOver
	// whether it is above the alert.
	Now     string
	NowOver bool
}

type conflictBar struct {
	X, Y, W, H float64
	Title      string
	// Over is set when the hour's rate is above the alert threshold.
	Over bool
}

type conflictRow struct {
	Hour                                  string
	Requests, Conflicts                   int64
	Rate, P50, P95                        string
	Applied, Merged, Noop, Dead, Rejected int64
	Over                                  bool
}

// pageLoader serves the status page from a snapshot at most maxAge old.
// Concurrent requests share one load: however many people (or scrapers)
// look, the database sees one set of queries per period, and one render.
type pageLoader struct {
	pool   *pgxpool.Pool
	hist   *backlogHistory
	alerts map[string]float64 // this process's targets' thresholds
	logger *slog.Logger
	maxAge time.Duration
	now    func() time.Time
	// loads counts the database loads, for tests.
	loads atomic.Int64

	mu      sync.Mutex
	cur     *renderedPage
	pending *pageLoad
}

type renderedPage struct {
	at   time.Time
	code int
	body []byte
}

// pageLoad is a load in progress; done closes when page is set.
type pageLoad struct {
	done chan struct{}
	page *renderedPage
}

func newPageLoader(pool *pgxpool.Pool, hist *backlogHistory, alerts map[string]float64, logger *slog.Logger) *pageLoader {
	return &pageLoader{pool: pool, hist: hist, alerts: alerts, logger: logger, maxAge: pageMaxAge, now: time.Now}
}

// get returns a rendering no older than maxAge, loading one if needed; a
// request that arrives during a load waits for it rather than starting
// another.
func (l *pageLoader) get(ctx context.Context) (*renderedPage, error) {
	l.mu.Lock()
	if l.cur != nil && l.now().Sub(l.cur.at) < l.maxAge {
		p := l.cur
		l.mu.Unlock()
		return p, nil
	}
	ld := l.pending
	if ld == nil {
		ld = &pageLoad{done: make(chan struct{})}
		l.pending = ld
		l.mu.Unlock()
		// The request that found no snapshot loads it, under a context
		// that its own client leaving does not end: others wait for it.
		l.load(context.WithoutCancel(ctx), ld)
		return ld.page, nil
	}
	l.mu.Unlock()
	select {
	case <-ld.done:
		return ld.page, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (l *pageLoader) load(ctx context.Context, ld *pageLoad) {
	l.loads.Add(1)
	ctx, cancel := context.WithTimeout(ctx, pageQueryTimeout)
	defer cancel()
	now := l.now()
	page, err := buildStatusPage(ctx, l.pool, l.hist.samples(), now, l.alerts)
	code := http.StatusOK
	if err != nil {
		l.logger.WarnContext(ctx, "status page: database query failed", "error", err)
		// The error text stays in the log: the page only says what
		// an operator can act on.
		page = &statusPage{GeneratedAt: now.UTC().Format(time.DateTime), Error: "The database is unreachable or not migrated; see the process log and /readyz."}
		code = http.StatusServiceUnavailable
	}
	var buf bytes.Buffer
	if err := pageTmpl.ExecuteTemplate(&buf, "status", page); err != nil {
		l.logger.ErrorContext(ctx, "status page: render failed", "error", err)
		buf.Reset()
		buf.WriteString("status page: render failed\n")
		code = http.StatusInternalServerError
	}
	rp := &renderedPage{at: now, code: code, body: buf.Bytes()}
	l.mu.Lock()
	l.cur, l.pending = rp, nil
	ld.page = rp
	l.mu.Unlock()
	close(ld.done)
}

// setPageHeaders marks a page self-contained and uncached.
func setPageHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	// No scripts, no external resources: the page is self-contained.
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'")
	h.Set("X-Content-Type-Options", "nosniff")
}

// statusPageHandler serves the page from the loader's snapshots.
func statusPageHandler(l *pageLoader) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, err := l.get(r.Context())
		if err != nil {
			return // the client went away
		}
		setPageHeaders(w)
		w.WriteHeader(p.code)
		_, _ = w.Write(p.body) // the client went away; nothing to do
	}
}

func buildStatusPage(ctx context.Context, pool *pgxpool.Pool, samples []backlogSample, now time.Time, alerts map[string]float64) (*statusPage, error) {
	q := db.New()
	page := &statusPage{GeneratedAt: now.UTC().Format(time.DateTime)}
	hourFrom := now.UTC().Truncate(time.Hour).Add(-(pageConflictHours - 1) * time.Hour)
	var rep *statusReport
	var rates []db.ConflictRatesSinceRow
	var regAlerts []db.StatusTargetAlertsRow
	err := readOnlySnapshot(ctx, pool, func(tx pgx.Tx) error {
		var err error
		if rep, err = collectStatus(ctx, tx, now, statusLimits{dead: pageDeadLetters, hot: pageHotResources}); err != nil {
			return err
		}
		if rates, err = q.ConflictRatesSince(ctx, tx, hourFrom); err != nil {
			return fmt.Errorf("read conflict rates: %w", err)
		}
		if regAlerts, err = q.StatusTargetAlerts(ctx, tx); err != nil {
			return fmt.Errorf("read alert thresholds: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}

	for _, b := range rep.Backlog {
		age := "-"
		if b.OldestPendingAt != nil {
			age = formatAge(max(0, now.Sub(*b.OldestPendingAt)))
		}
		page.Backlog = append(page.Backlog, pageBacklog{Target: b.Target, Pending: b.Pending, Processing: b.Processing, OldestPending: age})
		page.Targets = append(page.Targets, b.Target)
	}
	page.TotalPending, page.TotalProcessing = rep.Totals.Pending, rep.Totals.Processing
	page.Health, page.Processes = pageHealthRows(rep, now)

	thresholds := map[string]float64{}
	for _, a := range regAlerts {
		thresholds[a.Target] = a.ConflictRate
		if thresholds[a.Target] <= 0 {
			thresholds[a.Target] = defaultAlertRate
		}
	}
	for t, r := range alerts { // this process's config is the newest word
		thresholds[t] = r
	}
	page.Conflicts = conflictCharts(rates, hourFrom, thresholds)
	for _, a := range rep.ConflictAlerts {
		if a.Above {
			page.Alerts = append(page.Alerts, pageAlert{Target: a.Target, Summary: a.Summary, Conflicts: a.Conflicts, Requests: a.Requests})
		}
		for i := range page.Conflicts {
			if c := &page.Conflicts[i]; c.Target == a.Target {
				c.Now = fmt.Sprintf("Now: %s (%d conflicts in %d requests).", a.Summary, a.Conflicts, a.Requests)
				c.NowOver = a.Above
			}
		}
	}

	for _, h := range rep.HotResources {
		last := "-"
		if h.LastConflictAt != nil {
			last = formatAge(max(0, now.Sub(*h.LastConflictAt))) + " ago"
		}
		fields := strings.Join(h.ChangedFields, ", ")
		if fields == "" {
			fields = "-"
		}
		page.Hot = append(page.Hot, pageHot{Target: h.Target, ResourceID: h.ResourceID, Rate: formatPercent(h.ConflictRate), LastConflict: last,
			Fields: fields, Conflicts: h.Conflicts, Requests: h.Requests, Merges: h.Merges, NeedsReview: h.NeedsReview})
	}
	for _, t := range rep.Tables {
		page.Tables = append(page.Tables, pageTable{Table: t.Table, Size: formatBytes(t.Bytes), Rows: formatRows(t.EstimatedRows)})
	}
	for _, d := range rep.DeadLetters {
		row := pageDeadLetter{ID: d.ID, Target: d.Target, ResourceID: d.ResourceID, Status: d.Status, Attempts: d.Attempts, FinishedAt: "-", LastError: d.LastError,
			Requeue: RequeueHint(d.ID, d.Status)}
		if d.FinishedAt != nil {
			row.FinishedAt = d.FinishedAt.Format(time.DateTime)
		}
		page.DeadLetters = append(page.DeadLetters, row)
	}

	page.BacklogChart, page.ThroughputChart = historyCharts(samples)
	page.Throughput = "-"
	if n := len(samples); n > 0 && samples[n-1].interval > 0 {
		s := samples[n-1]
		page.Throughput = formatRate(float64(s.finished)/s.interval.Seconds()) + " changes/s"
	}
	return page, nil
}

// pageHealthRows turns the report's health into table rows: one per target
// and serving process, one for a target nobody serves.
func pageHealthRows(rep *statusReport, now time.Time) ([]pageHealth, []pageProcess) {
	ago := func(t *time.Time) string {
		if t == nil {
			return "never"
		}
		return formatAge(max(0, now.Sub(*t))) + " ago"
	}
	var rows []pageHealth
	for _, h := range rep.Health {
		pause := ""
		if h.PausedUntil != nil {
			pause = fmt.Sprintf("paused for %s (until %s UTC)", formatAge(h.PausedUntil.Sub(now)), h.PausedUntil.Format(time.TimeOnly))
			if h.PauseReason != nil && *h.PauseReason != "" {
				pause += ": " + *h.PauseReason
			}
		}
		if len(h.Processes) == 0 {
			r := pageHealth{Target: h.Target, State: "no live process serves it", Class: "idle", Process: "-", Limit: "-", LastSuccess: "-", LastErrorAt: "-"}
			if pause != "" {
				r.State, r.Class = pause+"; no live process serves it", "paused"
			}
			rows = append(rows, r)
			continue
		}
		for _, p := range h.Processes {
			r := pageHealth{Target: h.Target, State: "ok", Class: "ok", Process: processName(p.Hostname, p.PID),
				Limit: fmt.Sprintf("%d / %d", p.InflightLimit, p.Concurrency), LastSuccess: ago(p.LastSuccessAt),
				LastErrorAt: "-", Failures: p.ConsecutiveFailures}
			switch {
			case pause != "":
				r.State, r.Class = pause, "paused"
			case p.ConsecutiveFailures > 0:
				r.State, r.Class = "failing", "failing"
			}
			if now.Sub(p.UpdatedAt) > staleHealth {
				r.State += " (stale: updated " + ago(&p.UpdatedAt) + ")"
			}
			if p.LastErrorAt != nil {
				r.LastErrorAt, r.LastError = ago(p.LastErrorAt), deref(p.LastError)
			}
			rows = append(rows, r)
		}
	}
	var procs []pageProcess
	for _, p := range rep.Processes {
		procs = append(procs, pageProcess{Process: processName(p.Hostname, p.PID), ClientID: p.ClientID, Targets: strings.Join(p.Targets, ", "),
			Started: p.StartedAt.Format(time.DateTime), Heartbeat: ago(&p.HeartbeatAt)})
	}
	return rows, procs
}

// Chart geometry, in SVG user units.
const (
	chartW      = 640
	chartH      = 200
	chartLeft   = 56
	chartRight  = chartW - 12
	chartTop    = 12
	chartBottom = chartH - 28
)

func historyCharts(samples []backlogSample) (backlog, throughput lineChart) {
	base := lineChart{Width: chartW, Height: chartH, Left: chartLeft, Right: chartRight, Top: chartTop, Bottom: chartBottom}
	backlog, throughput = base, base
	if len(samples) < 2 {
		backlog.Empty, throughput.Empty = true, true
		return backlog, throughput
	}
	t0, t1 := samples[0].at, samples[len(samples)-1].at
	pending := make([]float64, len(samples))
	processing := make([]float64, len(samples))
	rate := make([]float64, len(samples))
	for i, s := range samples {
		pending[i] = float64(s.pending)
		processing[i] = float64(s.processing)
		if s.interval > 0 {
			rate[i] = float64(s.finished) / s.interval.Seconds()
		}
	}
	from, to := t0.UTC().Format(time.TimeOnly), t1.UTC().Format(time.TimeOnly)+" UTC"

	ymax, ticks := axisTicks(max(maxOf(pending), maxOf(processing)), chartTop, chartBottom, formatCompact)
	backlog.Ticks = ticks
	backlog.XFrom, backlog.XTo = from, to
	backlog.Lines = []chartLine{
		{Class: "pending", Label: "pending", Points: polyline(samples, pending, ymax), Last: formatCount(pending[len(pending)-1])},
		{Class: "processing", Label: "processing", Points: polyline(samples, processing, ymax), Last: formatCount(processing[len(processing)-1])},
	}

	rmax, rticks := axisTicks(maxOf(rate), chartTop, chartBottom, func(v float64) string { return formatCompact(v) + "/s" })
	throughput.Ticks = rticks
	throughput.XFrom, throughput.XTo = from, to
	throughput.Lines = []chartLine{
		{Class: "throughput", Label: "finished/s", Points: polyline(samples, rate, rmax), Last: formatRate(rate[len(rate)-1])},
	}
	return backlog, throughput
}

// axisTicks chooses a y axis for values up to vmax: a round step (1, 2 or 5
// times a power of ten) giving at most five intervals, the axis maximum
// (a multiple of the step), and a labelled tick per step mapped into the
// plot area from bottom (0) to top (ymax).
func axisTicks(vmax float64, top, bottom int, label func(float64) string) (ymax float64, ticks []chartTick) {
	step := niceStep(vmax / 5)
	n := max(1, int(math.Ceil(vmax/step-1e-9)))
	ymax = float64(n) * step
	for i := 0; i <= n; i++ {
		v := float64(i) * step
		ticks = append(ticks, chartTick{Y: round1(float64(bottom) - v/ymax*float64(bottom-top)), Label: label(v)})
	}
	return ymax, ticks
}

// niceStep rounds v up to 1, 2 or 5 times a power of ten. Values at or
// below zero get 1.
func niceStep(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p*(1+1e-9) {
			return m * p
		}
	}
	return 10 * p
}

// polyline maps values over the samples' time span into the plot area.
func polyline(samples []backlogSample, values []float64, ymax float64) string {
	t0 := samples[0].at
	span := samples[len(samples)-1].at.Sub(t0).Seconds()
	var b strings.Builder
	for i, s := range samples {
		x := float64(chartLeft)
		if span > 0 {
			x += s.at.Sub(t0).Seconds() / span * float64(chartRight-chartLeft)
		}
		y := float64(chartBottom) - values[i]/ymax*float64(chartBottom-chartTop)
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.FormatFloat(x, 'f', 1, 64))
		b.WriteByte(',')
		b.WriteString(strconv.FormatFloat(y, 'f', 1, 64))
	}
	return b.String()
}

// Conflict chart geometry.
const (
	barsH      = 150
	barsTop    = 12
	barsBottom = 120
)

// conflictCharts builds one bar chart per target over the hours from
// hourFrom to now, with the target's alert threshold drawn across; rows
// list the hours that had traffic, newest first.
func conflictCharts(rates []db.ConflictRatesSinceRow, hourFrom time.Time, thresholds map[string]float64) []conflictChart {
	byTarget := map[string][]db.ConflictRatesSinceRow{}
	var targets []string
	for _, r := range rates {
		if _, ok := byTarget[r.Target]; !ok {
			targets = append(targets, r.Target)
		}
		byTarget[r.Target] = append(byTarget[r.Target], r)
	}
	slot := float64(chartRight-chartLeft) / pageConflictHours
	var out []conflictChart
	slices.Sort(targets)
	for _, t := range targets {
		rows := byTarget[t]
		limit, ok := thresholds[t]
		if !ok {
			limit = defaultAlertRate
		}
		peak := 0.0
		for _, r := range rows {
			peak = max(peak, r.ConflictRate)
		}
		// The threshold stays in view (a quarter below the top at most),
		// and a 1% rate doesn't fill the chart.
		ymax, ticks := axisTicks(max(peak, limit*1.25, 0.02), barsTop, barsBottom, formatTickPercent)
		c := conflictChart{Target: t, Width: chartW, Height: barsH, Left: chartLeft, Right: chartRight, Top: barsTop, Bottom: barsBottom,
			Ticks: ticks, Threshold: formatPercent(limit), ThresholdY: round1(barsBottom - limit/ymax*(barsBottom-barsTop))}
		for _, r := range rows {
			i := int(r.Hour.UTC().Sub(hourFrom) / time.Hour)
			if i < 0 || i >= pageConflictHours {
				continue
			}
			bh := r.ConflictRate / ymax * (barsBottom - barsTop)
			label := r.Hour.UTC().Format("2006-01-02 15:04")
			c.Bars = append(c.Bars, conflictBar{
				X: round1(chartLeft + float64(i)*slot + 1), Y: round1(barsBottom - bh), W: round1(slot - 2), H: round1(bh),
				Title: fmt.Sprintf("%s UTC: %d conflicts in %d requests (%s)", label, r.Conflicts, r.Requests, formatPercent(r.ConflictRate)),
				Over:  r.ConflictRate > limit,
			})
		}
		for i := len(rows) - 1; i >= 0; i-- {
			r := rows[i]
			c.Rows = append(c.Rows, conflictRow{
				Hour: r.Hour.UTC().Format("2006-01-02 15:04"), Requests: r.Requests, Conflicts: r.Conflicts,
				Rate: formatPercent(r.ConflictRate), P50: formatLatency(r.P50Ms, r.Requests), P95: formatLatency(r.P95Ms, r.Requests),
				Applied: r.Applied, Merged: r.Merged, Noop: r.Noop, Dead: r.Dead, Rejected: r.Rejected, Over: r.ConflictRate > limit,
			})
		}
		out = append(out, c)
	}
	return out
}

func formatLatency(ms float64, requests int64) string {
	if requests == 0 {
		return "-"
	}
	return formatMillis(ms)
}

// formatTickPercent labels a rate axis: 0%, 2%, 2.5%, 10%.
func formatTickPercent(v float64) string {
	return strconv.FormatFloat(math.Round(v*1000)/10, 'f', -1, 64) + "%"
}

// formatCompact labels an axis: 0, 250, 1.5k, 20k, 1.2M.
func formatCompact(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(math.Round(v/1e5)/10, 'f', -1, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(math.Round(v/1e2)/10, 'f', -1, 64) + "k"
	default:
		return strconv.FormatFloat(math.Round(v*100)/100, 'f', -1, 64)
	}
}

func maxOf(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

func formatCount(v float64) string {
	return strconv.FormatFloat(math.Round(v), 'f', 0, 64)
}

func round1(v float64) float64 { return math.Round(v*10) / 10 }

// historyPage is the history template's data.
type historyPage struct {
	GeneratedAt string
	// Query echoes the search, for the form.
	Query, QueryTarget string
	Targets            []string
	// Notice says why nothing is shown, or what else matched.
	Notice string
	// Matches are the resources a search found in several targets.
	Matches []historyMatch
	Report  *historyReport
	Entries []timelineEntry
}

type historyMatch struct{ Target, ResourceID string }

// historyPages serves /history: ?change=N, ?target=T&resource=ID, or the
// search form's ?q=… (a change id, or a resource id in any or one target).
// At most historyRenders lookups run at once; the rest wait their turn (or
// give up with their request), so a crowd of viewers can't take the
// database's connections from the processor.
type historyPages struct {
	pool   *pgxpool.Pool
	logger *slog.Logger
	sem    chan struct{}
	// active and maxActive count lookups running, for tests.
	active, maxActive atomic.Int32
}

func newHistoryPages(pool *pgxpool.Pool, logger *slog.Logger) *historyPages {
	return &historyPages{pool: pool, logger: logger, sem: make(chan struct{}, historyRenders)}
}

func (h *historyPages) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case h.sem <- struct{}{}:
		defer func() { <-h.sem }()
	case <-r.Context().Done():
		return
	}
	n := h.active.Add(1)
	defer h.active.Add(-1)
	for {
		m := h.maxActive.Load()
		if n <= m || h.maxActive.CompareAndSwap(m, n) {
			break
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), pageQueryTimeout)
	defer cancel()
	page, code := buildHistoryPage(ctx, h.pool, r, h.logger)
	var buf bytes.Buffer
	if err := pageTmpl.ExecuteTemplate(&buf, "historypage", page); err != nil {
		h.logger.ErrorContext(ctx, "history page: render failed", "error", err)
		http.Error(w, "history page: render failed", http.StatusInternalServerError)
		return
	}
	setPageHeaders(w)
	w.WriteHeader(code)
	_, _ = buf.WriteTo(w)
}

func buildHistoryPage(ctx context.Context, pool *pgxpool.Pool, r *http.Request, logger *slog.Logger) (*historyPage, int) {
	v := r.URL.Query()
	page := &historyPage{GeneratedAt: time.Now().UTC().Format(time.DateTime)}
	if names, err := db.New().TargetsRegistered(ctx, pool); err == nil {
		for _, n := range names {
			page.Targets = append(page.Targets, n.Name)
		}
	}
	var hq historyQuery
	q := strings.TrimSpace(v.Get("q"))
	switch {
	case v.Get("change") != "":
		id, err := strconv.ParseInt(v.Get("change"), 10, 64)
		if err != nil || id <= 0 {
			page.Notice = "A change id is a positive whole number."
			return page, http.StatusBadRequest
		}
		hq.changeID, page.Query = id, v.Get("change")
	case v.Get("resource") != "":
		hq.target, hq.resourceID = v.Get("target"), v.Get("resource")
		page.Query, page.QueryTarget = hq.resourceID, hq.target
	case q != "":
		page.Query, page.QueryTarget = q, v.Get("target")
		// A number is a change id unless a target was chosen; a resource
		// id that happens to be a number is found by choosing its target.
		if id, err := strconv.ParseInt(q, 10, 64); err == nil && id > 0 && page.QueryTarget == "" {
			hq.changeID = id
		} else {
			hq.target, hq.resourceID = page.QueryTarget, q
		}
	default:
		page.Notice = "Search by change id, or by resource id (choose the target if several share it)."
		return page, http.StatusOK
	}
	// PostgreSQL refuses text that is not UTF-8 or holds NUL, and no
	// target or resource can have such a name: say so, rather than report
	// the database's refusal as an outage (and log it for every visitor).
	for _, s := range []string{hq.target, hq.resourceID} {
		if !utf8.ValidString(s) || strings.ContainsRune(s, 0) {
			page.Notice = "Nothing can be found by that: targets and resource ids are UTF-8 text without NUL characters."
			return page, http.StatusBadRequest
		}
	}
	var amb *ambiguousResourceError
	rep, err := loadHistory(ctx, pool, hq, 500)
	if err != nil && hq.changeID > 0 && errors.Is(err, errNotFound) && q != "" {
		// The search's number may be a resource id.
		hq = historyQuery{resourceID: q}
		rep, err = loadHistory(ctx, pool, hq, 500)
	}
	switch {
	case err == nil:
	case errors.Is(err, errNotFound):
		page.Notice = "Nothing found: " + err.Error() + "."
		return page, http.StatusNotFound
	case errors.As(err, &amb):
		page.Notice = "Several targets know this resource id; choose one:"
		for _, t := range amb.targets {
			page.Matches = append(page.Matches, historyMatch{Target: t, ResourceID: amb.resourceID})
		}
		return page, http.StatusOK
	default:
		logger.WarnContext(ctx, "history page: database query failed", "error", err)
		page.Notice = "The database is unreachable or not migrated; see the process log and /readyz."
		return page, http.StatusServiceUnavailable
	}
	page.Report, page.Entries = rep, timeline(rep)
	return page, http.StatusOK
}
