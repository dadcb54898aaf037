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
	if reg != nil {
		reg.MustRegister(m.requests, m.requestSeconds, m.conflicts, m.merges, m.changes, m.claimed, m.jobs)
	}
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
