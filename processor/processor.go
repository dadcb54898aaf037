// Package processor applies staged changes to remote APIs, one resource at a
// time: it claims pending changes into River jobs, serializes each resource
// with an advisory lock, writes with the stored ETag, resolves conflicts by a
// three-way merge and records every request and outcome.
package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/stagesync/stagesync/db"
)

// Options are what a Processor needs besides its config.
type Options struct {
	// Pool is the database. Its size must exceed the sum of targets'
	// Workers plus a few for River and the dispatcher.
	Pool *pgxpool.Pool
	// Logger receives the processor's and River's logs. Required.
	Logger *slog.Logger
	// Metrics, if nil, are created unregistered.
	Metrics *Metrics
	// HTTPClient, if nil, is a keep-alive client shared by all targets.
	HTTPClient *http.Client
}

// Processor is one stagesync process's share of the work: a River client
// working the targets' queues, a listener and a claimer.
type Processor struct {
	cfg     *Config
	pool    *pgxpool.Pool
	logger  *slog.Logger
	metrics *Metrics
	q       *db.Queries
	remotes map[string]*remote
	client  *river.Client[pgx.Tx]
	waker   *waker
	// wake carries claim requests (listener, finished jobs) to the
	// claimer; its buffer of one coalesces them.
	wake chan struct{}
}

// New validates the options and builds the River client. Nothing runs
// until Run.
func New(cfg *Config, opts Options) (*Processor, error) {
	if opts.Pool == nil || opts.Logger == nil {
		return nil, errors.New("processor: Pool and Logger are required")
	}
	p := &Processor{cfg: cfg, pool: opts.Pool, logger: opts.Logger, metrics: opts.Metrics, q: db.New(), remotes: map[string]*remote{}}
	p.waker = newWaker(opts.Logger)
	p.wake = make(chan struct{}, 1)
	if p.metrics == nil {
		p.metrics = NewMetrics(nil)
	}
	hc := opts.HTTPClient
	if hc == nil {
		hc = NewHTTPClient()
	}
	workers := river.NewWorkers()
	if err := river.AddWorkerSafely(workers, &applyWorker{p: p}); err != nil {
		return nil, fmt.Errorf("register apply worker: %w", err)
	}
	if err := river.AddWorkerSafely(workers, &dispatchWorker{p: p}); err != nil {
		return nil, fmt.Errorf("register dispatch worker: %w", err)
	}
	if err := river.AddWorkerSafely(workers, &retentionWorker{p: p}); err != nil {
		return nil, fmt.Errorf("register retention worker: %w", err)
	}
	queues := map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 2}}
	for name, t := range cfg.Targets {
		p.remotes[name] = newRemote(t, hc, p.metrics)
		queues[QueueName(name)] = river.QueueConfig{MaxWorkers: t.Workers}
	}
	client, err := river.NewClient(riverpgxv5.New(opts.Pool), &river.Config{
		Logger:  opts.Logger.With("component", "river"),
		Queues:  queues,
		Workers: workers,
		// River wakes producers by LISTEN/NOTIFY on insert; a short
		// cooldown keeps insert-to-start latency in milliseconds. Jobs the
		// waker makes available early send no notification, so producers
		// also poll often (an indexed query per queue).
		FetchCooldown:        5 * time.Millisecond,
		FetchPollInterval:    100 * time.Millisecond,
		RescueStuckJobsAfter: cfg.Dispatch.RescueAfter.D(),
		// Apply jobs set their own timeout (applyWorker.Timeout), never
		// beyond RescueAfter, so a live job is not rescued as a dead one.
		JobTimeout:      cfg.Dispatch.RescueAfter.D(),
		SoftStopTimeout: cfg.Dispatch.ShutdownGrace.D(),
		PeriodicJobs: append([]*river.PeriodicJob{
			river.NewPeriodicJob(river.PeriodicInterval(cfg.Dispatch.PollInterval.D()),
				func() (river.JobArgs, *river.InsertOpts) { return DispatchArgs{}, nil },
				&river.PeriodicJobOpts{RunOnStart: true}),
		}, retentionPeriodicJobs(cfg)...),
	})
	if err != nil {
		return nil, fmt.Errorf("create river client: %w", err)
	}
	p.client = client
	return p, nil
}

// NewHTTPClient returns the keep-alive client the processor uses by
// default: enough idle connections per host for the targets' concurrency,
// no client-wide timeout (each request has its target's).
func NewHTTPClient() *http.Client {
	return &http.Client{
		// Never follow redirects: Go re-sends a custom auth header to any
		// host it is sent to (only Authorization and Cookie are dropped
		// across hosts), and 307/308 replay writes. A redirect is an answer
		// to record, not to chase.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        512,
			MaxIdleConnsPerHost: 128,
			IdleConnTimeout:     90 * time.Second,
			ForceAttemptHTTP2:   true,
		}}
}

// RegisterTargets writes the configured targets to stagesync.targets so
// that the upstream's inserts can reference them.
func (p *Processor) RegisterTargets(ctx context.Context) error {
	for _, name := range p.cfg.TargetNames() {
		t := p.cfg.Targets[name]
		settings, err := json.Marshal(t.Settings())
		if err != nil {
			return fmt.Errorf("encode settings of target %q: %w", name, err)
		}
		err = p.q.TargetUpsert(ctx, p.pool, db.TargetUpsertParams{
			Name: name, BaseURL: t.BaseURL, ItemPath: t.ItemPath, UpdateMethod: t.UpdateMethod, Settings: settings,
		})
		if err != nil {
			return fmt.Errorf("register target %q: %w", name, err)
		}
	}
	return nil
}

// Run registers the targets, starts River, the listener and the claimer,
// and works until ctx ends. Then it stops fetching jobs, lets running jobs
// finish within Dispatch.ShutdownGrace (after which their requests are
// cancelled and recorded as failures with a retry job), and returns nil.
func (p *Processor) Run(ctx context.Context) error {
	if err := p.RegisterTargets(ctx); err != nil {
		return err
	}
	// River gets its own context: stopping is done explicitly below so that
	// running jobs get their grace period.
	if err := p.client.Start(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("start river: %w", err)
	}
	p.waker.start(context.WithoutCancel(ctx), p.client)
	var wg sync.WaitGroup
	wg.Go(func() { p.listen(ctx) })
	wg.Go(func() { p.claimLoop(ctx) })
	p.logger.InfoContext(ctx, "processor started", "targets", p.cfg.TargetNames())

	<-ctx.Done()
	wg.Wait()
	p.logger.Info("processor stopping: waiting for running jobs", "grace", p.cfg.Dispatch.ShutdownGrace.D().String())
	stopCtx, cancel := context.WithTimeout(context.Background(), p.cfg.Dispatch.ShutdownGrace.D()+30*time.Second)
	defer cancel()
	err := p.client.Stop(stopCtx)
	p.waker.stop()
	if err != nil {
		return fmt.Errorf("stop river: %w", err)
	}
	p.logger.Info("processor stopped")
	return nil
}
