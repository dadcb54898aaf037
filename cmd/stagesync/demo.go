package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// The demo plays every part on one machine: the CRM (goroutines inserting
// into stagesync.changes), the remote API (the simulator, in process, with
// other users and faults) and stagesync itself (the processor, in process).
// Only PostgreSQL is external.
const (
	demoTarget     = "territory"
	demoSource     = "crm"
	demoItemPrefix = "/assignments"
	demoBatches    = 5  // concurrent upstream sync jobs
	demoTxRows     = 25 // rows per upstream transaction
	// demoManualID and demoInvalidID are the resources of the two changes
	// that must end needing a person: a manual-policy conflict and a value
	// the remote refuses.
	demoManualID  = "acct-9001"
	demoInvalidID = "acct-9002"
	// demoOtherUsersRate is edits per second by people in the remote system.
	demoOtherUsersRate = 40
	// Every 429 and 503 pauses the whole target for its Retry-After (a
	// second at least), as a real remote asks: a handful shows it without
	// making the demo a study in waiting.
	demoErrorRate     = 0.01
	demoRateLimitRate = 0.004
)

var demoDBNameRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

type demoOpts struct {
	adminURL string
	dbName   string
	changes  int
	drop     bool
	seed     int64
	latency  time.Duration
	timeout  time.Duration
	logLevel string
	stdout   io.Writer
	logOut   io.Writer
}

func cmdDemo(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	o, err := parseDemoFlags(ctx, args, getenv, stdout)
	if err != nil {
		return err
	}
	o.logOut = os.Stderr
	return demo(ctx, o)
}

func parseDemoFlags(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) (demoOpts, error) {
	fs := newFlagSet(ctx, "demo", stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL server to use (default $DATABASE_URL, else the PG* variables as psql uses them); the demo creates its own database there")
	dbName := fs.String("demo-db", "stagesync_demo", "name of the demo database, dropped and recreated at start")
	changes := fs.Int("changes", 500, "how many changes the simulated CRM stages (10 to 100000)")
	drop := fs.Bool("drop", false, "drop the demo database at the end (by default it is kept for you to query)")
	seed := fs.Int64("seed", 1, "random seed of the workload, the remote's faults and its other users")
	latency := fs.Duration("latency", 20*time.Millisecond, "latency of every request to the simulated remote")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up if the backlog hasn't drained by then")
	logLevel := fs.String("log-level", "error", "level of the processor's log on stderr: debug, info, warn or error")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return demoOpts{}, err
	}
	switch {
	case len(pos) > 0:
		return demoOpts{}, fmt.Errorf("demo: unexpected arguments %q", pos)
	case *changes < 10 || *changes > 100_000:
		return demoOpts{}, fmt.Errorf("demo: --changes must be between 10 and 100000, got %d", *changes)
	case !demoDBNameRE.MatchString(*dbName):
		return demoOpts{}, fmt.Errorf("demo: --demo-db %q: use lowercase letters, digits and _ (it is dropped and recreated)", *dbName)
	case *latency < 0:
		return demoOpts{}, fmt.Errorf("demo: --latency must not be negative, got %v", *latency)
	case *timeout <= 0:
		return demoOpts{}, fmt.Errorf("demo: --timeout must be positive, got %v", *timeout)
	}
	return demoOpts{
		adminURL: databaseURL(*dbURL, getenv), dbName: *dbName, changes: *changes, drop: *drop,
		seed: *seed, latency: *latency, timeout: *timeout, logLevel: *logLevel, stdout: stdout,
	}, nil
}

