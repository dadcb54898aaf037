package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

func cmdRun(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stdout)
	configPath := fs.String("config", "stagesync.yaml", "YAML config file")
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: config database_url, $DATABASE_URL, then the local server)")
	listen := fs.String("listen", "", "address for /metrics, /healthz, /readyz and the status page (default: config listen, 127.0.0.1:9090)")
	logFormat := fs.String("log-format", "", "text or json (default: config log_format, text)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	migrate := fs.Bool("migrate", false, "apply migrations before starting")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := processor.LoadConfig(*configPath, getenv)
	if err != nil {
		return err
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
	url := *dbURL
	if url == "" {
		url = cfg.DatabaseURL
	}
	return serve(ctx, serveOpts{cfg: cfg, databaseURL: databaseURL(url, getenv), logger: logger, migrate: *migrate, stdout: stdout})
}

type serveOpts struct {
	cfg         *processor.Config
	databaseURL string
	logger      *slog.Logger
	migrate     bool
	stdout      io.Writer
	// ready, if set, receives the bound HTTP address once serving.
	ready chan<- string
}

// serve runs the processor and its HTTP endpoints until ctx ends.
func serve(ctx context.Context, o serveOpts) error {
	cfg := o.cfg
	conns := int32(8)
	for _, t := range cfg.Targets {
		conns += int32(t.Workers)
	}
	pool, err := db.NewPool(ctx, o.databaseURL, conns)
	if err != nil {
		return err
	}
	defer pool.Close()
	if o.migrate {
		if err := db.Migrate(ctx, pool, o.logger); err != nil {
			return err
		}
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := processor.NewMetrics(reg)
	p, err := processor.New(cfg, processor.Options{Pool: pool, Logger: o.logger, Metrics: metrics})
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		rctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		current, err := db.MigrationsCurrent(rctx, pool)
		switch {
		case err != nil:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "database unreachable")
		case !current:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "migrations pending: run stagesync migrate up")
		default:
			fmt.Fprintln(w, "ready")
		}
	})

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()
	o.logger.InfoContext(ctx, "serving", "addr", ln.Addr().String())
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
