package main

import (
	"context"
	"encoding/json"
	"html"
	"image"
	"image/color"
	"image/png"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
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

// chromiumArgs are the flags every headless run here uses.
func chromiumArgs(t *testing.T) []string {
	return []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
		"--hide-scrollbars", "--force-device-scale-factor=1", "--user-data-dir=" + t.TempDir()}
}

// dumpDOM loads url in headless Chromium and returns the DOM after load, as
// the browser built it. (--dump-dom itself needs JavaScript, so the page's
// independence from it is checked by asserting it has no script at all.)
func dumpDOM(t *testing.T, chromium, url string, extra ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	args := append(append(chromiumArgs(t), extra...), "--dump-dom", url)
	cmd := exec.CommandContext(ctx, chromium, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "chromium failed; stderr:\n%s", stderr.String())
	return string(out)
}

// hostileID is a resource id and hostileError an error text as a remote
// or an upstream might send them: the page must show them as text.
const (
	hostileID    = `x"><script>alert(1)</script>&change=1`
	hostileError = `422 <img src=x onerror=alert(2)> field "status" is <b>bad</b>`
)

// pageFixture fills a database with what every part of the status page
// shows: a backlog, dead letters (one with a hostile id and error), a
// conflict-heavy hour, hot resources with merges, a live process with the
// health of the target it serves, and a pause.
func pageFixture(t *testing.T, pool *pgxpool.Pool) (deadID, rejID, hostileDeadID int64) {
	t.Helper()
	// Everything within seconds of now, in one hour bucket: a test that
	// starts in an hour's first seconds waits for them to pass.
	now := time.Now()
	if into := now.Sub(now.Truncate(time.Hour)); into < 5*time.Second {
		time.Sleep(5*time.Second - into)
		now = time.Now()
	}
	insertTarget(t, pool, "erp")
	for range 7 {
		insertFixture(t, pool, fixture{target: "erp", resourceID: "p", status: "pending", createdAt: now.Add(-3 * time.Hour)})
	}
	for range 3 {
		insertFixture(t, pool, fixture{target: "erp", resourceID: "q", status: "processing"})
	}
	const deadErr = "gave up after 10 attempts: PATCH https://erp.example/items/x-9: 503 service unavailable"
	const rejErr = "PATCH https://erp.example/items/x-10: 422 field status: value INVALID is not allowed"
	deadID = insertFixture(t, pool, fixture{target: "erp", resourceID: "x-9", status: "dead", attempts: 10, lastError: deadErr, finishedAt: now.Add(-time.Second)})
	rejID = insertFixture(t, pool, fixture{target: "erp", resourceID: "x-10", status: "rejected", attempts: 1, lastError: rejErr, finishedAt: now.Add(-2 * time.Second)})
	hostileDeadID = insertFixture(t, pool, fixture{target: "erp", resourceID: hostileID, status: "rejected", attempts: 1, lastError: hostileError, finishedAt: now.Add(-3 * time.Second)})
	// The hostile change was sent once, so its resource has a history.
	execSQL(t, pool, `INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url, status_code, duration_ms, outcome, error, created_at)
		VALUES ('erp', $1, ARRAY[$2::bigint], 'PATCH', 'https://erp.example/items/x', 422, 9, 'fatal', $3, $4)`, hostileID, hostileDeadID, hostileError, now)
	insertAttempts(t, pool, "erp", 8, 2, now)
	// A hot resource: three conflicts, two merges (one needs review).
	execSQL(t, pool, `INSERT INTO stagesync.attempts (target, resource_id, method, url, status_code, duration_ms, outcome, created_at)
		SELECT 'erp', 'acct-hot', 'PATCH', 'https://erp.example/items/acct-hot', 412, 20, 'conflict', $1
		FROM generate_series(1, 3) i`, now) // one hour bucket, whenever the test runs
	execSQL(t, pool, `INSERT INTO stagesync.merges (target, resource_id, change_ids, base, ours, theirs, result, decisions, outcome) VALUES
		('erp', 'acct-hot', '{1}', '{"owner": "a", "status": "x"}', '{"owner": "b", "status": "y"}', '{"owner": "c", "status": "x"}', '{"status": "y"}',
		 '{"owner": "kept_theirs", "status": "took_ours"}', 'merged'),
		('erp', 'acct-hot', '{2}', '{"region": "EU"}', '{"region": "US"}', '{"region": "EMEA"}', '{}', '{"region": "needs_review"}', 'needs_review')`)
	// A live process serving erp (it holds its lock, as run does), whose
	// requests fail, and a pause of the target.
	lockConn, err := pool.Acquire(t.Context())
	require.NoError(t, err)
	t.Cleanup(lockConn.Release)
	_, err = lockConn.Exec(t.Context(), `SELECT pg_advisory_lock(424242)`)
	require.NoError(t, err)
	execSQL(t, pool, `INSERT INTO stagesync.processes (client_id, lock_key, hostname, pid, targets) VALUES ('client-a', 424242, 'host-a', 4242, '{erp}')`)
	execSQL(t, pool, `INSERT INTO stagesync.target_health (target, client_id, inflight_limit, concurrency, rate_share,
		last_success_at, last_error_at, last_error, consecutive_failures)
		VALUES ('erp', 'client-a', 3, 8, 25, now() - interval '5 minutes', now() - interval '2 seconds',
		        'GET https://erp.example/items/x-1: 503 service <i>unavailable</i>', 17)`)
	execSQL(t, pool, `UPDATE stagesync.targets SET paused_until = now() + interval '1 hour',
		pause_reason = '429 Too Many Requests (Retry-After 3600)' WHERE name = 'erp'`)
	return deadID, rejID, hostileDeadID
}

