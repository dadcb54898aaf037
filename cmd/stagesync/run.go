package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

func cmdRun(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "run", stdout)
	configPath := fs.String("config", "stagesync.yaml", "YAML config file")
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: the config's database_url, $DATABASE_URL, else the PG* variables as psql uses them)")
	listen := fs.String("listen", "", "address for /metrics, /healthz, /readyz and the status page (default: config listen, 127.0.0.1:9090)")
	logFormat := fs.String("log-format", "", "text or json (default: config log_format, text)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	migrate := fs.Bool("migrate", false, "apply migrations before starting (else a database lacking them is refused)")
	grace := fs.Duration("shutdown-grace", 0, "on SIGTERM/SIGINT, how long in-flight requests may finish before they are cancelled (default: config dispatch.shutdown_grace, 30s)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("run: unexpected arguments %q", pos)
	}
	if *grace < 0 {
		return fmt.Errorf("run: --shutdown-grace must not be negative, got %v", *grace)
	}
	cfg, err := processor.LoadConfig(*configPath, getenv)
	if err != nil {
		return err
	}
	if *grace > 0 {
		cfg.Dispatch.ShutdownGrace = processor.Duration(*grace)
	}
	if *listen != "" {
		cfg.Listen = *listen
	}
	if *logFormat != "" {
		cfg.LogFormat = *logFormat
	}
	logger, err := newLogger(os.Stderr, cfg.LogFormat, *logLevel)
	if err != nil {
		return err
	}
	src := resolveDatabase(*dbURL, cfg.DatabaseURL, getenv)
	return serve(ctx, serveOpts{cfg: cfg, databaseURL: src.url, databaseFrom: src.from, logger: logger, migrate: *migrate, stdout: stdout})
}

type serveOpts struct {
	cfg         *processor.Config
	databaseURL string
	// databaseFrom says where databaseURL came from, for errors.
	databaseFrom string
	logger       *slog.Logger
	migrate      bool
	stdout       io.Writer
	// ready, if set, receives the bound HTTP address once serving.
	ready chan<- string
	// sampleEvery is how often the status page's backlog history is
	// sampled. Defaults to 5s.
	sampleEvery time.Duration
	// idleTimeout closes keep-alive connections idle this long. Defaults
	// to httpIdleTimeout.
	idleTimeout time.Duration
	// pageLoader, if set, receives the status page's loader (tests count
	// its loads).
	pageLoader chan<- *pageLoader
	// historyPages, if set, receives the history pages' handler (tests
	// read how many lookups ran at once).
	historyPages chan<- *historyPages
}

// httpIdleTimeout closes idle keep-alive connections to the listener, so
// clients that keep them open (hundreds of browsers, a misbehaving
// scraper) can't hold file descriptors and goroutines indefinitely.
const httpIdleTimeout = 30 * time.Second

// serve runs the processor and its HTTP endpoints until ctx ends.
func serve(ctx context.Context, o serveOpts) error {
	cfg := o.cfg
	conns := int32(8)
	for _, t := range cfg.Targets {
		conns += int32(t.Workers)
	}
	pool, err := db.NewPool(ctx, o.databaseURL, conns)
	if err != nil {
		if o.databaseFrom != "" {
			return fmt.Errorf("%w (database from %s)", err, o.databaseFrom)
		}
		return err
	}
	defer pool.Close()
	if o.migrate {
		if err := db.Migrate(ctx, pool, o.logger); err != nil {
			return err
		}
	} else if err := requireMigrated(ctx, pool); err != nil {
		// Before anything listens or logs "serving": a process that can't
		// work must not look as if it did.
		return fmt.Errorf("%w (or start with --migrate)", err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := processor.NewMetrics(reg)
	p, err := processor.New(cfg, processor.Options{Pool: pool, Logger: o.logger, Metrics: metrics})
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metricsHandler(reg, pool, cfg.TargetNames(), o.logger))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /readyz", readyzHandler(pool, p.Started()))

	hist := newBacklogHistory(historySize)
	alerts := map[string]float64{}
	for name, t := range cfg.Targets {
		alerts[name] = t.Alert.ConflictRate
	}
	loader := newPageLoader(pool, hist, alerts, o.logger)
	if o.pageLoader != nil {
		o.pageLoader <- loader
	}
	mux.Handle("GET /{$}", statusPageHandler(loader))
	history := newHistoryPages(pool, o.logger)
	if o.historyPages != nil {
		o.historyPages <- history
	}
	mux.Handle("GET /history", history)

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	idle := o.idleTimeout
	if idle <= 0 {
		idle = httpIdleTimeout
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: idle}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()
	o.logger.InfoContext(ctx, "serving", "addr", ln.Addr().String())
	if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		// The page, /history and /metrics have no authentication of their
		// own: they show resource ids, staged values and remote errors.
		o.logger.WarnContext(ctx, "the status page, /history and /metrics are served beyond this machine without authentication; listen on 127.0.0.1 and put a proxy with authentication in front to share them",
			"addr", ln.Addr().String())
	}

	every := o.sampleEvery
	if every <= 0 {
		every = 5 * time.Second
	}
	sampleCtx, stopSampler := context.WithCancel(ctx)
	var sampler sync.WaitGroup
	sampler.Go(func() { sampleBacklog(sampleCtx, pool, hist, every, o.logger) })
	// Stopped on every return path, before the pool closes.
	defer func() {
		stopSampler()
		sampler.Wait()
	}()

	if o.ready != nil {
		o.ready <- ln.Addr().String()
	}

	runErr := p.Run(ctx)
	shutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	shutErr := srv.Shutdown(shutCtx)
	if err := <-srvErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("http server: %w", err)
	}
	return errors.Join(runErr, shutErr)
}