// demo runs the whole demo and returns only when everything it started has
// stopped: processor, simulator, other users, seeding goroutines and pools.
func demo(ctx context.Context, o demoOpts) (err error) {
	w := o.stdout
	logger, err := newLogger(o.logOut, "text", o.logLevel)
	if err != nil {
		return err
	}
	dbURL, shownURL, err := demoDatabaseURL(o.adminURL, o.dbName)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "stagesync demo: %d territory assignments from a simulated CRM into a simulated ETag-guarded API\n\n", o.changes)

	if err := recreateDatabase(ctx, o.adminURL, o.dbName); err != nil {
		return err
	}
	if o.drop {
		// Deferred first, so it runs after the pool below is closed.
		defer func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			err = errors.Join(err, dropDatabase(dctx, o.adminURL, o.dbName))
		}()
	}
	pool, err := db.NewPool(ctx, dbURL, 40)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := db.Migrate(ctx, pool, logger); err != nil {
		return err
	}
	fmt.Fprintf(w, "  database   %s (created fresh, migrated)\n", shownURL)

	// The remote: accounts that exist before the CRM sends anything.
	sim := remotesim.New(remotesim.Options{
		ItemPrefix: demoItemPrefix, ConflictStatus: http.StatusPreconditionFailed,
		IdempotencyCache: true, RetryAfter: time.Second, Seed: o.seed,
	})
	rng := rand.New(rand.NewPCG(uint64(o.seed), 0x5eed))
	accounts := seedRemote(sim, rng, demoAccounts(o.changes))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the simulator: %w", err)
	}
	srv := &http.Server{Handler: sim, ReadHeaderTimeout: 10 * time.Second}
	var simWG sync.WaitGroup
	simWG.Go(func() { _ = srv.Serve(ln) }) // ErrServerClosed after Shutdown below
	hc := processor.NewHTTPClient()
	defer func() {
		// The processor has stopped by now (deferred later, so run
		// earlier). Closing its idle connections first matters: a
		// connection the client dialled but never used counts as active
		// to Shutdown for five seconds.
		hc.CloseIdleConnections()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close() // nothing of the demo is waiting for an answer any more
		}
		simWG.Wait()
	}()
	baseURL := "http://" + ln.Addr().String()
	fmt.Fprintf(w, "  remote     %s%s: simulator with %d accounts, %v latency, %.0f%% 5xx, %.0f%% 429,\n", baseURL, demoItemPrefix, len(accounts)+2, o.latency, demoErrorRate*100, demoRateLimitRate*100)
	fmt.Fprintf(w, "             other users editing owner and status %d times a second\n", demoOtherUsersRate)
	fmt.Fprintf(w, "  policies   status: ours (the CRM wins), owner: theirs (a person's edit wins), region: manual (ask a person)\n")

	// stagesync itself.
	cfg, err := processor.ParseConfig([]byte(demoConfig(baseURL)), func(string) string { return "" })
	if err != nil {
		return fmt.Errorf("demo config: %w", err)
	}
	p, err := processor.New(cfg, processor.Options{Pool: pool, Logger: logger, HTTPClient: hc})
	if err != nil {
		return err
	}
	// Registered before Run so the CRM's inserts pass the target FK at once.
	if err := p.RegisterTargets(ctx); err != nil {
		return err
	}
	procCtx, stopProc := context.WithCancel(ctx)
	var procWG sync.WaitGroup
	var procErr error
	procWG.Go(func() { procErr = p.Run(procCtx) })
	stopped := false
	// stopProcessor stops it and returns Run's error, once.
	stopProcessor := func() error {
		if stopped {
			return nil
		}
		stopped = true
		stopProc()
		procWG.Wait()
		return procErr
	}
	defer func() { err = errors.Join(err, stopProcessor()) }()

	// The deterministic manual conflict, staged before the crowd arrives.
	if err := stageManualConflict(ctx, pool, sim); err != nil {
		return err
	}

	// Now the realistic part: faults, people editing, the CRM's batches.
	sim.SetFaults(remotesim.Faults{Latency: o.latency, ErrorRate: demoErrorRate, RateLimitRate: demoRateLimitRate})
	stopUsers := sim.StartOtherUsers(ctx, demoOtherUsersRate, []string{"owner", "status"})
	defer stopUsers()

	plan := planCRM(rng, accounts, o.changes-2)
	fmt.Fprintf(w, "\nstaging %d changes from the CRM in %d concurrent batches, draining as they arrive…\n", o.changes, demoBatches)
	started := time.Now()
	seedCtx, stopSeeding := context.WithCancel(ctx)
	seeded := make(chan seedResult, 1)
	var seedWG sync.WaitGroup
	seedWG.Go(func() { seeded <- seedCRM(seedCtx, pool, plan) })
	defer func() {
		stopSeeding()
		seedWG.Wait()
	}()

	bar := newProgressBar(w, time.Second)
	seed, drainErr := waitDrained(ctx, pool, seeded, o.timeout, bar)
	if drainErr != nil {
		return drainErr
	}
	elapsed := time.Since(started)
	bar.finish(int64(o.changes), int64(o.changes), "done in "+elapsed.Round(10*time.Millisecond).String())

	// Everything is terminal: stop the people, the processor and the remote
	// before reading the figures, so they are final.
	stopUsers()
	if err := stopProcessor(); err != nil {
		return fmt.Errorf("processor: %w", err)
	}
	rep, err := collectDemoReport(ctx, pool, sim)
	if err != nil {
		return err
	}
	rep.resent, rep.elapsed, rep.shownURL, rep.dbName, rep.kept = seed.resent, elapsed, shownURL, o.dbName, !o.drop
	writeDemoReport(w, rep)
	if rep.total != int64(o.changes) {
		return fmt.Errorf("demo: %d changes in the database, want %d: an upstream retry was not absorbed", rep.total, o.changes)
	}
	return nil
}