func TestStatusPageInChromium(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath()
	if chromium == "" {
		t.Skip("chromium is not installed (make chromium installs Debian's package); skipping the browser test of the status page")
	}
	dbURL, pool := testDatabase(t)
	deadID, rejID, hostileDeadID := pageFixture(t, pool)
	now := time.Now()

	_, hs := newSim(t, remotesim.Options{})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, "    alert: {conflict_rate: 0.1}\n"))
	// territory is above its 10% alert: 6 conflicts in 30 requests.
	insertAttempts(t, pool, "territory", 30, 6, now)
	waitFor(t, 10*time.Second, "two backlog samples", func() bool {
		_, body := s.get(t, "/")
		return strings.Contains(body, `<polyline class="pending"`) && strings.Contains(body, `id="alert-territory"`)
	})

	dom := dumpDOM(t, chromium, "http://"+s.addr+"/")
	for _, want := range []string{
		"<title>stagesync status</title>",
		`<td class="num" data-label="pending" id="backlog-erp-pending">7</td>`,
		`<td class="num" data-label="processing" id="backlog-erp-processing">3</td>`,
		`<td class="num" data-label="oldest pending" id="backlog-erp-oldest">3h00m</td>`,
		`<td class="num" data-label="pending" id="backlog-territory-pending">0</td>`,
		`<td class="num" data-label="pending" id="backlog-total-pending">7</td>`,
		`<td class="num" data-label="processing" id="backlog-total-processing">3</td>`,
		// Health: the pause, the process, its limit, failures and error.
		`<tr class="health-paused"><td data-label="target">erp</td><td data-label="state" class="state">paused for 59m`,
		`: 429 Too Many Requests (Retry-After 3600)</td><td data-label="process">host-a pid 4242</td><td class="num" data-label="in-flight limit">3 / 8</td><td data-label="last success">5m0`,
		`s ago</td><td class="num" data-label="failures in a row">17</td><td class="err" data-label="last error">`,
		`s ago: GET https://erp.example/items/x-1: 503 service &lt;i&gt;unavailable&lt;/i&gt;</td>`,
		`<td data-label="target">territory</td><td data-label="state" class="state">`,
		`<td data-label="process">host-a pid 4242</td><td data-label="client id" class="err">client-a</td><td data-label="targets">erp</td>`,
		// Charts with readable ticks; each target's alert threshold.
		`<polyline class="pending" points="`,
		`<polyline class="throughput" points="`,
		`text-anchor="end">0%</text>`,
		`text-anchor="end">50%</text>`,
		`<line class="threshold" id="threshold-erp" x1="56" y1="109.2" x2="628" y2="109.2"></line>`,
		`text-anchor="end">alert 5.0%</text>`,
		// The conflict-rate alert: territory above it, erp with too few
		// requests to judge.
		`<p class="alert" id="alert-territory"><strong>territory</strong>: conflict rate 20.0% over the last 15m, above the 10% alert (6 conflicts in 30 requests).`,
		`<p class="now over" id="now-territory">Now: conflict rate 20.0% over the last 15m, above the 10% alert (6 conflicts in 30 requests).</p>`,
		`<p class="now" id="now-erp">Now: conflict rate 41.7% over the last 15m; too few requests (12 of 20) to judge it against the 5% alert (5 conflicts in 12 requests).</p>`,
		// The hourly table: noop, p50 and p95 too.
		`<table class="conflicts stack" id="conflicts-erp">`,
		`<th class="num">noop</th><th class="num">dead</th><th class="num">rejected</th><th class="num">p50</th><th class="num">p95</th>`,
		`<td class="num" data-label="requests">12</td><td class="num" data-label="conflicts">5</td><td class="num" data-label="conflict rate">41.7%</td>`,
		`<td class="num" data-label="noop">0</td><td class="num" data-label="dead">1</td><td class="num" data-label="rejected">2</td><td class="num" data-label="p50">12ms</td><td class="num" data-label="p95">20ms</td>`,
		"<title>" + now.UTC().Truncate(time.Hour).Format("2006-01-02 15:04") + " UTC: 5 conflicts in 12 requests (41.7%)</title>",
		// Hot resources, linked to their history.
		`<td data-label="resource" class="id"><a href="/history?target=erp&amp;resource=acct-hot">acct-hot</a></td><td class="num" data-label="conflicts">3</td><td class="num" data-label="requests">3</td><td class="num" data-label="conflict rate">100.0%</td><td class="num" data-label="merges">2</td><td class="num" data-label="needs review">1</td>`,
		`<td data-label="fields people changed" class="err">owner, region</td>`,
		// Dead letters, newest first, linked to their history.
		`<tr id="dead-` + itoa(deadID) + `"><td class="num" data-label="id"><a href="/history?change=` + itoa(deadID) + `">` + itoa(deadID) + `</a></td><td data-label="target">erp</td><td class="id" data-label="resource"><a href="/history?target=erp&amp;resource=x-9">x-9</a></td><td data-label="status">dead</td><td class="num" data-label="attempts">10</td>`,
		`<tr id="dead-` + itoa(rejID) + `">`,
		// Each dead letter names the command that requeues it.
		`<td data-label="requeue with"><code>stagesync requeue --id ` + itoa(deadID) + `</code></td></tr>`,
		`<td data-label="requeue with"><code>stagesync requeue --id ` + itoa(rejID) + ` --include-rejected</code></td></tr>`,
		`"&gt;&lt;script&gt;alert(1)&lt;/script&gt;&amp;change=1</a>`,
		`422 &lt;img src=x onerror=alert(2)&gt; field "status" is &lt;b&gt;bad&lt;/b&gt;`,
		// Table sizes.
		`<table id="tables" class="stack">`,
		`<td data-label="table">changes</td>`,
		// The search form.
		`<form class="search" method="get" action="/history" role="search">`,
		`<option value="">any target</option><option>erp</option><option>territory</option>`,
	} {
		require.Contains(t, dom, want)
	}
	require.Less(t, strings.Index(dom, "dead-"+itoa(deadID)), strings.Index(dom, "dead-"+itoa(rejID)), "newest dead letter first")
	require.NotContains(t, dom, "<script")
	require.NotContains(t, dom, "<img")
	require.NotContains(t, dom, "<i>")
	require.NotContains(t, dom, testToken)

	// The hostile dead letter's link leads to its history, whatever its id
	// holds: the href is percent-encoded, not cut at its quote or &.
	_, raw := s.get(t, "/")
	m := regexp.MustCompile(`<td class="id" data-label="resource"><a href="(/history\?target=erp&amp;resource=[^"]*)">x&#34;`).FindStringSubmatch(raw)
	require.Len(t, m, 2, "the hostile resource's link in:\n%s", raw)
	code, body := s.get(t, html.UnescapeString(m[1]))
	require.Equal(t, http.StatusOK, code, body)
	require.Contains(t, body, `<dl class="change" id="change-`+itoa(hostileDeadID)+`">`)
	require.NotContains(t, body, "<script>alert")
	require.NotContains(t, body, "<img")
}

