// Package e2e tests stagesync end to end: real PostgreSQL (a database per
// test, cloned from the migrated template), real River, the processor
// in-process or as the built `stagesync run` binary, and the remote
// simulator over real HTTP. Every test asserts exact outcomes from the
// simulator's state, history and request log and from the audit tables.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/dbtest"
	"github.com/stagesync/stagesync/test/remotesim"
)

// target is the name every test's config uses for its remote.
const target = "crm"

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// harness is one test's world: its own database, a simulator served over
// HTTP, and the logs of whatever processors it started.
type harness struct {
	t     testing.TB
	dbURL string
	pool  *pgxpool.Pool
	sim   *remotesim.Sim
	srv   *httptest.Server
	logs  *syncBuffer
	// env is extra environment for the in-process processor's config.
	env map[string]string
}

// newHarness creates the database, the simulator (ItemPrefix defaults to
// /assignments) and its HTTP server. Cleanups run in reverse: processors
// stop first, then the server closes, then the database is dropped.
func newHarness(t testing.TB, opts remotesim.Options) *harness {
	t.Helper()
	dbURL := dbtest.NewDatabase(t)
	pool, err := db.NewPool(t.Context(), dbURL, 40)
	require.NoError(t, err, "open pool")
	t.Cleanup(pool.Close)
	if opts.ItemPrefix == "" {
		opts.ItemPrefix = "/assignments"
	}
	if opts.Seed == 0 {
		opts.Seed = 1
	}
	sim := remotesim.New(opts)
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	h := &harness{t: t, dbURL: dbURL, pool: pool, sim: sim, srv: srv, logs: &syncBuffer{}}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("in-process processor logs (tail):\n%s", h.logs.tail(24<<10))
		}
	})
	return h
}

// getenv serves ${SIM_URL} to the config.
func (h *harness) getenv(name string) string {
	if name == "SIM_URL" {
		return h.srv.URL
	}
	if v, ok := h.env[name]; ok {
		return v
	}
	return os.Getenv(name)
}

// config parses YAML config text, expanding ${SIM_URL}.
func (h *harness) config(yamlText string) *processor.Config {
	h.t.Helper()
	cfg, err := processor.ParseConfig([]byte(yamlText), h.getenv)
	require.NoError(h.t, err, "parse config:\n%s", yamlText)
	return cfg
}

// startProcessor runs a processor in-process until the test ends, and
// waits until it has registered its targets and its start-up dispatch job
// has run, so that a following insert is claimed by the listener alone
// (tests set dispatch.poll_interval long to keep it that way).
func (h *harness) startProcessor(yamlText string) *processor.Processor {
	h.t.Helper()
	cfg := h.config(yamlText)
	logger := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	p, err := processor.New(cfg, processor.Options{Pool: h.pool, Logger: logger})
	require.NoError(h.t, err, "processor.New")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					h.t.Errorf("processor.Run returned %v; want nil", err)
				}
			case <-time.After(90 * time.Second):
				h.t.Errorf("processor did not stop within 90s of cancel")
			}
		})
	}
	h.t.Cleanup(stop)
	h.waitFor("targets registered and the start-up dispatch job done", 30*time.Second, func() bool {
		select {
		case err := <-done:
			done <- err
			h.t.Fatalf("processor.Run ended at start: %v", err)
		default:
		}
		return h.count(`SELECT count(*) FROM stagesync.targets`) == len(cfg.Targets) &&
			h.count(`SELECT count(*) FROM river_job WHERE kind = 'stagesync_dispatch' AND state = 'completed'`) > 0
	})
	return p
}

