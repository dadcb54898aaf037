package main

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// chromiumPath finds Debian's chromium (`make chromium` installs it).
func chromiumPath() string {
	for _, name := range []string{"/usr/bin/chromium", "chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// dumpDOM loads url in headless Chromium and returns the DOM after load, as
// the browser built it. (--dump-dom itself needs JavaScript, so the page's
// independence from it is checked by asserting it has no script at all.)
func dumpDOM(t *testing.T, chromium, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
		"--user-data-dir="+t.TempDir(), "--dump-dom", url)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "chromium failed; stderr:\n%s", stderr.String())
	return string(out)
}

func TestStatusPageInChromium(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath()
	if chromium == "" {
		t.Skip("chromium is not installed (make chromium installs Debian's package); skipping the browser test of the status page")
	}
	dbURL, pool := testDatabase(t)
	now := time.Now()
	// A target no process serves holds a fixed backlog and dead letters.
	insertTarget(t, pool, "erp")
	for range 7 {
		insertFixture(t, pool, fixture{target: "erp", resourceID: "p", status: "pending", createdAt: now.Add(-3 * time.Hour)})
	}
	for range 3 {
		insertFixture(t, pool, fixture{target: "erp", resourceID: "q", status: "processing"})
	}
	const deadErr = "gave up after 10 attempts: PATCH https://erp.example/items/x-9: 503 service unavailable"
	const rejErr = "PATCH https://erp.example/items/x-10: 422 field status: value INVALID is not allowed"
	deadID := insertFixture(t, pool, fixture{target: "erp", resourceID: "x-9", status: "dead", attempts: 10, lastError: deadErr, finishedAt: now.Add(-time.Minute)})
	rejID := insertFixture(t, pool, fixture{target: "erp", resourceID: "x-10", status: "rejected", attempts: 1, lastError: rejErr, finishedAt: now.Add(-2 * time.Minute)})
	insertAttempts(t, pool, "erp", 8, 2, now)

	_, hs := newSim(t, remotesim.Options{})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	waitFor(t, 10*time.Second, "two backlog samples", func() bool {
		_, body := s.get(t, "/")
		return strings.Contains(body, `<polyline class="pending"`)
	})

	dom := dumpDOM(t, chromium, "http://"+s.addr+"/")
	for _, want := range []string{
		"<title>stagesync status</title>",
		`<td class="num" id="backlog-erp-pending">7</td>`,
		`<td class="num" id="backlog-erp-processing">3</td>`,
		`<td class="num" id="backlog-erp-oldest">3h00m</td>`,
		`<td class="num" id="backlog-territory-pending">0</td>`,
		`<td class="num" id="backlog-total-pending">7</td>`,
		`<td class="num" id="backlog-total-processing">3</td>`,
		`<polyline class="pending" points="`,
		`<polyline class="throughput" points="`,
		`<table class="conflicts" id="conflicts-erp">`,
		"<td class=\"num\">8</td><td class=\"num\">2</td><td class=\"num\">25.0%</td>",
		"<title>" + now.UTC().Truncate(time.Hour).Format("2006-01-02 15:04") + " UTC: 2 conflicts in 8 requests (25.0%)</title>",
		`<tr id="dead-` + itoa(deadID) + `"><td class="num">` + itoa(deadID) + `</td><td>erp</td><td class="nowrap">x-9</td><td>dead</td><td class="num">10</td>`,
		`<td class="err">` + deadErr + `</td>`,
		`<tr id="dead-` + itoa(rejID) + `"><td class="num">` + itoa(rejID) + `</td><td>erp</td><td class="nowrap">x-10</td><td>rejected</td><td class="num">1</td>`,
		`<td class="err">` + rejErr + `</td>`,
	} {
		require.Contains(t, dom, want)
	}
	require.Less(t, strings.Index(dom, "dead-"+itoa(deadID)), strings.Index(dom, "dead-"+itoa(rejID)), "newest dead letter first")
	require.NotContains(t, dom, "<script")
	require.NotContains(t, dom, testToken)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestBacklogHistoryKeepsTheNewestSamples(t *testing.T) {
	t.Parallel()
	h := newBacklogHistory(3)
	require.Empty(t, h.samples())
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 5 {
		h.add(backlogSample{at: t0.Add(time.Duration(i) * time.Second), pending: int64(i)})
	}
	var got []int64
	for _, s := range h.samples() {
		got = append(got, s.pending)
	}
	require.Equal(t, []int64{2, 3, 4}, got)
}

func TestHistoryCharts(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2025, 1, 1, 8, 0, 0, 0, time.UTC)
	samples := []backlogSample{
		{at: t0, pending: 80, processing: 20},
		{at: t0.Add(5 * time.Second), pending: 40, processing: 10, finished: 50, interval: 5 * time.Second},
		{at: t0.Add(10 * time.Second), pending: 0, processing: 0, finished: 50, interval: 5 * time.Second},
	}
	backlog, throughput := historyCharts(samples)
	require.False(t, backlog.Empty)
	require.Equal(t, "100", backlog.YMax)
	require.Equal(t, "08:00:00", backlog.XFrom)
	require.Equal(t, "08:00:10 UTC", backlog.XTo)
	require.Equal(t, chartLine{Class: "pending", Label: "pending", Points: "48.0,39.2 339.0,97.6 630.0,156.0", Last: "0"}, backlog.Lines[0])
	require.Equal(t, "10", throughput.YMax)
	require.Equal(t, chartLine{Class: "throughput", Label: "finished/s", Points: "48.0,156.0 339.0,10.0 630.0,10.0", Last: "10"}, throughput.Lines[0])

	empty, _ := historyCharts(samples[:1])
	require.True(t, empty.Empty)
}

func TestNiceCeil(t *testing.T) {
	t.Parallel()
	for v, want := range map[float64]float64{0: 1, 1: 1, 3: 5, 7: 10, 11: 20, 180: 200, 4100: 5000} {
		require.Equal(t, want, niceCeil(v), "niceCeil(%v)", v)
	}
}
