package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/remotesim"
)

// The database restarts (an immediate shutdown: every connection cut, like
// a crash or a failover) while the processor drains a backlog. Nothing is
// lost, stuck or applied out of order: the pool reconnects, the listener
// reconnects, jobs whose results could not be recorded are retried or
// rescued, and their repeated requests replay or merge to a noop.
//
// It runs its own PostgreSQL cluster, so it needs the server binaries
// (Debian's postgresql package, which `make db-up` installs when needed).
func TestDatabaseRestartMidDrain(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a private PostgreSQL cluster")
	}
	pg := startPrivateCluster(t)

	ctx := t.Context()
	pool, err := db.NewPool(ctx, pg.url, 40)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	require.NoError(t, db.Migrate(ctx, pool, nil))

	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments", Latency: 3 * time.Millisecond, IdempotencyCache: true, Seed: 1})
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	h := &harness{t: t, dbURL: pg.url, pool: pool, sim: sim, srv: srv, logs: &syncBuffer{}}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("processor logs (tail):\n%s", h.logs.tail(24<<10))
		}
	})
	ids := resourceIDs("acct", 200)
	h.seed(ids, map[string]any{"seq": -1})
	h.startProcessor(configYAML(map[string]string{"rescue_after": "5s", "poll_interval": "1s"},
		map[string]string{"batch_size": "20", "workers": "4", "concurrency": "8", "max_attempts": "50"}))

	const n = 4000
	cs := make([]change, 0, n)
	for i := range n {
		cs = append(cs, change{resource: ids[i%len(ids)], fields: map[string]any{"seq": i}})
	}
	h.insert(cs...)
	// Restart once part of the backlog is done and part is in flight.
	h.waitFor("a quarter of the backlog done", time.Minute, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.changes WHERE finished_at IS NOT NULL`) >= n/4
	})
	pg.restart(t)

	deadline := time.Now().Add(3 * time.Minute)
	for {
		var open int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM stagesync.changes WHERE status IN ('pending', 'processing')`).Scan(&open)
		if err == nil && open == 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "changes still open 3 minutes after the restart: %d (last error %v)", open, err)
		time.Sleep(100 * time.Millisecond)
	}

	counts := h.statusCounts()
	require.Equal(t, n, counts["applied"]+counts["merged"]+counts["noop"],
		"changes applied, merged or noop: got %v; want all %d", counts, n)
	want := expected(map[string]any{"seq": -1}, ids, cs)
	h.requireRemote(want)
	for _, id := range ids {
		h.requireIncreasing(id, "seq")
	}
	require.Equal(t, 1, sim.Stats().MaxInFlightPerResource, "requests in flight for one resource: got %d; want 1", sim.Stats().MaxInFlightPerResource)
}

// privateCluster is a PostgreSQL server of one test, on its own port.
type privateCluster struct {
	bindir, data, sockets, url string
	port                       int
	// owner, when running as root, is the postgres user the server
	// binaries run as (initdb refuses root).
	owner *syscall.Credential
}

func startPrivateCluster(t *testing.T) *privateCluster {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return va - vb
	})
	if len(dirs) == 0 {
		t.Skip("no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql) to start a private cluster")
	}
	c := &privateCluster{bindir: dirs[len(dirs)-1]}
	root, err := os.MkdirTemp("", "stagesync-pg-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(root) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skip("running as root and there is no postgres user to own a private cluster")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		require.NoError(t, os.Chown(root, uid, gid))
		c.owner = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	c.data, c.sockets = filepath.Join(root, "data"), root
	c.port = freePort(t)
	c.url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
	c.run(t, "initdb", "-D", c.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
	c.pgctl(t, "start")
	t.Cleanup(func() { c.run(t, "pg_ctl", "-D", c.data, "-m", "immediate", "-w", "stop") })
	return c
}

// restart stops the server the hard way (every session cut, no checkpoint)
// and starts it again.
func (c *privateCluster) restart(t *testing.T) {
	t.Helper()
	c.run(t, "pg_ctl", "-D", c.data, "-m", "immediate", "-w", "stop")
	c.pgctl(t, "start")
	conn, err := pgx.Connect(context.Background(), c.url)
	require.NoError(t, err, "connect after restart")
	require.NoError(t, conn.Close(context.Background()))
}

func (c *privateCluster) pgctl(t *testing.T, action string) {
	c.run(t, "pg_ctl", "-D", c.data, "-l", filepath.Join(c.sockets, "server.log"), "-w", "-t", "60",
		"-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", c.port, c.sockets), action)
}

func (c *privateCluster) run(t *testing.T, tool string, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.bindir, tool), args...)
	cmd.Dir = c.sockets
	if c.owner != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.owner}
	}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s %v:\n%s", tool, args, out)
}

func freePort(t *testing.T) int {
	t.Helper()
	_, port, err := net.SplitHostPort(freeAddr(t))
	require.NoError(t, err)
	n, err := strconv.Atoi(port)
	require.NoError(t, err)
	return n
}
