// Package processor applies staged changes to remote APIs, one resource at a
// time: it claims pending changes into River jobs, serializes each resource
// with an advisory lock, writes with the stored ETag, resolves conflicts by a
// three-way merge and records every request and outcome.
package processor

import (
	"context"
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
	// MonitorEvery is how often the targets' conflict rates over their
	// alert windows are read (stagesync_conflict_ratio, the alert's log
	// lines). Defaults to 10s.
	MonitorEvery time.Duration
	// ProgressEvery is how often a progress line per target is logged
	// while there is work. Defaults to 30s.
	ProgressEvery time.Duration
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
	// started is closed once Run has everything running.
	started chan struct{}
	// wake carries claim requests (listener, finished jobs) to the
	// claimer; its buffer of one coalesces them.
	wake chan struct{}
	// live is this process's liveness lock and processes row.
	live *liveness
	// pauses queues the target pauses this process starts, for the others.
	pauses *pauseShare
	// pausesNow and sharesNow ask the coordination loop to read the
	// targets' pauses, or the live processes (rate shares), at once: a
	// notification said they changed. Buffers of one coalesce them.
	pausesNow chan struct{}
	sharesNow chan struct{}
	// lifts is when each target's pause was last lifted by
	// stagesync.lift_pause, as this process last read it (nil until the
	// first read); only applyPauses, on one goroutine at a time, uses it.
	lifts map[string]time.Time
	// rewake is when to wake a lifted target's scheduled jobs once more:
	// a job in flight at the lift may record a retry for the old pause's
	// end just after it.
	rewake map[string]time.Time
	// mon is the monitor loop's state (monitor.go).
	mon *monitor
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
	p.started = make(chan struct{})
	p.pauses = newPauseShare()
	p.pausesNow = make(chan struct{}, 1)
	p.sharesNow = make(chan struct{}, 1)
	p.mon = newMonitor(opts)
	if p.metrics == nil {
		p.metrics = NewMetrics(nil)
	}
	live, err := newLiveness(opts.Pool.Config().ConnConfig, cfg.TargetNames(), opts.Logger)
	if err != nil {
		return nil, err
	}
	p.live = live
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
		r := newRemote(t, hc, p.metrics)
		r.gate.attach(opts.Logger, p.metrics, p.pauses.add)
		r.attachBatch(opts.Logger, opts.Pool)
		p.remotes[name] = r
		queues[QueueName(name)] = river.QueueConfig{MaxWorkers: t.Workers}
	}
	client, err := river.NewClient(riverpgxv5.New(opts.Pool), &river.Config{
		// Chosen here, not by River, so that the processes row and the
		// liveness lock exist before River fetches its first job: a job's
		// attempted_by names a process other processes can check.
		ID:      live.clientID,
		Logger:  slog.New(riverLogHandler{opts.Logger.With("component", "river").Handler()}),
		Queues:  queues,
		Workers: workers,
		// River wakes producers by LISTEN/NOTIFY on insert; a short
		// cooldown keeps insert-to-start latency in milliseconds. Jobs the
		// waker makes available early send no notification, so producers
		// also poll often (an indexed query per queue).
		FetchCooldown:     5 * time.Millisecond,
		FetchPollInterval: 100 * time.Millisecond,
		// Dead processes are found by liveness (liveness.go) within
		// seconds; River's rescuer is only the distant backstop for a job
		// whose process left no processes row (a process of an older
		// version). Every apply job ends well before RescueAfter
		// (applyWorker.Timeout), so a live job is never rescued by it.
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
	return RegisterTargets(ctx, p.pool, p.cfg)
}

// ClientID is this process's River client ID, also its
// stagesync.processes row and target_health rows.
func (p *Processor) ClientID() string { return p.live.clientID }

// Started is closed once Run has River, the listener and the claimer
// running: until then the process is not ready for work (/readyz says so).
func (p *Processor) Started() <-chan struct{} { return p.started }

// Run registers the targets and this process (its liveness lock), starts
// River, the listener, the claimer and the coordination loop, and works
// until ctx ends. Then it stops fetching jobs, lets running jobs finish
// within Dispatch.ShutdownGrace (after which their requests are cancelled
// and recorded as failures with a retry job), unregisters, and returns nil.
func (p *Processor) Run(ctx context.Context) error {
	if err := p.RegisterTargets(ctx); err != nil {
		return err
	}
	// The liveness lock, the pause publisher and the coordination loop
	// outlive ctx until River has stopped: jobs finishing in their grace
	// period belong to a live process and still pass the gates.
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBg()
	if err := p.live.start(ctx); err != nil {
		return err
	}
	// The rate shares and pauses in force before the first request.
	if err := errors.Join(p.refreshShares(ctx), p.applyPauses(ctx)); err != nil {
		p.live.stop(bg)
		return err
	}
	var bgWG sync.WaitGroup
	bgWG.Go(func() { p.live.hold(bg) })
	bgWG.Go(func() { p.publishPauses(bg) })
	bgWG.Go(func() { p.coordinate(bg) })
	bgWG.Go(func() { p.runMonitor(bg) })
	stopCoordination := func() {
		stopBg()
		bgWG.Wait()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		p.live.stop(rctx)
	}
	// River gets its own context: stopping is done explicitly below so that
	// running jobs get their grace period.
	if err := p.client.Start(context.WithoutCancel(ctx)); err != nil {
		stopCoordination()
		return fmt.Errorf("start river: %w", err)
	}
	p.waker.start(context.WithoutCancel(ctx), p.client)
	var wg sync.WaitGroup
	wg.Go(func() { p.listen(ctx) })
	wg.Go(func() { p.claimLoop(ctx) })
	p.logger.InfoContext(ctx, "processor started", "targets", p.cfg.TargetNames(), "client_id", p.live.clientID)
	close(p.started)

	<-ctx.Done()
	wg.Wait()
	p.logger.Info("processor stopping: waiting for running jobs", "grace", p.cfg.Dispatch.ShutdownGrace.D().String())
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.Dispatch.ShutdownGrace.D()+30*time.Second)
	defer cancel()
	err := p.client.Stop(stopCtx)
	p.waker.stop()
	stopCoordination()
	if err != nil {
		return fmt.Errorf("stop river: %w", err)
	}
	p.logger.Info("processor stopped")
	return nil
}