// TestStatusPageReadableAtPhoneWidth loads the page in a 400 px wide
// Chromium twice: once inside a same-origin frame whose script measures the
// layout (the page itself runs no script), once as a screenshot. Nothing may
// overflow the width, no table cell may clip its text, text stays >= 12px,
// and the screenshot's right margin stays blank (nothing runs off the edge).
func TestStatusPageReadableAtPhoneWidth(t *testing.T) {
	t.Parallel()
	chromium := chromiumPath()
	if chromium == "" {
		t.Skip("chromium is not installed (make chromium installs Debian's package); skipping the browser test of the status page")
	}
	dbURL, pool := testDatabase(t)
	pageFixture(t, pool)
	// A long unbroken id and error, as remotes produce them.
	insertFixture(t, pool, fixture{target: "erp", resourceID: strings.Repeat("LONGID", 20), status: "dead", attempts: 3,
		lastError: "gave up: " + strings.Repeat("0123456789", 30), finishedAt: time.Now()})
	_, hs := newSim(t, remotesim.Options{})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	waitFor(t, 10*time.Second, "two backlog samples", func() bool {
		_, body := s.get(t, "/")
		return strings.Contains(body, `<polyline class="pending"`)
	})

	// The measuring frame and the page share an origin through a proxy.
	target, err := url.Parse("http://" + s.addr)
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /measure", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, measurePage)
	})
	mux.Handle("/", httputil.NewSingleHostReverseProxy(target))
	proxy := httptest.NewServer(mux)
	t.Cleanup(proxy.Close)

	dom := dumpDOM(t, chromium, proxy.URL+"/measure", "--window-size=400,3000", "--virtual-time-budget=10000")
	m := regexp.MustCompile(`(?s)<pre id="result">(.*?)</pre>`).FindStringSubmatch(dom)
	require.Len(t, m, 2, "measurement in:\n%s", dom)
	var got struct {
		Viewport    float64  `json:"viewport"`
		ScrollWidth float64  `json:"scrollWidth"`
		Tables      int      `json:"tables"`
		Cells       int      `json:"cells"`
		Problems    []string `json:"problems"`
	}
	require.NoError(t, json.Unmarshal([]byte(html.UnescapeString(m[1])), &got), "measurement %s", m[1])
	require.Equal(t, 400.0, got.Viewport, "the frame is 400 px wide")
	require.LessOrEqual(t, got.ScrollWidth, got.Viewport, "the page is wider than the screen")
	require.GreaterOrEqual(t, got.Tables, 6, "tables measured")
	require.Greater(t, got.Cells, 100, "cells measured")
	require.Empty(t, got.Problems)

	// The screenshot: 400 px wide, content drawn, nothing at the right edge.
	shot := filepath.Join(t.TempDir(), "status-400.png")
	if d := os.Getenv("STAGESYNC_SCREENSHOT_DIR"); d != "" {
		shot = filepath.Join(d, "status-400.png") // kept for a person to look at
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, chromium, append(chromiumArgs(t), "--window-size=400,3000", "--screenshot="+shot, "http://"+s.addr+"/")...)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "chromium: %s", out)
	img := decodePNG(t, shot)
	b := img.Bounds()
	require.Equal(t, 400, b.Dx(), "screenshot width")
	inked := 0
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			if !nearWhite(img.At(x, y)) {
				inked++
				if x >= b.Max.X-4 {
					t.Fatalf("something is drawn at x=%d, y=%d: the page runs off the right edge at 400 px (screenshot %s)", x, y, shot)
				}
			}
		}
	}
	require.Greater(t, inked, b.Dx()*b.Dy()/50, "the screenshot is nearly blank")
}

