package e2e

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A resource is recorded as soon as its write is answered, not when the
// slowest resource of its job is: in one job, the change of a resource the
// remote answers at once is terminal while the write of another (answered
// after 3 s) is still on its way.
func TestFinishedResourceIsRecordedWhileItsJobWorks(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.seed([]string{"fast-1", "slow-1"}, map[string]any{"status": "open"})
	const slowFor = 3 * time.Second
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPatch && strings.HasSuffix(r.URL.Path, "/slow-1") {
			time.Sleep(slowFor)
		}
		h.sim.ServeHTTP(w, r)
	}))
	t.Cleanup(slow.Close)
	h.env = map[string]string{"SLOW_URL": slow.URL}
	h.startProcessor(configYAML(nil, map[string]string{"base_url": "${SLOW_URL}"}))

	ids := h.insert(
		change{resource: "fast-1", fields: map[string]any{"status": "won"}},
		change{resource: "slow-1", fields: map[string]any{"status": "won"}},
	)
	h.waitFor("the fast resource's change to end", 10*time.Second, func() bool {
		return h.changes(ids[:1])[ids[0]].status == "applied"
	})
	require.Equal(t, "processing", h.changes(ids[1:])[ids[1]].status,
		"the slow resource's change when the fast one ended: got %s; want processing (its write is still on its way)", h.changes(ids[1:])[ids[1]].status)
	h.waitDrained(30 * time.Second)

	var jobs int
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT count(DISTINCT job_id) FROM stagesync.attempts WHERE method = 'PATCH'`).Scan(&jobs))
	require.Equal(t, 1, jobs, "jobs that wrote the two resources: got %d; want 1 (the same job)", jobs)
	require.Equal(t, map[string]int{"applied": 2}, h.statusCounts(), "status counts: got %v; want both applied", h.statusCounts())
}
