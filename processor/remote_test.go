package processor

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

// A redirect is recorded, never followed: following would carry a custom
// auth header (and a PATCH body) to whatever host the remote names.
func TestRemoteDoesNotFollowRedirects(t *testing.T) {
	t.Parallel()
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
	}))
	t.Cleanup(other.Close)
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusTemporaryRedirect)
	}))
	t.Cleanup(api.Close)

	tc := &TargetConfig{Name: "t", BaseURL: api.URL, ItemPath: "/a/{id}", Concurrency: 1, Timeout: Duration(5e9),
		ConflictStatuses: []int{409, 412}, Auth: &AuthConfig{Header: "X-Api-Key"}, authValue: "s3cret"}
	r := newRemote(tc, NewHTTPClient(), nil)
	resp := r.do(t.Context(), request{method: http.MethodPatch, resourceID: "x", url: r.itemURL("x"),
		ifMatch: `"1"`, body: map[string]any{"a": 1}})
	require.Equal(t, http.StatusTemporaryRedirect, resp.status)
	require.Equal(t, outcomeFatal, resp.attempt.outcome)
	require.Equal(t, int32(0), elsewhere.Load(), "the redirect target must not be contacted")
}

// A write whose connection fails after it was sent is never sent again by
// Go's transport on its own (it would, for a request carrying an
// Idempotency-Key on a reused connection): its outcome is unknown, and
// stagesync decides what to do about it.
func TestRemoteNeverResendsAWriteOnItsOwn(t *testing.T) {
	t.Parallel()
	var writes atomic.Int32
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			w.Header().Set("ETag", `"1"`)
			_, _ = w.Write([]byte(`{"id":"x"}`))
			return
		}
		_, _ = io.ReadAll(r.Body)
		writes.Add(1)
		// Applied, then the connection drops before the answer.
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	}))
	t.Cleanup(api.Close)
	tc := &TargetConfig{Name: "t", BaseURL: api.URL, ItemPath: "/a/{id}", Concurrency: 1, Timeout: Duration(5e9),
		ConflictStatuses: []int{409, 412}}
	r := newRemote(tc, NewHTTPClient(), nil)
	for _, method := range []string{http.MethodPatch, http.MethodDelete} {
		writes.Store(0)
		// A GET first, so the write goes out on a reused keep-alive
		// connection, the case where Go's transport retries.
		get := r.do(t.Context(), request{method: http.MethodGet, resourceID: "x", url: r.itemURL("x")})
		require.Equal(t, http.StatusOK, get.status)
		req := request{method: method, resourceID: "x", url: r.itemURL("x"), ifMatch: `"1"`, idemKey: method == http.MethodPatch}
		if method == http.MethodPatch {
			req.body = map[string]any{"a": 1}
		}
		resp := r.do(t.Context(), req)
		require.Equal(t, int32(1), writes.Load(), "%s requests the server received: got %d; want 1", method, writes.Load())
		require.True(t, resp.unknown, "%s outcome unknown: got false; want true (err %v)", method, resp.err)
		require.Equal(t, outcomeUnknown, resp.attempt.outcome, "%s attempt outcome: got %s; want unknown", method, resp.attempt.outcome)
	}
}
