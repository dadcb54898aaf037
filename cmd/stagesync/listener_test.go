package main

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// Any number of simultaneous viewers of the status page cost one set of
// database queries per snapshot period: they share the snapshot, and
// those arriving during a load wait for it.
func TestStatusPageLoadsOnceForConcurrentViewers(t *testing.T) {
	t.Parallel()
	_, pool := testDatabase(t)
	pageFixture(t, pool)
	l := newPageLoader(pool, newBacklogHistory(10), nil, slog.New(slog.NewTextHandler(t.Output(), nil)))
	var mu sync.Mutex
	now := time.Now()
	l.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }

	const viewers = 32
	pages := make([]*renderedPage, viewers)
	var wg sync.WaitGroup
	for i := range viewers {
		wg.Go(func() {
			p, err := l.get(t.Context())
			require.NoError(t, err)
			pages[i] = p
		})
	}
	wg.Wait()
	require.Equal(t, int64(1), l.loads.Load(), "database loads for %d simultaneous viewers", viewers)
	for _, p := range pages {
		require.Same(t, pages[0], p)
		require.Equal(t, http.StatusOK, p.code)
	}
	require.Contains(t, string(pages[0].body), `id="backlog-erp-pending">7</td>`)

	advance(pageMaxAge - time.Millisecond)
	_, err := l.get(t.Context())
	require.NoError(t, err)
	require.Equal(t, int64(1), l.loads.Load(), "a snapshot younger than pageMaxAge is served as is")
	advance(time.Millisecond)
	p, err := l.get(t.Context())
	require.NoError(t, err)
	require.Equal(t, int64(2), l.loads.Load(), "an expired snapshot is loaded again, once")
	require.NotSame(t, pages[0], p)
}

// Through the listener: 16 clients polling the page and the history pages
// while the processor runs. Page loads stay at one per snapshot period;
// history lookups never run more than historyRenders at once.
func TestListenerBoundsPageWorkUnderManyClients(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	_, _, hostileID := pageFixture(t, pool)
	_, hs := newSim(t, remotesim.Options{})
	loaders := make(chan *pageLoader, 1)
	histories := make(chan *historyPages, 1)
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""), func(o *serveOpts) {
		o.pageLoader, o.historyPages = loaders, histories
	})
	loader, history := <-loaders, <-histories

	start := time.Now()
	var wg sync.WaitGroup
	for c := range 16 {
		wg.Go(func() {
			for i := range 12 {
				path := "/"
				if (c+i)%3 == 0 {
					path = "/history?change=" + itoa(hostileID)
				}
				code, _ := s.get(t, path)
				require.Equal(t, http.StatusOK, code, path)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	periods := int64(elapsed/pageMaxAge) + 1
	t.Logf("16 clients, 192 requests in %v: %d status page loads, at most %d history lookups at once", elapsed, loader.loads.Load(), history.maxActive.Load())
	require.LessOrEqual(t, loader.loads.Load(), periods, "page loads over %v (%d snapshot periods)", elapsed, periods)
	require.GreaterOrEqual(t, loader.loads.Load(), int64(1))
	require.LessOrEqual(t, history.maxActive.Load(), int32(historyRenders), "history lookups at once")
	require.GreaterOrEqual(t, history.maxActive.Load(), int32(1))
}

// An idle keep-alive connection is closed by the listener after its idle
// timeout instead of being held open for as long as the client likes.
func TestListenerClosesIdleKeepAliveConnections(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	_, hs := newSim(t, remotesim.Options{})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""), func(o *serveOpts) { o.idleTimeout = 300 * time.Millisecond })

	conn, err := net.Dial("tcp", s.addr)
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: stagesync\r\n\r\n")
	require.NoError(t, err)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	_, err = io.Copy(io.Discard, resp.Body)
	require.NoError(t, err)
	require.NoError(t, resp.Body.Close())
	require.False(t, resp.Close, "the server keeps the connection alive after the answer")

	// Now idle: the server must hang up long before this deadline.
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(20*time.Second)))
	_, err = br.ReadByte()
	require.ErrorIs(t, err, io.EOF, "got %v; want the server to close the idle connection", err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded))
}

// Served beyond loopback, the page and /metrics (no authentication of their
// own) draw one WARN that says so; on loopback, none.
func TestListenBeyondLoopbackWarns(t *testing.T) {
	t.Parallel()
	const warn = "served beyond this machine without authentication"
	dbURL, pool := testDatabase(t)
	_, hs := newSim(t, remotesim.Options{})
	local := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	require.NotContains(t, local.logs.String(), warn)
	require.NoError(t, local.stop())

	cfg := testConfig(t, hs.URL, "")
	cfg.Listen = "0.0.0.0:0"
	wide := startServe(t, dbURL, pool, cfg)
	require.Contains(t, wide.logs.String(), warn)
}
