package remotesim_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// commitRecorder is an AfterCommitFunc that keeps what it was given.
type commitRecorder struct {
	mu      sync.Mutex
	commits []remotesim.Commit
}

func (c *commitRecorder) hook(_ context.Context, cm remotesim.Commit) {
	c.mu.Lock()
	c.commits = append(c.commits, cm)
	c.mu.Unlock()
}

func (c *commitRecorder) get() []remotesim.Commit {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]remotesim.Commit(nil), c.commits...)
}

func TestAfterCommitRunsForEveryWriteThatChangesState(t *testing.T) {
	t.Parallel()
	var rec commitRecorder
	b := setup(t, remotesim.Options{IdempotencyCache: true, Hooks: remotesim.Hooks{AfterCommitFunc: rec.hook}})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"})

	patch := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won","id":"a"}`, "If-Match", e1, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusOK, patch.status)
	e2 := patch.header.Get("ETag")
	put := b.do(t, http.MethodPut, itemPath("a"), `{"owner":"me"}`, "If-Match", e2)
	require.Equal(t, http.StatusOK, put.status)
	e3 := put.header.Get("ETag")
	create := b.do(t, http.MethodPut, itemPath("b"), `{"owner":"new"}`, "If-None-Match", "*")
	require.Equal(t, http.StatusCreated, create.status)
	del := b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", e3)
	require.Equal(t, http.StatusNoContent, del.status)

	// None of these change state, so none calls the hook.
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("b"), "").status)
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, "/items?ids=a,b", "").status)
	require.Equal(t, http.StatusPreconditionFailed, b.do(t, http.MethodPatch, itemPath("b"), `{"x":1}`, "If-Match", e1).status)
	require.Equal(t, http.StatusPreconditionRequired, b.do(t, http.MethodPatch, itemPath("b"), `{"x":1}`).status)
	require.Equal(t, http.StatusPreconditionFailed, b.do(t, http.MethodPut, itemPath("b"), `{"x":1}`, "If-None-Match", "*").status)
	require.Equal(t, http.StatusNotFound, b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", e3).status)
	replay := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won"}`, "If-Match", e1, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusOK, replay.status)
	require.Equal(t, 1, b.sim.Stats().Replays)

	type summary struct {
		Method, ID, IfMatch, IdempotencyKey string
		Status                              int
		ETag                                string
		Written                             map[string]any
		Deleted                             bool
	}
	var got []summary
	for _, c := range rec.get() {
		require.True(t, c.Request.Committed, "Request.Committed of %+v: got false; want true", c.Request)
		require.Zero(t, c.Request.Status, "Request.Status is not known before the answer")
		require.Equal(t, "api", c.Version.Writer)
		got = append(got, summary{c.Request.Method, c.Request.ID, c.Request.IfMatch, c.Request.IdempotencyKey, c.Status, c.Version.ETag, c.Version.Written, c.Version.Deleted})
	}
	want := []summary{
		{http.MethodPatch, "a", e1, "k1", http.StatusOK, e2, map[string]any{"status": "won"}, false},
		{http.MethodPut, "a", e2, "", http.StatusOK, e3, map[string]any{"owner": "me"}, false},
		{http.MethodPut, "b", "", "", http.StatusCreated, create.header.Get("ETag"), map[string]any{"owner": "new"}, false},
		{http.MethodDelete, "a", e3, "", http.StatusNoContent, "", nil, true},
	}
	require.Equal(t, want, got)
}

