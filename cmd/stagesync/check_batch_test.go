package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// batchRemoteFor is the simulator (with or without $batch) behind a check
// of the credential.
func batchRemoteFor(t *testing.T, batch bool) (*remotesim.Sim, *httptest.Server) {
	t.Helper()
	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments", BatchWrites: batch})
	sim.Put("a-1", map[string]any{"owner": "rep-1"})
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testToken {
			http.Error(w, `{"error": "bad token `+r.Header.Get("Authorization")+`"}`, http.StatusUnauthorized)
			return
		}
		sim.ServeHTTP(w, r)
	}))
	t.Cleanup(hs.Close)
	return sim, hs
}

// check probes the batch write endpoint of a target with batch_write
// without writing: a batch holding one GET of a known resource (an empty
// batch when none is known), answered with the item's ETag; a missing
// endpoint, a refused credential or a remote without $batch fail the check.
func TestCheckProbesTheBatchWriteEndpointWithoutWriting(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	sim, hs := batchRemoteFor(t, true)
	config := func(base, path string) string {
		return writeConfig(t, `targets:
  territory:
    base_url: `+base+`
    item_path: /assignments/{id}
    auth: {env: SIM_TOKEN, prefix: "Bearer "}
    batch_write: {path: `+path+`}
`)
	}
	cfg := config(hs.URL, "/$batch")
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg, "--database-url", dbURL}, testGetenv, &out))

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL, "--resource", "a-1"}, testGetenv, &out))
	t.Logf("\n%s", out.String())
	_, etag, _ := sim.Get("a-1")
	require.Regexp(t, `^ok POST `+regexp.QuoteMeta(hs.URL)+`/\$batch \(a batch holding one GET of "a-1"\) answered 200; the GET inside answered 200, ETag `+regexp.QuoteMeta(etag)+`, in [\d.]+ms$`,
		checkRows(t, out.String())["territory batch write"])
	st := sim.Stats()
	require.Equal(t, 1, st.BatchPosts, "batch POSTs: got %d; want 1", st.BatchPosts)
	require.Zero(t, st.Patches+st.Puts+st.Deletes, "writes: got %d; want none", st.Patches+st.Puts+st.Deletes)
	require.Zero(t, countWhere(t, pool, `SELECT count(*) FROM stagesync.attempts`), "check records nothing")

	t.Run("no resource known: an empty batch", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		require.NoError(t, run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL}, testGetenv, &out))
		require.Regexp(t, `^ok POST .*/\$batch \(an empty batch\) answered 200 in [\d.]+ms$`, checkRows(t, out.String())["territory batch write"])
	})
	t.Run("wrong path", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", config(hs.URL, "/batch"), "--database-url", dbURL, "--resource", "a-1"}, testGetenv, &out)
		require.EqualError(t, err, "check: 1 of 8 checks failed")
		require.Regexp(t, `^FAILED POST .*/batch \(a batch holding one GET of "a-1"\) answered 404: no JSON batch endpoint there; check batch_write.path`,
			checkRows(t, out.String())["territory batch write"])
	})
	t.Run("a remote without batches", func(t *testing.T) {
		t.Parallel()
		_, plain := batchRemoteFor(t, false)
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", config(plain.URL, "/$batch"), "--database-url", dbURL, "--resource", "a-1"}, testGetenv, &out)
		require.Error(t, err)
		require.Regexp(t, `^FAILED POST .*/\$batch .* answered \d+`, checkRows(t, out.String())["territory batch write"])
	})
	t.Run("refused credential", func(t *testing.T) {
		t.Parallel()
		wrong := func(k string) string {
			if k == "SIM_TOKEN" {
				return "wrong-secret-456"
			}
			return ""
		}
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL, "--resource", "a-1"}, wrong, &out)
		require.Error(t, err)
		require.Regexp(t, `^FAILED POST .*/\$batch .* answered 401: bad token Bearer \[redacted\]`, checkRows(t, out.String())["territory batch write"])
		require.NotContains(t, out.String(), "wrong-secret-456")
	})
}