// waitFor polls cond every 20ms until it holds, failing the test after
// timeout.
func (h *harness) waitFor(what string, timeout time.Duration, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitDrained waits until no change is pending or processing. On timeout it
// fails listing the stuck rows and the River jobs' states.
func (h *harness) waitDrained(timeout time.Duration) {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for h.count(`SELECT count(*) FROM stagesync.changes WHERE status IN ('pending', 'processing')`) > 0 {
		if time.Now().After(deadline) {
			h.t.Fatalf("changes still open after %s:\n%s\nriver jobs: %v\nstatus counts: %v",
				timeout, h.stuckRows(), h.riverJobStates(), h.statusCounts())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (h *harness) stuckRows() string {
	rows, err := h.pool.Query(context.Background(), `
		SELECT id, resource_id, status, attempts, coalesce(last_error, ''), updated_at
		FROM stagesync.changes WHERE status IN ('pending', 'processing') ORDER BY id LIMIT 25`)
	if err != nil {
		return "query stuck rows: " + err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var (
			id, attempts         int64
			res, status, lastErr string
			updated              time.Time
		)
		if err := rows.Scan(&id, &res, &status, &attempts, &lastErr, &updated); err != nil {
			return "scan stuck rows: " + err.Error()
		}
		fmt.Fprintf(&b, "  change %d resource %q %s attempts=%d updated=%s last_error=%q\n",
			id, res, status, attempts, updated.Format(time.RFC3339Nano), lastErr)
	}
	return b.String()
}

func (h *harness) riverJobStates() map[string]int {
	out := map[string]int{}
	rows, err := h.pool.Query(context.Background(), `SELECT kind || ':' || state::text, count(*) FROM river_job GROUP BY 1`)
	if err != nil {
		return map[string]int{"error: " + err.Error(): 0}
	}
	defer rows.Close()
	for rows.Next() {
		var k string
		var n int
		if rows.Scan(&k, &n) == nil {
			out[k] = n
		}
	}
	return out
}

// count runs a query returning one integer.
func (h *harness) count(sql string, args ...any) int {
	h.t.Helper()
	var n int
	err := h.pool.QueryRow(context.Background(), sql, args...).Scan(&n)
	require.NoError(h.t, err, "query %q", sql)
	return n
}

// change is one row for stagesync.changes.
type change struct {
	resource string
	fields   map[string]any
	op       string // "" = update
}

// insert stages changes in one statement (one transaction, one notify) and
// returns their ids in the given order.
func (h *harness) insert(cs ...change) []int64 {
	h.t.Helper()
	ids, err := h.tryInsert(cs...)
	require.NoError(h.t, err)
	return ids
}

// tryInsert is insert for goroutines other than the test's: it reports
// errors instead of failing the test.
func (h *harness) tryInsert(cs ...change) ([]int64, error) {
	targets := make([]string, len(cs))
	ress := make([]string, len(cs))
	ops := make([]string, len(cs))
	fields := make([]string, len(cs))
	for i, c := range cs {
		targets[i], ress[i], ops[i] = target, c.resource, c.op
		if ops[i] == "" {
			ops[i] = "update"
		}
		b := []byte("{}")
		if c.fields != nil {
			var err error
			if b, err = json.Marshal(c.fields); err != nil {
				return nil, err
			}
		}
		fields[i] = string(b)
	}
	rows, err := h.pool.Query(context.Background(), `
		INSERT INTO stagesync.changes (target, resource_id, op, fields)
		SELECT t, r, o, f::jsonb
		FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u (t, r, o, f, n)
		ORDER BY n
		RETURNING id`, targets, ress, ops, fields)
	if err != nil {
		return nil, fmt.Errorf("insert %d changes: %w", len(cs), err)
	}
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, err
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("insert %d changes: %w", len(cs), err)
	}
	if len(ids) != len(cs) {
		return nil, fmt.Errorf("inserted ids: got %d; want %d", len(ids), len(cs))
	}
	slices.Sort(ids) // identity values follow the ORDER BY n
	return ids, nil
}

// changeRow is a change's bookkeeping.
type changeRow struct {
	resource    string
	status      string
	attempts    int
	lastError   string
	appliedETag string
}

// changes reads the given changes by id.
func (h *harness) changes(ids []int64) map[int64]changeRow {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), `
		SELECT id, resource_id, status, attempts, coalesce(last_error, ''), coalesce(applied_etag, '')
		FROM stagesync.changes WHERE id = ANY ($1::bigint[])`, ids)
	require.NoError(h.t, err)
	defer rows.Close()
	out := make(map[int64]changeRow, len(ids))
	for rows.Next() {
		var id int64
		var r changeRow
		require.NoError(h.t, rows.Scan(&id, &r.resource, &r.status, &r.attempts, &r.lastError, &r.appliedETag))
		out[id] = r
	}
	require.NoError(h.t, rows.Err())
	return out
}

// statusCounts counts all changes by status.
func (h *harness) statusCounts() map[string]int {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), `SELECT status, count(*) FROM stagesync.changes GROUP BY status`)
	require.NoError(h.t, err)
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var s string
		var n int
		require.NoError(h.t, rows.Scan(&s, &n))
		out[s] = n
	}
	require.NoError(h.t, rows.Err())
	return out
}

