package processor

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the processor's Prometheus instruments. Labels carry target
// names, methods and outcomes only: never ids, URLs or credentials.
type Metrics struct {
	requests       *prometheus.CounterVec
	requestSeconds *prometheus.HistogramVec
	conflicts      *prometheus.CounterVec
	merges         *prometheus.CounterVec
	changes        *prometheus.CounterVec
	claimed        *prometheus.CounterVec
	jobs           *prometheus.CounterVec
	inflightLimit  *prometheus.GaugeVec
	rateShare      *prometheus.GaugeVec
	pauses         *prometheus.CounterVec
	refused        *prometheus.CounterVec
	rescued        prometheus.Counter
	batch          batchMetrics // batch.go

	// Read from the database by the monitor (monitor.go), so every
	// process reports the same values.
	conflictRatio     *prometheus.GaugeVec
	conflictRequests  *prometheus.GaugeVec
	conflictThreshold *prometheus.GaugeVec
	paused            *prometheus.GaugeVec
}

// NewMetrics creates the instruments and registers them with reg (nil: not
// registered, for tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_remote_requests_total",
			Help: "HTTP requests made to remote targets, by target, method, status class (2xx, 4xx, 5xx, error) and attempt outcome.",
		}, []string{"target", "method", "status_class", "outcome"}),
		requestSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "stagesync_remote_request_duration_seconds",
			Help:    "Latency of HTTP requests to remote targets.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"target", "method"}),
		conflicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_conflicts_total",
			Help: "Writes answered with a conflict status (ETag mismatch).",
		}, []string{"target"}),
		merges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_merges_total",
			Help: "Three-way merges, by outcome (merged, noop, needs_review).",
		}, []string{"target", "outcome"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_changes_finished_total",
			Help: "Changes that reached a terminal state, by state.",
		}, []string{"target", "status"}),
		claimed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_changes_claimed_total",
			Help: "Pending changes claimed into jobs.",
		}, []string{"target"}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_jobs_total",
			Help: "Apply jobs worked, by result (done, or error when recording failed and River retries the job).",
		}, []string{"target", "result"}),
	}
	m.inflightLimit = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_inflight_limit",
		Help: "This process's adaptive limit of requests in flight to the target: starts at 16, doubles per round trip of good answers, halved on 429/503 and then grown by one per second without them, at most the target's concurrency.",
	}, []string{"target"})
	m.rateShare = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_rate_share",
		Help: "Requests per second this process may send to the target: its rate_limit divided by the live processes serving it. Absent for targets without a rate limit.",
	}, []string{"target"})
	m.pauses = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "stagesync_target_pauses_total",
		Help: "Pauses of the target this process started on a 429 or 503 (each extends the target's pause for every process).",
	}, []string{"target"})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "stagesync_requests_refused_total",
		Help: "Requests not sent because the target was paused (its resources are retried when the pause ends; no attempt is counted).",
	}, []string{"target"})
	m.rescued = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "stagesync_jobs_rescued_total",
		Help: "Running jobs of dead processes this process handed back (their process no longer held its liveness lock).",
	})
	m.conflictRatio = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_conflict_ratio",
		Help: "Share of the target's requests (every attempts row: writes, GETs after a conflict, batch lookups) answered with a conflict status (409/412) over its alert window (alert.window, default 15m); 0 without requests. Read from the database every 10s: every process reports the same value, aggregate with max.",
	}, []string{"target"})
	m.conflictRequests = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_conflict_window_requests",
		Help: "Requests made to the target over its alert window, the denominator of stagesync_conflict_ratio. The alert needs at least 20. Aggregate with max.",
	}, []string{"target"})
	m.conflictThreshold = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_conflict_ratio_threshold",
		Help: "The target's conflict-rate alert threshold (alert.conflict_rate, default 0.05), as registered. Aggregate with max.",
	}, []string{"target"})
	m.paused = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stagesync_target_paused",
		Help: "1 while the target is paused for every process after a 429 or 503 (targets.paused_until), else 0. Read every 10s; aggregate with max.",
	}, []string{"target"})
	if reg != nil {
		reg.MustRegister(m.requests, m.requestSeconds, m.conflicts, m.merges, m.changes, m.claimed, m.jobs,
			m.inflightLimit, m.rateShare, m.pauses, m.refused, m.rescued,
			m.conflictRatio, m.conflictRequests, m.conflictThreshold, m.paused)
	}
	m.batch = newBatchMetrics(reg)
	return m
}

func (m *Metrics) observeRequest(target, method string, status int, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	class := "error"
	if status > 0 {
		class = strconv.Itoa(status/100) + "xx"
	}
	m.requests.WithLabelValues(target, method, class, outcome).Inc()
	m.requestSeconds.WithLabelValues(target, method).Observe(d.Seconds())
	if outcome == outcomeConflict {
		m.conflicts.WithLabelValues(target).Inc()
	}
}

func (m *Metrics) observeMerge(target, outcome string) {
	if m != nil {
		m.merges.WithLabelValues(target, outcome).Inc()
	}
}

func (m *Metrics) observeFinished(target, status string, n int) {
	if m != nil && n > 0 {
		m.changes.WithLabelValues(target, status).Add(float64(n))
	}
}

func (m *Metrics) observeClaimed(target string, n int) {
	if m != nil && n > 0 {
		m.claimed.WithLabelValues(target).Add(float64(n))
	}
}

func (m *Metrics) observeJob(target, result string) {
	if m != nil {
		m.jobs.WithLabelValues(target, result).Inc()
	}
}

func (m *Metrics) setInflightLimit(target string, limit int) {
	if m != nil {
		m.inflightLimit.WithLabelValues(target).Set(float64(limit))
	}
}

func (m *Metrics) setRateShare(target string, share float64) {
	if m != nil {
		m.rateShare.WithLabelValues(target).Set(share)
	}
}

func (m *Metrics) observePause(target string) {
	if m != nil {
		m.pauses.WithLabelValues(target).Inc()
	}
}

func (m *Metrics) observeRefused(target string) {
	if m != nil {
		m.refused.WithLabelValues(target).Inc()
	}
}

func (m *Metrics) observeRescued(n int) {
	if m != nil && n > 0 {
		m.rescued.Add(float64(n))
	}
}

func (m *Metrics) setConflictAlert(a ConflictAlert, paused bool) {
	if m == nil {
		return
	}
	m.conflictRatio.WithLabelValues(a.Target).Set(a.Ratio())
	m.conflictRequests.WithLabelValues(a.Target).Set(float64(a.Requests))
	m.conflictThreshold.WithLabelValues(a.Target).Set(a.Threshold)
	p := 0.0
	if paused {
		p = 1
	}
	m.paused.WithLabelValues(a.Target).Set(p)
}