// coordinate runs this process's part of the coordination between
// processes until ctx ends: every rescueEvery it hands back the jobs of
// dead processes and reads the targets' pauses; every healthEvery it
// refreshes its rate shares and writes target_health; and it reads pauses
// or shares at once when a notification says they changed.
func (p *Processor) coordinate(ctx context.Context) {
	fast := time.NewTicker(rescueEvery)
	defer fast.Stop()
	slow := time.NewTicker(healthEvery)
	defer slow.Stop()
	var errs coordErrors
	// step runs one step with a deadline, so an unresponsive database
	// delays the next check rather than stopping them all.
	step := func(name string, f func(context.Context) error) {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		errs.note(ctx, p.logger, name, f(sctx))
	}
	paused := p.pausedTargets()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.pausesNow:
			step("pauses", p.applyPauses)
		case <-p.sharesNow:
			step("shares", p.refreshShares)
		case <-fast.C:
			var dead bool
			step("rescue", func(ctx context.Context) (err error) {
				dead, err = p.rescueDead(ctx)
				return err
			})
			if dead {
				step("shares", p.refreshShares)
			}
			step("pauses", p.applyPauses)
			// Claims skip paused targets: claim what waited once a
			// pause is over.
			now := p.pausedTargets()
			for name := range paused {
				if !now[name] {
					p.wakeClaimer()
				}
			}
			paused = now
		case <-slow.C:
			step("shares", p.refreshShares)
			step("health", p.writeHealth)
		}
	}
}

// coordErrors logs a coordination step's failure once when it starts
// failing and once when it works again, not every second.
type coordErrors map[string]bool

func (e *coordErrors) note(ctx context.Context, logger *slog.Logger, step string, err error) {
	if *e == nil {
		*e = coordErrors{}
	}
	failing := (*e)[step]
	switch {
	case err != nil && ctx.Err() != nil:
	case err != nil && !failing:
		(*e)[step] = true
		logger.WarnContext(ctx, "coordination with the other processes failing; retrying", "step", step, "error", err)
	case err == nil && failing:
		(*e)[step] = false
		logger.InfoContext(ctx, "coordination with the other processes works again", "step", step)
	}
}

// signal asks a coalescing channel's reader to act.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// riverLogHandler passes River's log records at WARN and above, and the
// rest only when the processor's handler logs at debug: at info River
// repeats maintenance lines ("Producer job counts" every 5s) that would
// drown the processor's own.
type riverLogHandler struct{ slog.Handler }

func (h riverLogHandler) Enabled(ctx context.Context, level slog.Level) bool {
	if level < slog.LevelWarn && !h.Handler.Enabled(ctx, slog.LevelDebug) {
		return false
	}
	return h.Handler.Enabled(ctx, level)
}

func (h riverLogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return riverLogHandler{h.Handler.WithAttrs(attrs)}
}

func (h riverLogHandler) WithGroup(name string) slog.Handler {
	return riverLogHandler{h.Handler.WithGroup(name)}
}
