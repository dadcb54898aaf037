package main

import (
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"html/template"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
)

// The status page is plain server-rendered HTML with inline SVG: it works
// with JavaScript off, loads nothing from elsewhere and refreshes itself with
// a meta refresh.

//go:embed statuspage.html
var statusPageHTML string

var statusPageTmpl = template.Must(template.New("status").Parse(statusPageHTML))

const (
	// historySize is how many backlog samples the page keeps: an hour at
	// the default 5s interval.
	historySize = 720
	// pageDeadLetters is how many of the latest dead letters the page lists.
	pageDeadLetters = 20
	// pageConflictHours is how far back the conflict-rate charts reach.
	pageConflictHours = 24
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
	rows, err := q.StatusBacklog(ctx, pool)
	if err != nil {
		return s, fmt.Errorf("read backlog: %w", err)
	}
	for _, r := range rows {
		s.pending += r.Pending
		s.processing += r.Processing
	}
	fin, err := q.ChangesFinishedSince(ctx, pool, prev)
	if err != nil {
		return s, fmt.Errorf("count finished changes: %w", err)
	}
	for _, f := range fin {
		s.finished += f.N
	}
	return s, nil
}

// statusPage is the template's data.
type statusPage struct {
	GeneratedAt     string
	Error           string
	Backlog         []pageBacklog
	TotalPending    int64
	TotalProcessing int64
	Throughput      string
	BacklogChart    lineChart
	ThroughputChart lineChart
	Conflicts       []conflictChart
	DeadLetters     []pageDeadLetter
}

type pageBacklog struct {
	Target, OldestPending string
	Pending, Processing   int64
}

type pageDeadLetter struct {
	ID                                                int64
	Target, ResourceID, Status, FinishedAt, LastError string
	Attempts                                          int32
}

// lineChart is an SVG line chart in a fixed viewBox.
type lineChart struct {
	Width, Height int
	Left, Right   int // plot area x range
	Top, Bottom   int // plot area y range
	YMax          string
	XFrom, XTo    string
	Lines         []chartLine
	Empty         bool
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
	Bars   []conflictBar
	Rows   []conflictRow
	YMax   string
}

type conflictBar struct {
	X, Y, W, H float64
	Title      string
}

type conflictRow struct {
	Hour                            string
	Requests, Conflicts             int64
	Rate                            string
	Applied, Merged, Dead, Rejected int64
}

// statusPageHandler serves the page. Figures come from the database at
// request time; the charts over time from the sampler's history.
func statusPageHandler(pool *pgxpool.Pool, hist *backlogHistory, logger *slog.Logger) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		now := time.Now()
		page, err := buildStatusPage(ctx, pool, hist.samples(), now)
		code := http.StatusOK
		if err != nil {
			logger.WarnContext(ctx, "status page: database query failed", "error", err)
			// The error text stays in the log: the page only says what
			// an operator can act on.
			page = &statusPage{GeneratedAt: now.UTC().Format(time.DateTime), Error: "The database is unreachable or not migrated; see the process log and /readyz."}
			code = http.StatusServiceUnavailable
		}
		var buf bytes.Buffer
		if err := statusPageTmpl.Execute(&buf, page); err != nil {
			logger.ErrorContext(ctx, "status page: render failed", "error", err)
			http.Error(w, "status page: render failed", http.StatusInternalServerError)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		// No scripts, no external resources: the page is self-contained.
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:")
		h.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(code)
		_, _ = buf.WriteTo(w) // the client went away; nothing to do
	}
}