// attemptKey groups attempts rows and simulator requests alike.
type attemptKey struct {
	method string
	status int // 0: no response
}

// attemptsByMethodStatus counts attempts rows by method and status code.
func (h *harness) attemptsByMethodStatus() map[attemptKey]int {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(),
		`SELECT method, coalesce(status_code, 0), count(*) FROM stagesync.attempts GROUP BY 1, 2`)
	require.NoError(h.t, err)
	defer rows.Close()
	out := map[attemptKey]int{}
	for rows.Next() {
		var k attemptKey
		var n int
		require.NoError(h.t, rows.Scan(&k.method, &k.status, &n))
		out[k] = n
	}
	require.NoError(h.t, rows.Err())
	return out
}

// attemptsByOutcome counts attempts rows by outcome.
func (h *harness) attemptsByOutcome() map[string]int {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), `SELECT outcome, count(*) FROM stagesync.attempts GROUP BY 1`)
	require.NoError(h.t, err)
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var k string
		var n int
		require.NoError(h.t, rows.Scan(&k, &n))
		out[k] = n
	}
	require.NoError(h.t, rows.Err())
	return out
}

// storedResource is a stagesync.resources row.
type storedResource struct {
	etag     string
	snapshot map[string]any
	deleted  bool
}

func (h *harness) storedResources() map[string]storedResource {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(),
		`SELECT resource_id, coalesce(etag, ''), snapshot, deleted FROM stagesync.resources WHERE target = $1`, target)
	require.NoError(h.t, err)
	defer rows.Close()
	out := map[string]storedResource{}
	for rows.Next() {
		var id string
		var raw []byte
		var r storedResource
		require.NoError(h.t, rows.Scan(&id, &r.etag, &raw, &r.deleted))
		if raw != nil {
			require.NoError(h.t, json.Unmarshal(raw, &r.snapshot))
		}
		out[id] = r
	}
	require.NoError(h.t, rows.Err())
	return out
}

// seed puts fields on every id in the simulator.
func (h *harness) seed(ids []string, fields map[string]any) {
	for _, id := range ids {
		h.sim.Put(id, fields)
	}
}

// requireRemote checks that the simulator holds exactly want (JSON-normalized)
// for each resource.
func (h *harness) requireRemote(want map[string]map[string]any) {
	h.t.Helper()
	for _, id := range slices.Sorted(maps.Keys(want)) {
		got, _, ok := h.sim.Get(id)
		require.True(h.t, ok, "resource %q exists on the remote: got false; want true", id)
		w := jsonNorm(want[id])
		require.Equal(h.t, w, got, "remote state of %q: got %v; want %v", id, got, w)
	}
}

// apiVersions is the resource's history written through HTTP.
func (h *harness) apiVersions(id string) []remotesim.Version {
	var out []remotesim.Version
	for _, v := range h.sim.History(id) {
		if v.Writer == "api" {
			out = append(out, v)
		}
	}
	return out
}