// measurePage frames the status page at 400 px and reports, as JSON in
// #result, the document's width and every problem a reader would meet:
// a table or cell beyond the right edge, a cell whose text is clipped,
// text under 12 px.
const measurePage = `<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{margin:0} iframe{border:0;width:400px;height:3000px}</style></head>
<body><iframe id="f" src="/"></iframe><pre id="result">pending</pre>
<script>
document.getElementById("f").addEventListener("load", function () {
  var d = this.contentDocument, w = this.contentWindow, vw = d.documentElement.clientWidth, problems = [];
  var tables = d.querySelectorAll("table"), cells = d.querySelectorAll("td, th");
  tables.forEach(function (t) {
    var r = t.getBoundingClientRect();
    if (r.right > vw + 0.5 || r.left < -0.5) problems.push("table " + (t.id || t.className) + " spans " + r.left + ".." + r.right);
  });
  cells.forEach(function (c) {
    if (w.getComputedStyle(c).display === "none" || c.offsetParent === null) return;
    var r = c.getBoundingClientRect(), fs = parseFloat(w.getComputedStyle(c).fontSize);
    if (r.right > vw + 0.5) problems.push("cell '" + c.textContent.slice(0, 30) + "' ends at " + r.right);
    if (c.scrollWidth > c.clientWidth + 1) problems.push("cell '" + c.textContent.slice(0, 30) + "' clips: " + c.scrollWidth + " > " + c.clientWidth);
    if (fs < 12) problems.push("cell '" + c.textContent.slice(0, 30) + "' has " + fs + "px text");
  });
  document.getElementById("result").textContent = JSON.stringify({
    viewport: vw, scrollWidth: d.documentElement.scrollWidth, tables: tables.length, cells: cells.length, problems: problems});
});
</script></body></html>`