func buildStatusPage(ctx context.Context, pool *pgxpool.Pool, samples []backlogSample, now time.Time) (*statusPage, error) {
	q := db.New()
	page := &statusPage{GeneratedAt: now.UTC().Format(time.DateTime)}

	backlog, err := q.StatusBacklog(ctx, pool)
	if err != nil {
		return nil, fmt.Errorf("read backlog: %w", err)
	}
	for _, b := range backlog {
		age := "-"
		if b.Pending > 0 {
			age = formatAge(max(0, now.Sub(b.OldestPendingAt)))
		}
		page.Backlog = append(page.Backlog, pageBacklog{Target: b.Target, Pending: b.Pending, Processing: b.Processing, OldestPending: age})
		page.TotalPending += b.Pending
		page.TotalProcessing += b.Processing
	}

	hourFrom := now.UTC().Truncate(time.Hour).Add(-(pageConflictHours - 1) * time.Hour)
	rates, err := q.ConflictRatesSince(ctx, pool, hourFrom)
	if err != nil {
		return nil, fmt.Errorf("read conflict rates: %w", err)
	}
	page.Conflicts = conflictCharts(rates, hourFrom)

	dead, err := q.DeadLettersLatest(ctx, pool, pageDeadLetters)
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	for _, d := range dead {
		row := pageDeadLetter{ID: d.ID, Target: d.Target, ResourceID: d.ResourceID, Status: d.Status, Attempts: d.Attempts, FinishedAt: "-"}
		if d.FinishedAt != nil {
			row.FinishedAt = d.FinishedAt.UTC().Format(time.DateTime)
		}
		if d.LastError != nil {
			row.LastError = *d.LastError
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

// Chart geometry, in SVG user units.
const (
	chartW      = 640
	chartH      = 180
	chartLeft   = 48
	chartRight  = chartW - 10
	chartTop    = 10
	chartBottom = chartH - 24
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

	ymax := niceCeil(max(maxOf(pending), maxOf(processing)))
	backlog.YMax = formatCount(ymax)
	backlog.XFrom, backlog.XTo = from, to
	backlog.Lines = []chartLine{
		{Class: "pending", Label: "pending", Points: polyline(samples, pending, ymax), Last: formatCount(pending[len(pending)-1])},
		{Class: "processing", Label: "processing", Points: polyline(samples, processing, ymax), Last: formatCount(processing[len(processing)-1])},
	}

	rmax := niceCeil(maxOf(rate))
	throughput.YMax = formatRate(rmax)
	throughput.XFrom, throughput.XTo = from, to
	throughput.Lines = []chartLine{
		{Class: "throughput", Label: "finished/s", Points: polyline(samples, rate, rmax), Last: formatRate(rate[len(rate)-1])},
	}
	return backlog, throughput
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

// conflictCharts builds one bar chart per target over the hours from
// hourFrom to now; rows list the hours that had traffic, newest first.
func conflictCharts(rates []db.ConflictRatesSinceRow, hourFrom time.Time) []conflictChart {
	byTarget := map[string][]db.ConflictRatesSinceRow{}
	var targets []string
	for _, r := range rates {
		if _, ok := byTarget[r.Target]; !ok {
			targets = append(targets, r.Target)
		}
		byTarget[r.Target] = append(byTarget[r.Target], r)
	}
	const w, h, left, bottom, top = chartW, 120, chartLeft, 100, 8
	slot := float64(w-left-10) / pageConflictHours
	var out []conflictChart
	slices.Sort(targets)
	for _, t := range targets {
		rows := byTarget[t]
		peak := 0.0
		for _, r := range rows {
			peak = max(peak, r.ConflictRate)
		}
		// At least 10% full scale, so a 1% rate doesn't fill the chart.
		ymax := max(0.1, math.Ceil(peak*10)/10)
		c := conflictChart{Target: t, Width: w, Height: h + 4, YMax: formatPercent(ymax)}
		for _, r := range rows {
			i := int(r.Hour.UTC().Sub(hourFrom) / time.Hour)
			if i < 0 || i >= pageConflictHours {
				continue
			}
			bh := r.ConflictRate / ymax * float64(bottom-top)
			label := r.Hour.UTC().Format("2006-01-02 15:04")
			c.Bars = append(c.Bars, conflictBar{
				X: round1(float64(left) + float64(i)*slot + 1), Y: round1(float64(bottom) - bh), W: round1(slot - 2), H: round1(bh),
				Title: fmt.Sprintf("%s UTC: %d conflicts in %d requests (%s)", label, r.Conflicts, r.Requests, formatPercent(r.ConflictRate)),
			})
		}
		for i := len(rows) - 1; i >= 0; i-- {
			r := rows[i]
			c.Rows = append(c.Rows, conflictRow{
				Hour: r.Hour.UTC().Format("2006-01-02 15:04"), Requests: r.Requests, Conflicts: r.Conflicts,
				Rate: formatPercent(r.ConflictRate), Applied: r.Applied, Merged: r.Merged, Dead: r.Dead, Rejected: r.Rejected,
			})
		}
		out = append(out, c)
	}
	return out
}

func maxOf(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

// niceCeil rounds up to 1, 2 or 5 times a power of ten (at least 1), so
// axis labels are round numbers.
func niceCeil(v float64) float64 {
	if v <= 1 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func formatCount(v float64) string {
	return strconv.FormatFloat(math.Round(v), 'f', 0, 64)
}

func round1(v float64) float64 { return math.Round(v*10) / 10 }