func TestAfterCommitRunsBeforeTheAnswerIsSent(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"})

	var personETag string
	b.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(_ context.Context, c remotesim.Commit) {
		// The write has landed, but its request is not finished (so not in the log yet).
		fields, etag, _ := b.sim.Get("a")
		if etag != c.Version.ETag || fields["status"] != "won" {
			t.Errorf("state in the hook: got %s %v; want %s with status won", etag, fields, c.Version.ETag)
		}
		if n := len(b.sim.Requests()); n != 0 {
			t.Errorf("finished requests in the hook: got %d; want 0", n)
		}
		// A person edits the resource before the client sees the answer.
		personETag, _ = b.sim.Edit("a", map[string]any{"owner": "bob"}, "bob")
	}})

	res := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won"}`, "If-Match", e1)
	require.Equal(t, http.StatusOK, res.status)
	written := b.sim.History("a")[1].ETag
	require.Equal(t, written, res.header.Get("ETag"), "the answer carries the write's own ETag")
	require.JSONEq(t, `{"id":"a","owner":"crm","status":"won"}`, res.body)

	h := b.sim.History("a")
	require.Len(t, h, 3)
	require.Equal(t, []string{"seed", "api", "bob"}, []string{h[0].Writer, h[1].Writer, h[2].Writer})
	_, current, _ := b.sim.Get("a")
	require.Equal(t, personETag, current)

	// A stale ETag now: the client must merge, it cannot revert bob's edit blindly.
	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"crm"}`, "If-Match", written)
	require.Equal(t, http.StatusPreconditionFailed, res.status)

	t.Run("SetHooks with no func stops calling it", func(t *testing.T) {
		b.sim.SetHooks(remotesim.Hooks{})
		res := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"lost"}`, "If-Match", personETag)
		require.Equal(t, http.StatusOK, res.status)
		require.Len(t, b.sim.History("a"), 4, "no person edited this time")
	})
}

func TestAfterCommitContextEndsWhenTheClientGoesAway(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm"})

	clientCtx, kill := context.WithCancel(t.Context())
	sawClientGo := make(chan bool, 1)
	b.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(ctx context.Context, _ remotesim.Commit) {
		kill() // the client dies exactly after the commit
		select {
		case <-ctx.Done():
			sawClientGo <- true
		case <-time.After(10 * time.Second):
			sawClientGo <- false
		}
	}})
	_, err := b.send(clientCtx, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e1)
	require.ErrorIs(t, err, context.Canceled)
	require.True(t, <-sawClientGo, "hook's context ended after the client went away: got false; want true")

	fields, _, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"owner": "me"}, fields, "the write landed although its client never saw the answer")
	require.Eventually(t, func() bool { return len(b.sim.Requests()) == 1 }, 10*time.Second, time.Millisecond)
	require.True(t, b.sim.Requests()[0].Committed)
}

// freshConn sends one request on a new connection. Go's Transport silently resends a
// request carrying Idempotency-Key whose reused connection was reset; a fresh connection
// makes the client see the reset exactly once.
func (b *testBundle) freshConn(t *testing.T, method, path, body string, headers ...string) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, b.srv.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	tr := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(tr.CloseIdleConnections)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	return resp, err
}

func TestDropAfterCommit(t *testing.T) {
	t.Parallel()
	var rec commitRecorder
	b := setup(t, remotesim.Options{DropAfterCommitRate: 1, IdempotencyCache: true, Hooks: remotesim.Hooks{AfterCommitFunc: rec.hook}})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm"})

	_, err := b.freshConn(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e1, "Idempotency-Key", "k1")
	require.Error(t, err, "the client gets no answer")

	fields, e2, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"owner": "me"}, fields, "the write landed")
	h := b.sim.History("a")
	require.Len(t, h, 2)
	require.Equal(t, map[string]any{"owner": "me"}, h[1].Written)

	commits := rec.get()
	require.Len(t, commits, 1)
	require.Equal(t, "drop-after-commit", commits[0].Request.Fault, "the hook knows the answer will be dropped")

	reqs := b.sim.Requests()
	require.Len(t, reqs, 1)
	require.Equal(t, "drop-after-commit", reqs[0].Fault)
	require.True(t, reqs[0].Committed)
	require.Equal(t, 0, reqs[0].Status)

	t.Run("a write that changes nothing is answered", func(t *testing.T) {
		resp, err := b.freshConn(t, http.MethodPatch, itemPath("a"), `{"owner":"x"}`, "If-Match", e1)
		require.NoError(t, err)
		require.Equal(t, http.StatusPreconditionFailed, resp.StatusCode)
		last := b.sim.Requests()[1]
		require.Empty(t, last.Fault)
		require.False(t, last.Committed)
	})
	t.Run("the dropped answer is replayed for its Idempotency-Key", func(t *testing.T) {
		b.sim.SetFaults(remotesim.Faults{})
		res := b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e1, "Idempotency-Key", "k1")
		require.Equal(t, http.StatusOK, res.status)
		require.Equal(t, e2, res.header.Get("ETag"))
		require.JSONEq(t, `{"id":"a","owner":"me"}`, res.body)
		require.Len(t, b.sim.History("a"), 2, "the replay wrote nothing")
	})

	st := b.sim.Stats()
	require.Equal(t, 1, st.DroppedAfterCommit)
	require.Equal(t, 1, st.Faults)
	require.Equal(t, 2, st.Patches, "the dropped write and the 412 reached state")
	require.Equal(t, 1, st.Replays)
}