// readyzHandler answers 200 once the processor has started and the
// database answers with every migration applied, else 503 with the reason.
func readyzHandler(pool *pgxpool.Pool, started <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		rctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		select {
		case <-started:
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "starting")
			return
		}
		current, err := db.MigrationsCurrent(rctx, pool)
		switch {
		case err != nil:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "database unreachable")
		case !current:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "migrations pending: run `%s migrate up`\n", self)
		default:
			fmt.Fprintln(w, "ready")
		}
	})
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format: %q is not text or json", format)
	}
}

// Gauges read from the database at scrape time. They describe the shared
// database, so every process reports the same values: aggregate with max()
// rather than sum() across instances.
var (
	backlogDesc = prometheus.NewDesc("stagesync_backlog_changes",
		"Changes not yet in a terminal state, by target and status (pending, processing).",
		[]string{"target", "status"}, nil)
	oldestPendingDesc = prometheus.NewDesc("stagesync_backlog_oldest_pending_seconds",
		"Age of the oldest pending change, by target; 0 when nothing is pending.",
		[]string{"target"}, nil)
	riverJobsDesc = prometheus.NewDesc("stagesync_river_jobs",
		"River jobs not yet finished, by queue (stagesync_<target>, default) and state (available, running, scheduled, retryable, pending).",
		[]string{"queue", "state"}, nil)
	databaseUpDesc = prometheus.NewDesc("stagesync_database_up",
		"1 if the scrape-time database queries succeeded, else 0.",
		nil, nil)
)

// riverLiveStates are the River job states that still have work ahead.
var riverLiveStates = []string{"available", "pending", "retryable", "running", "scheduled"}

// scrapeTimeout bounds the database queries of one scrape, so a slow or
// unreachable database delays /metrics by at most this much.
const scrapeTimeout = 3 * time.Second

// metricsHandler serves the registry plus gauges queried from the database
// during the scrape, under the scrape request's context (prometheus'
// Collector interface has none, hence a per-scrape collector of values
// already read).
func metricsHandler(reg *prometheus.Registry, pool *pgxpool.Pool, targets []string, logger *slog.Logger) http.Handler {
	opts := promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), scrapeTimeout)
		defer cancel()
		gauges, err := databaseGauges(ctx, pool, targets)
		up := 1.0
		if err != nil {
			logger.WarnContext(ctx, "metrics: database gauges unavailable", "error", err)
			up = 0
			gauges = nil
		}
		gauges = append(gauges, prometheus.MustNewConstMetric(databaseUpDesc, prometheus.GaugeValue, up))
		scrape := prometheus.NewRegistry()
		scrape.MustRegister(constCollector{descs: []*prometheus.Desc{backlogDesc, oldestPendingDesc, riverJobsDesc, databaseUpDesc}, metrics: gauges})
		promhttp.HandlerFor(prometheus.Gatherers{reg, scrape}, opts).ServeHTTP(w, r)
	})
}

func databaseGauges(ctx context.Context, pool *pgxpool.Pool, targets []string) ([]prometheus.Metric, error) {
	backlog, err := db.New().StatusBacklog(ctx, pool)
	if err != nil {
		return nil, fmt.Errorf("read backlog: %w", err)
	}
	now := time.Now()
	var out []prometheus.Metric
	for _, b := range backlog {
		oldest := 0.0
		if b.Pending > 0 {
			oldest = max(0, now.Sub(b.OldestPendingAt).Seconds())
		}
		out = append(out,
			prometheus.MustNewConstMetric(backlogDesc, prometheus.GaugeValue, float64(b.Pending), b.Target, "pending"),
			prometheus.MustNewConstMetric(backlogDesc, prometheus.GaugeValue, float64(b.Processing), b.Target, "processing"),
			prometheus.MustNewConstMetric(oldestPendingDesc, prometheus.GaugeValue, oldest, b.Target))
	}
	jobs, err := riverJobs(ctx, pool)
	if err != nil {
		return nil, err
	}
	// The targets' queues report every state, zeros included, so their
	// series exist from the first scrape; other queues as found.
	for _, t := range targets {
		q := processor.QueueName(t)
		if jobs[q] == nil {
			jobs[q] = map[string]int64{}
		}
		for _, st := range riverLiveStates {
			if _, ok := jobs[q][st]; !ok {
				jobs[q][st] = 0
			}
		}
	}
	for _, q := range slices.Sorted(maps.Keys(jobs)) {
		for _, st := range slices.Sorted(maps.Keys(jobs[q])) {
			out = append(out, prometheus.MustNewConstMetric(riverJobsDesc, prometheus.GaugeValue, float64(jobs[q][st]), q, st))
		}
	}
	return out, nil
}

// constCollector emits metrics already computed.
type constCollector struct {
	descs   []*prometheus.Desc
	metrics []prometheus.Metric
}

func (c constCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c constCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.metrics {
		ch <- m
	}
}