// requireIncreasing checks that the api writes of a resource carry strictly
// increasing values of field: never an older value after a newer, never
// the same write twice.
func (h *harness) requireIncreasing(id, field string) []float64 {
	h.t.Helper()
	var seq []float64
	for _, v := range h.apiVersions(id) {
		n, ok := v.Fields[field].(float64)
		require.True(h.t, ok, "resource %q api version %v: field %q is %T; want a number", id, v.Fields, field, v.Fields[field])
		seq = append(seq, n)
	}
	for i := 1; i < len(seq); i++ {
		require.Greater(h.t, seq[i], seq[i-1], "resource %q: api writes of %q went %v; want strictly increasing", id, field, seq)
	}
	return seq
}

// expected folds changes over base per resource: the last value per field.
func expected(base map[string]any, ids []string, cs []change) map[string]map[string]any {
	out := make(map[string]map[string]any, len(ids))
	for _, id := range ids {
		out[id] = maps.Clone(base)
	}
	for _, c := range cs {
		m := out[c.resource]
		if m == nil {
			m = map[string]any{}
			out[c.resource] = m
		}
		maps.Copy(m, c.fields)
	}
	return out
}

// jsonNorm returns v as JSON decoding would give it (numbers as float64).
func jsonNorm(v map[string]any) map[string]any {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		panic(err)
	}
	return out
}

func resourceIDs(prefix string, n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	return ids
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.String()
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}

// The built `stagesync` binary, once per test binary.
var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

func stagesyncBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "stagesync-e2e-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "stagesync")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/stagesync/stagesync/cmd/stagesync").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build ./cmd/stagesync: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatalf("build stagesync: %v", binErr)
	}
	return binPath
}

// writeConfig writes YAML config text to a file for `stagesync run`; the
// process expands ${SIM_URL} from its environment.
func (h *harness) writeConfig(yamlText string) string {
	h.t.Helper()
	h.config(yamlText) // fail early on a bad config
	path := filepath.Join(h.t.TempDir(), "stagesync.yaml")
	require.NoError(h.t, os.WriteFile(path, []byte(yamlText), 0o600))
	return path
}

// runProc is one `stagesync run` process.
type runProc struct {
	name    string
	cmd     *exec.Cmd
	out     *syncBuffer
	addr    string
	done    chan struct{}
	waitErr error
}

