package e2e

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"time"

	"github.com/stretchr/testify/require"
)

// outcomeDetail reads a change's outcome_detail ("" for NULL).
func (h *harness) outcomeDetail(id int64) string {
	h.t.Helper()
	var d string
	err := h.pool.QueryRow(context.Background(),
		`SELECT coalesce(outcome_detail, '') FROM stagesync.changes WHERE id = $1`, id).Scan(&d)
	require.NoError(h.t, err, "read outcome_detail of change %d", id)
	return d
}

// fieldWrites is the sequence of numeric values the remote's API writes
// set field to (Version.Written: what each request's body carried).
func (h *harness) fieldWrites(id, field string) []float64 {
	h.t.Helper()
	var out []float64
	for _, v := range h.apiVersions(id) {
		val, ok := v.Written[field]
		if !ok {
			continue
		}
		n, isNum := val.(float64)
		require.True(h.t, isNum, "resource %q: field %q written as %T; want a number", id, field, val)
		out = append(out, n)
	}
	return out
}

// startRunAs is startRun with the processes' database sessions named
// appName (application_name), so a test can find and terminate them.
func (h *harness) startRunAs(name, configPath, appName string) *runProc {
	h.t.Helper()
	bin := stagesyncBinary(h.t)
	u, err := url.Parse(h.dbURL)
	require.NoError(h.t, err)
	q := u.Query()
	q.Set("application_name", appName)
	u.RawQuery = q.Encode()
	p := &runProc{name: name, out: &syncBuffer{}, addr: freeAddr(h.t), done: make(chan struct{})}
	p.cmd = exec.Command(bin, "run", "--config", configPath, "--database-url", u.String(),
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
			h.t.Logf("%s output (tail):\n%s", name, p.out.tail(8<<10))
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

// terminateSessions ends every database session named appName, as an
// administrator's pg_terminate_backend (or a failover) would, and returns
// how many it ended.
func (h *harness) terminateSessions(appName string) int {
	h.t.Helper()
	return h.count(`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()`, appName)
}