// demoAccounts is how many accounts the remote holds: about 2.5 changes
// per account, so many resources see several changes (coalescing) and other
// users' edits land on resources being written (conflicts).
func demoAccounts(changes int) int {
	return min(400, max(5, changes*2/5))
}

var demoRegions = []string{"EMEA", "NA-East", "NA-West", "APAC"}

// seedRemote creates the accounts in the simulator and returns the ids
// the CRM may change (not the two special ones).
func seedRemote(sim *remotesim.Sim, rng *rand.Rand, n int) []string {
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("acct-%04d", i+1)
		sim.Put(ids[i], map[string]any{
			"name":      fmt.Sprintf("Account %d", i+1),
			"territory": fmt.Sprintf("T-%02d", rng.IntN(20)+1),
			"owner":     fmt.Sprintf("rep-%02d", rng.IntN(30)+1),
			"status":    "active",
			"region":    demoRegions[i%len(demoRegions)],
		})
	}
	for _, id := range []string{demoManualID, demoInvalidID} {
		sim.Put(id, map[string]any{"name": "Account " + id, "territory": "T-01", "owner": "rep-01", "status": "active", "region": "EMEA"})
	}
	return ids
}

func demoConfig(baseURL string) string {
	return `# The demo's processor config: one PATCH API with a batch ETag endpoint.
dispatch:
  poll_interval: 500ms
  shutdown_grace: 5s
targets:
  ` + demoTarget + `:
    base_url: ` + baseURL + `
    item_path: ` + demoItemPrefix + `/{id}
    update_method: PATCH
    batch_etag_path: ` + demoItemPrefix + `
    batch_size: 50
    concurrency: 16
    workers: 4
    timeout: 5s
    max_attempts: 10
    backoff: {base: 100ms, max: 2s}
    merge:
      default: ours
      fields: {status: ours, owner: theirs, region: manual}
`
}

// demoRow is one change as the CRM sends it.
type demoRow struct {
	ResourceID     string         `json:"resource_id"`
	Fields         map[string]any `json:"fields"`
	IdempotencyKey string         `json:"idempotency_key"`
}

// demoTx is one upstream transaction; retry means the CRM sends it again
// after the commit (as if the acknowledgement was lost).
type demoTx struct {
	rows  []demoRow
	retry bool
}