// startRun starts `stagesync run` on the harness's database and waits until
// its /readyz answers 200. It is stopped (SIGTERM, then SIGKILL) when the
// test ends.
func (h *harness) startRun(name, configPath string) *runProc {
	h.t.Helper()
	bin := stagesyncBinary(h.t)
	p := &runProc{name: name, out: &syncBuffer{}, addr: freeAddr(h.t), done: make(chan struct{})}
	p.cmd = exec.Command(bin, "run", "--config", configPath, "--database-url", h.dbURL,
		"--listen", p.addr, "--log-level", "info")
	p.cmd.Env = append(os.Environ(), "SIM_URL="+h.srv.URL)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	require.NoError(h.t, p.cmd.Start(), "start %s", name)
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	h.t.Cleanup(func() {
		p.stop(h.t)
		if h.t.Failed() {
			h.t.Logf("%s output (tail):\n%s", name, p.out.tail(24<<10))
		}
	})
	client := &http.Client{Timeout: time.Second}
	h.waitFor(name+" /readyz", 60*time.Second, func() bool {
		select {
		case <-p.done:
			h.t.Fatalf("%s exited at start: %v\n%s", name, p.waitErr, p.out.tail(8<<10))
		default:
		}
		resp, err := client.Get("http://" + p.addr + "/readyz")
		if err != nil {
			return false
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// stop sends SIGTERM and waits for a graceful exit, killing after 60s.
func (p *runProc) stop(t testing.TB) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.waitErr != nil {
			t.Errorf("%s exit after SIGTERM: got %v; want a clean exit", p.name, p.waitErr)
		}
	case <-time.After(60 * time.Second):
		t.Errorf("%s did not exit within 60s of SIGTERM; killing it", p.name)
		p.kill()
	}
}

// kill is kill -9: no cleanup of any kind in the process.
func (p *runProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

// configYAML builds a one-target config (target "crm" at ${SIM_URL}) from
// defaults for tests, overridden by the given keys. Values are YAML text.
func configYAML(dispatch, tgt map[string]string) string {
	d := map[string]string{
		// Long, so that only the listener claims after start and request
		// counts are deterministic; the start-up dispatch job still runs.
		"poll_interval":  "1h",
		"shutdown_grace": "5s",
	}
	t := map[string]string{
		"base_url":        "${SIM_URL}",
		"item_path":       "/assignments/{id}",
		"batch_etag_path": "/assignments",
		"backoff":         "{base: 10ms, max: 200ms}",
	}
	maps.Copy(d, dispatch)
	maps.Copy(t, tgt)
	var b strings.Builder
	b.WriteString("dispatch:\n")
	for _, k := range slices.Sorted(maps.Keys(d)) {
		fmt.Fprintf(&b, "  %s: %s\n", k, d[k])
	}
	b.WriteString("targets:\n  " + target + ":\n")
	for _, k := range slices.Sorted(maps.Keys(t)) {
		if t[k] == "" {
			continue // "" removes a default
		}
		fmt.Fprintf(&b, "    %s: %s\n", k, t[k])
	}
	return b.String()
}

// requireAuditMatchesRemote checks that every request the simulator
// answered has its attempts row, with the same method and status, and no
// attempts row claims an answer the simulator never gave.
func (h *harness) requireAuditMatchesRemote() {
	h.t.Helper()
	want, _ := h.simAnswers()
	got := h.attemptsByMethodStatus()
	for k := range got {
		if k.status == 0 {
			delete(got, k)
		}
	}
	require.Equal(h.t, want, got, "attempts rows by method and status: got %v; want the simulator's answers %v", got, want)
}

// requireAuditCoversRemote is requireAuditMatchesRemote for runs whose
// requests were cancelled mid-flight (a stop past its grace): an answer the
// client never read is recorded as a transport error. So: no attempts row
// claims an answer the simulator did not give, and there are at least as
// many attempts rows per method as requests the simulator saw.
func (h *harness) requireAuditCoversRemote() {
	h.t.Helper()
	answers, seen := h.simAnswers()
	got := h.attemptsByMethodStatus()
	rows := map[string]int{}
	for k, n := range got {
		rows[k.method] += n
		if k.status != 0 {
			require.LessOrEqual(h.t, n, answers[k], "attempts rows with %s %d: got %d; want ≤ %d answers from the simulator", k.method, k.status, n, answers[k])
		}
	}
	for m, n := range seen {
		require.GreaterOrEqual(h.t, rows[m], n, "%s attempts rows: got %d; want ≥ %d requests the simulator saw", m, rows[m], n)
	}
}

// simAnswers counts the simulator's answered requests by method and
// status, and all its requests by method.
func (h *harness) simAnswers() (answers map[attemptKey]int, seen map[string]int) {
	answers, seen = map[attemptKey]int{}, map[string]int{}
	for _, r := range h.sim.Requests() {
		seen[r.Method]++
		if r.Status != 0 && r.Status != 499 {
			answers[attemptKey{r.Method, r.Status}]++
		}
	}
	return answers, seen
}

// waitSimSettled waits until the simulator has finished the requests a
// stopped or killed client left in flight (they end after its latency).
func (h *harness) waitSimSettled() {
	h.t.Helper()
	h.waitFor("the remote to settle", 10*time.Second, func() bool {
		n := h.sim.Stats().Requests
		time.Sleep(250 * time.Millisecond)
		return h.sim.Stats().Requests == n
	})
}