func TestDropAfterCommitEveryWriteMethod(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm"})
	b.sim.SetFaults(remotesim.Faults{DropAfterCommitRate: 1})

	// GETs are never dropped: only writes draw this fault.
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status)

	_, err := b.freshConn(t, http.MethodPut, itemPath("a"), `{"owner":"put"}`, "If-Match", e1)
	require.Error(t, err)
	_, err = b.freshConn(t, http.MethodPut, itemPath("b"), `{"owner":"new"}`, "If-None-Match", "*")
	require.Error(t, err)
	_, e2, _ := b.sim.Get("a")
	_, err = b.freshConn(t, http.MethodDelete, itemPath("a"), "", "If-Match", e2)
	require.Error(t, err)

	require.Equal(t, []string{"b"}, b.sim.IDs())
	var faults []string
	for _, r := range b.sim.Requests() {
		faults = append(faults, r.Method+" "+r.Fault)
	}
	require.Equal(t, []string{"GET ", "PUT drop-after-commit", "PUT drop-after-commit", "DELETE drop-after-commit"}, faults)
	st := b.sim.Stats()
	require.Equal(t, 3, st.DroppedAfterCommit)
	require.Equal(t, 2, st.Puts)
	require.Equal(t, 1, st.Creates)
	require.Equal(t, 1, st.Deletes)
}

func TestDropAfterCommitIsDeterministicUnderSeed(t *testing.T) {
	t.Parallel()
	run := func() []bool {
		b := setup(t, remotesim.Options{DropAfterCommitRate: 0.5, Seed: 7})
		etag := b.sim.Put("a", map[string]any{"n": 0})
		var dropped []bool
		for i := range 20 {
			_, err := b.freshConn(t, http.MethodPatch, itemPath("a"), `{"n":`+strconv.Itoa(i)+`}`, "If-Match", etag)
			dropped = append(dropped, err != nil)
			_, etag, _ = b.sim.Get("a")
		}
		return dropped
	}
	first := run()
	require.Equal(t, first, run())
	require.Contains(t, first, true)
	require.Contains(t, first, false)
}

func TestHistoryKeepsWhatEachWriteSet(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new", "note": "x"})
	res := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won","note":null,"id":"a"}`, "If-Match", e1)
	require.Equal(t, http.StatusOK, res.status)
	e3, _ := b.sim.Edit("a", map[string]any{"owner": "bob"}, "bob")
	res = b.do(t, http.MethodPut, itemPath("a"), `{"owner":"me","tags":["t"],"gone":null}`, "If-Match", e3)
	require.Equal(t, http.StatusOK, res.status)
	stop := b.sim.StartOtherUsers(t.Context(), 1000, []string{"region"})
	require.Eventually(t, func() bool { return len(b.sim.History("a")) >= 5 }, 10*time.Second, time.Millisecond)
	stop()
	_, cur, _ := b.sim.Get("a")
	require.Equal(t, http.StatusNoContent, b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", cur).status)

	h := b.sim.History("a")
	require.Equal(t, map[string]any{"owner": "crm", "status": "new", "note": "x"}, h[0].Written, "Put")
	require.Equal(t, map[string]any{"status": "won", "note": nil}, h[1].Written, "PATCH: its body without id, a null included")
	require.NotContains(t, h[1].Fields, "note", "the null removed the field")
	require.Equal(t, map[string]any{"owner": "bob"}, h[2].Written, "Edit")
	require.Equal(t, map[string]any{"owner": "me", "tags": []any{"t"}, "gone": nil}, h[3].Written, "PUT: the whole body")
	other := h[4].Written
	require.Len(t, other, 1, "other user's edit: got %v; want one field", other)
	require.Contains(t, other, "region")
	last := h[len(h)-1]
	require.True(t, last.Deleted)
	require.Nil(t, last.Written, "DELETE")

	// History hands out copies of Written too.
	h[1].Written["status"] = "mutated"
	require.Equal(t, "won", b.sim.History("a")[1].Written["status"])
}