// planCRM spreads n changes over the concurrent batches. One of them sets a
// value the remote refuses.
func planCRM(rng *rand.Rand, accounts []string, n int) [][]demoTx {
	rows := make([][]demoRow, demoBatches)
	invalidAt := n / 2
	for i := range n {
		b := i % demoBatches
		key := fmt.Sprintf("crm-%d-%05d", b, len(rows[b]))
		if i == invalidAt {
			rows[b] = append(rows[b], demoRow{ResourceID: demoInvalidID, Fields: map[string]any{"status": "INVALID"}, IdempotencyKey: key})
			continue
		}
		id := accounts[rng.IntN(len(accounts))]
		var fields map[string]any
		switch r := rng.Float64(); {
		case r < 0.6: // reassignment
			fields = map[string]any{
				"territory": fmt.Sprintf("T-%02d", rng.IntN(20)+1),
				"owner":     fmt.Sprintf("rep-%02d", rng.IntN(30)+1),
				"status":    "assigned",
			}
		case r < 0.85:
			fields = map[string]any{"status": []string{"active", "prospect", "on_hold", "churn_risk"}[rng.IntN(4)]}
		default:
			fields = map[string]any{"owner": fmt.Sprintf("rep-%02d", rng.IntN(30)+1)}
		}
		rows[b] = append(rows[b], demoRow{ResourceID: id, Fields: fields, IdempotencyKey: key})
	}
	plan := make([][]demoTx, demoBatches)
	for b, rs := range rows {
		for chunk := range slices.Chunk(rs, demoTxRows) {
			plan[b] = append(plan[b], demoTx{rows: chunk, retry: rng.Float64() < 0.25})
		}
	}
	return plan
}

type seedResult struct {
	inserted, resent int64
	err              error
}

// seedCRM runs the batches concurrently, each a sequence of transactions
// paced like a sync job, and re-sends the transactions marked retry.
func seedCRM(ctx context.Context, pool *pgxpool.Pool, plan [][]demoTx) seedResult {
	var inserted, resent atomic.Int64
	errs := make([]error, len(plan))
	var wg sync.WaitGroup
	for b, txs := range plan {
		wg.Go(func() {
			for i, tx := range txs {
				n, err := insertCRMTx(ctx, pool, tx.rows)
				if err != nil {
					errs[b] = fmt.Errorf("CRM batch %d, transaction %d: %w", b, i, err)
					return
				}
				inserted.Add(n)
				if tx.retry {
					n, err := insertCRMTx(ctx, pool, tx.rows)
					if err != nil {
						errs[b] = fmt.Errorf("CRM batch %d, retry of transaction %d: %w", b, i, err)
						return
					}
					if n != 0 {
						errs[b] = fmt.Errorf("CRM batch %d: the retry of transaction %d inserted %d duplicates", b, i, n)
						return
					}
					resent.Add(int64(len(tx.rows)))
				}
				select {
				case <-ctx.Done():
					errs[b] = ctx.Err()
					return
				case <-time.After(40 * time.Millisecond):
				}
			}
		})
	}
	wg.Wait()
	return seedResult{inserted: inserted.Load(), resent: resent.Load(), err: errors.Join(errs...)}
}

func insertCRMTx(ctx context.Context, pool *pgxpool.Pool, rows []demoRow) (int64, error) {
	raw, err := json.Marshal(rows)
	if err != nil {
		return 0, fmt.Errorf("encode rows: %w", err)
	}
	var ids []int64
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		ids, err = db.New().DemoChangesInsert(ctx, tx, db.DemoChangesInsertParams{Target: demoTarget, Source: demoSource, Rows: raw})
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("insert %d changes: %w", len(rows), err)
	}
	return int64(len(ids)), nil
}