func decodePNG(t *testing.T, path string) image.Image {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	img, err := png.Decode(f)
	require.NoError(t, err)
	return img
}

func nearWhite(c color.Color) bool {
	r, g, b, _ := c.RGBA()
	return r > 0xf000 && g > 0xf000 && b > 0xf000
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
	require.Equal(t, []chartTick{{172, "0"}, {132, "20"}, {92, "40"}, {52, "60"}, {12, "80"}}, backlog.Ticks)
	require.Equal(t, "08:00:00", backlog.XFrom)
	require.Equal(t, "08:00:10 UTC", backlog.XTo)
	require.Equal(t, chartLine{Class: "pending", Label: "pending", Points: "56.0,12.0 342.0,92.0 628.0,172.0", Last: "0"}, backlog.Lines[0])
	require.Equal(t, []chartTick{{172, "0/s"}, {140, "2/s"}, {108, "4/s"}, {76, "6/s"}, {44, "8/s"}, {12, "10/s"}}, throughput.Ticks)
	require.Equal(t, chartLine{Class: "throughput", Label: "finished/s", Points: "56.0,172.0 342.0,12.0 628.0,12.0", Last: "10"}, throughput.Lines[0])

	empty, _ := historyCharts(samples[:1])
	require.True(t, empty.Empty)
}

func TestAxisTicksAreRoundAndCoverTheMaximum(t *testing.T) {
	t.Parallel()
	labels := func(ticks []chartTick) []string {
		var out []string
		for _, tk := range ticks {
			out = append(out, tk.Label)
		}
		return out
	}
	tests := []struct {
		vmax       float64
		wantMax    float64
		wantLabels []string
	}{
		{0, 1, []string{"0", "1"}},
		{3, 3, []string{"0", "1", "2", "3"}},
		{7, 8, []string{"0", "2", "4", "6", "8"}},
		{180, 200, []string{"0", "50", "100", "150", "200"}},
		{4100, 5000, []string{"0", "1k", "2k", "3k", "4k", "5k"}},
		{23000, 25000, []string{"0", "5k", "10k", "15k", "20k", "25k"}},
		{1.2e6, 1.5e6, []string{"0", "500k", "1M", "1.5M"}},
	}
	for _, tt := range tests {
		ymax, ticks := axisTicks(tt.vmax, 10, 110, formatCompact)
		require.Equal(t, tt.wantMax, ymax, "axisTicks(%v) max", tt.vmax)
		require.Equal(t, tt.wantLabels, labels(ticks), "axisTicks(%v) labels", tt.vmax)
		require.LessOrEqual(t, len(ticks), 8)
		require.Equal(t, 110.0, ticks[0].Y)
		require.Equal(t, 10.0, ticks[len(ticks)-1].Y)
	}
	_, ticks := axisTicks(0.0625, 10, 110, formatTickPercent)
	require.Equal(t, []string{"0%", "2%", "4%", "6%", "8%"}, labels(ticks))
}
