package processor

import (
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