// stageManualConflict makes the one change that must end dead with
// needs_review, deterministically: sync a change to the account so its
// ETag and snapshot are stored, let a person change its region in the
// remote, then stage a different region from the CRM. The write conflicts,
// the merge finds both sides changed a manual field, and stops.
func stageManualConflict(ctx context.Context, pool *pgxpool.Pool, sim *remotesim.Sim) error {
	q := db.New()
	stage := func(key string, fields map[string]any) (int64, error) {
		raw, err := json.Marshal([]demoRow{{ResourceID: demoManualID, Fields: fields, IdempotencyKey: key}})
		if err != nil {
			return 0, fmt.Errorf("encode change: %w", err)
		}
		ids, err := q.DemoChangesInsert(ctx, pool, db.DemoChangesInsertParams{Target: demoTarget, Source: demoSource, Rows: raw})
		if err != nil {
			return 0, fmt.Errorf("stage change to %s: %w", demoManualID, err)
		}
		if len(ids) != 1 {
			return 0, fmt.Errorf("stage change to %s: inserted %d rows, want 1", demoManualID, len(ids))
		}
		return ids[0], nil
	}
	first, err := stage("crm-manual-1", map[string]any{"territory": "T-07", "status": "assigned"})
	if err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := q.DemoChangeGet(ctx, pool, first)
		if err != nil {
			return fmt.Errorf("read change %d: %w", first, err)
		}
		if c.Status == "applied" {
			break
		}
		if c.Status != "pending" && c.Status != "processing" {
			return fmt.Errorf("demo: the first change to %s ended %s, want applied (last error: %s)", demoManualID, c.Status, deref(c.LastError))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("demo: the first change to %s is still %s after 30s; is the processor running?", demoManualID, c.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	if _, ok := sim.Edit(demoManualID, map[string]any{"region": "EMEA-North"}, "sales-ops"); !ok {
		return fmt.Errorf("demo: account %s is missing from the simulator", demoManualID)
	}
	_, err = stage("crm-manual-2", map[string]any{"region": "EMEA-South"})
	return err
}

// waitDrained draws progress until the CRM has sent everything and no
// change is pending or processing.
func waitDrained(ctx context.Context, pool *pgxpool.Pool, seeded <-chan seedResult, timeout time.Duration, bar *progressBar) (seedResult, error) {
	q := db.New()
	deadline := time.Now().Add(timeout)
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	var res seedResult
	done := false
	for {
		select {
		case <-ctx.Done():
			bar.end("interrupted")
			return res, fmt.Errorf("demo interrupted; everything it started is stopped: %w", ctx.Err())
		case res = <-seeded:
			if res.err != nil {
				return res, res.err
			}
			done = true
		case <-ticker.C:
		}
		counts, err := q.ChangesCountByStatus(ctx, pool)
		if err != nil {
			return res, fmt.Errorf("count changes: %w", err)
		}
		var total, open int64
		for _, c := range counts {
			total += c.N
			if c.Status == "pending" || c.Status == "processing" {
				open += c.N
			}
		}
		bar.update(time.Now(), total-open, total)
		if done && open == 0 {
			return res, nil
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("demo: the backlog did not drain within %v (%d of %d changes still open); see the log with --log-level info", timeout, open, total)
		}
	}
}

// demoReport holds the figures of the final report.
type demoReport struct {
	total     int64
	byStatus  map[string]int64
	requests  int64
	byKind    map[string]int64 // PATCH, GET, batch GET, …
	conflicts int64
	faults    int
	// throttled are the injected answers that paused the target (429, 503).
	throttled   int
	otherEdits  int
	deadLetters []db.DeadLetter
	resent      int64
	elapsed     time.Duration
	shownURL    string
	dbName      string
	kept        bool
}

func collectDemoReport(ctx context.Context, pool *pgxpool.Pool, sim *remotesim.Sim) (*demoReport, error) {
	q := db.New()
	rep := &demoReport{byStatus: map[string]int64{}, byKind: map[string]int64{}}
	counts, err := q.ChangesCountByStatus(ctx, pool)
	if err != nil {
		return nil, fmt.Errorf("count changes: %w", err)
	}
	for _, c := range counts {
		rep.total += c.N
		rep.byStatus[c.Status] += c.N
	}
	attempts, err := q.AttemptsCountSince(ctx, pool, time.Time{})
	if err != nil {
		return nil, fmt.Errorf("count requests: %w", err)
	}
	for _, a := range attempts {
		rep.requests += a.N
		kind := a.Method
		if a.Batch {
			kind = "batch " + a.Method
		}
		rep.byKind[kind] += a.N
		if a.Outcome == "conflict" {
			rep.conflicts += a.N
		}
	}
	if rep.deadLetters, err = q.DeadLettersLatest(ctx, pool, 100); err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	rep.faults = sim.Stats().Faults
	for _, r := range sim.Requests() {
		if r.Fault != "" && (r.Status == http.StatusTooManyRequests || r.Status == http.StatusServiceUnavailable) {
			rep.throttled++
		}
	}
	for _, id := range sim.IDs() {
		for _, v := range sim.History(id) {
			if v.Writer == "other-user" || v.Writer == "sales-ops" {
				rep.otherEdits++
			}
		}
	}
	return rep, nil
}

func writeDemoReport(w io.Writer, r *demoReport) {
	fmt.Fprintf(w, "\nREPORT\n")
	fmt.Fprintf(w, "  changes     %d staged by the CRM", r.total)
	if r.resent > 0 {
		fmt.Fprintf(w, " (+%d rows re-sent by upstream retries, absorbed by their idempotency keys)", r.resent)
	}
	fmt.Fprintln(w)
	for _, s := range terminalStates {
		fmt.Fprintf(w, "  %-10s %5d\n", s, r.byStatus[s])
	}
	if open := r.byStatus["pending"] + r.byStatus["processing"]; open > 0 {
		fmt.Fprintf(w, "  %-10s %5d\n", "still open", open)
	}
	perChange := 0.0
	if r.total > 0 {
		perChange = float64(r.requests) / float64(r.total)
	}
	kinds := slices.Sorted(maps.Keys(r.byKind))
	parts := make([]string, len(kinds))
	for i, k := range kinds {
		parts[i] = k + " " + strconv.FormatInt(r.byKind[k], 10)
	}
	fmt.Fprintf(w, "  requests    %d to the remote = %.2f per change (%s)\n", r.requests, perChange, strings.Join(parts, ", "))
	rate := 0.0
	if r.requests > 0 {
		rate = float64(r.conflicts) / float64(r.requests)
	}
	fmt.Fprintf(w, "  conflicts   %d = %s of requests (412 ETag mismatch after %d edits by people in the remote), resolved by field-level merge\n",
		r.conflicts, formatPercent(rate), r.otherEdits)
	fmt.Fprintf(w, "  faults      %d injected 5xx/429 answers, all retried", r.faults)
	if r.throttled > 0 {
		fmt.Fprintf(w, "; %d of them (429, 503) paused the target for their Retry-After, with nothing sent meanwhile", r.throttled)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  drained in  %s from the first staged change to the last terminal state\n", r.elapsed.Round(10*time.Millisecond))

	if len(r.deadLetters) == 0 {
		fmt.Fprintf(w, "\nNothing needs attention.\n")
	} else {
		fmt.Fprintf(w, "\nNEEDS ATTENTION (dead: gave up or needs review; rejected: the remote refused the values)\n")
		ids := make([]int64, len(r.deadLetters))
		rejected := false
		for i, d := range r.deadLetters {
			ids[i] = d.ID
			rejected = rejected || d.Status == "rejected"
			fmt.Fprintf(w, "  #%-5d %-8s %-10s %s\n", d.ID, d.Status, oneLine(d.ResourceID, 40), oneLine(deref(d.LastError), 160))
		}
		if r.kept {
			fmt.Fprintf(w, "\nTo retry them once the cause is fixed (e.g. the region decided in the remote, the value corrected):\n")
			fmt.Fprintf(w, "  psql %s -c %s\n", shellQuote(r.shownURL), shellQuote(RequeueSQL(ids, rejected)))
			fmt.Fprintf(w, "  %s requeue --database-url %s %s\n", self, shellQuote(r.shownURL), RequeueFlags(ids, rejected))
		}
	}
	if r.kept {
		fmt.Fprintf(w, "\nThe database %s is kept for you to explore (the next demo recreates it), e.g.:\n", r.dbName)
		fmt.Fprintf(w, "  psql %s -c 'SELECT * FROM stagesync.conflict_rates'\n", shellQuote(r.shownURL))
		if len(r.deadLetters) > 0 {
			fmt.Fprintf(w, "  %s history --database-url %s --change %d\n", self, shellQuote(r.shownURL), r.deadLetters[0].ID)
		}
		fmt.Fprintf(w, "  %s status --database-url %s\n", self, shellQuote(r.shownURL))
	} else {
		fmt.Fprintf(w, "\nThe database %s was dropped (--drop); run the demo without --drop to keep it for a look around.\n", r.dbName)
	}
}

// demoDatabaseURL points adminURL at the demo database. It returns the URL
// to connect with and one safe to print (password hidden).
func demoDatabaseURL(adminURL, name string) (connect, shown string, err error) {
	u, err := url.Parse(adminURL)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		// A key=value connection string (from the PG* variables, empty
		// when none is set): a later dbname wins.
		if adminURL == "" || strings.Contains(adminURL, "=") && !strings.Contains(adminURL, "://") {
			connect := strings.TrimSpace(adminURL + " dbname=" + name)
			return connect, withoutPassword(connect), nil
		}
		return "", "", errors.New("demo: the database URL is neither a postgres:// URL nor a key=value connection string")
	}
	if strings.TrimPrefix(u.Path, "/") == name {
		return "", "", fmt.Errorf("demo: --demo-db %q is the database of --database-url; the demo drops it, so pick another name", name)
	}
	u.Path = "/" + name
	return u.String(), u.Redacted(), nil
}

var passwordKeyword = regexp.MustCompile(`\bpassword\s*=\s*('(\\.|[^'])*'|\S+)\s*`)

// withoutPassword drops the password from a key=value connection string,
// so it can be printed.
func withoutPassword(conn string) string {
	return strings.TrimSpace(passwordKeyword.ReplaceAllString(conn, ""))
}

// demoDBComment marks a database as the demo's own: the demo drops only a
// database that carries it, never one of the same name that someone else
// made.
const demoDBComment = "stagesync demo database: dropped and recreated by `stagesync demo`"

// recreateDatabase drops the previous demo database (only if the demo made
// it) and creates a fresh one on the server of adminURL, marked as the
// demo's. CREATE and DROP DATABASE take no parameters, so the name (checked
// against demoDBNameRE) is quoted as an identifier.
func recreateDatabase(ctx context.Context, adminURL, name string) error {
	admin, err := db.NewPool(ctx, adminURL, 1)
	if err != nil {
		return err
	}
	defer admin.Close()
	if err := dropDemoDatabase(ctx, admin, name); err != nil {
		return err
	}
	ident := pgx.Identifier{name}.Sanitize()
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+ident); err != nil {
		return fmt.Errorf("create demo database %s: %w", name, err)
	}
	if _, err := admin.Exec(ctx, "COMMENT ON DATABASE "+ident+" IS "+quoteLiteral(demoDBComment)); err != nil {
		return fmt.Errorf("mark demo database %s as the demo's: %w", name, err)
	}
	return nil
}

func dropDatabase(ctx context.Context, adminURL, name string) error {
	admin, err := db.NewPool(ctx, adminURL, 1)
	if err != nil {
		return err
	}
	defer admin.Close()
	return dropDemoDatabase(ctx, admin, name)
}

// dropDemoDatabase drops the database name if it exists and carries the
// demo's mark; one without the mark is someone's data, and is refused.
func dropDemoDatabase(ctx context.Context, admin *pgxpool.Pool, name string) error {
	var comment *string
	err := admin.QueryRow(ctx, `SELECT pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database WHERE datname = $1`, name).Scan(&comment)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up demo database %s: %w", name, err)
	}
	if deref(comment) != demoDBComment {
		return fmt.Errorf("demo: database %s exists and was not made by `stagesync demo`, so the demo will not drop it: pick another --demo-db, or drop it yourself if it is an old demo database", name)
	}
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop demo database %s: %w", name, err)
	}
	return nil
}

// quoteLiteral quotes s as an SQL string literal (COMMENT takes no
// parameters).
func quoteLiteral(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
