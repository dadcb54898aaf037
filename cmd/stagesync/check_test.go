package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// guardedRemote is the simulator behind a check of the credential, and
// optionally without ETags on item GETs, the way real APIs go wrong.
func guardedRemote(t *testing.T, stripETag bool) *httptest.Server {
	t.Helper()
	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments"})
	sim.Put("a-1", map[string]any{"owner": "rep-1"})
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testToken {
			// Some APIs echo what they were sent; nothing may show it.
			http.Error(w, `{"error": "bad token `+r.Header.Get("Authorization")+`"}`, http.StatusUnauthorized)
			return
		}
		if stripETag && strings.HasPrefix(r.URL.Path, "/assignments/") {
			sim.ServeHTTP(etagStripper{w}, r)
			return
		}
		sim.ServeHTTP(w, r)
	}))
	t.Cleanup(hs.Close)
	return hs
}

type etagStripper struct{ http.ResponseWriter }

func (e etagStripper) WriteHeader(code int) {
	e.Header().Del("ETag")
	e.ResponseWriter.WriteHeader(code)
}

func checkConfig(t *testing.T, baseURL, itemPath string) string {
	t.Helper()
	return writeConfig(t, `targets:
  territory:
    base_url: `+baseURL+`
    item_path: `+itemPath+`
    batch_etag_path: /assignments
    auth: {env: SIM_TOKEN, prefix: "Bearer "}
`)
}

// checkRows parses check's table into "target check" → "RESULT detail".
func checkRows(t *testing.T, out string) map[string]string {
	t.Helper()
	rows := map[string]string{}
	re := regexp.MustCompile(`^(\S+) +(\S+(?: \S+)?) +(ok|warning|FAILED|skipped) +(.*)$`)
	for _, l := range lines(out)[1:] {
		m := re.FindStringSubmatch(l)
		require.NotNil(t, m, "row %q", l)
		rows[m[1]+" "+m[2]] = m[3] + " " + m[4]
	}
	return rows
}

func TestCheckProbesEachTargetWithoutWriting(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	hs := guardedRemote(t, false)
	cfg := checkConfig(t, hs.URL, "/assignments/{id}")
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg, "--database-url", dbURL}, testGetenv, &out))
	stage(t, pool, "a-1", `{"owner": "rep-2"}`) // check GETs what was staged

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL}, testGetenv, &out))
	t.Logf("\n%s", out.String())
	rows := checkRows(t, out.String())
	require.Regexp(t, `^ok .*stagesync.yaml: 1 target\(s\): territory$`, rows["- config"])
	require.Regexp(t, `^ok .*/stagesync_test_\w+ \(from --database-url\), migrated$`, rows["- database"])
	require.Equal(t, "ok PATCH "+hs.URL+"/assignments/{id}", rows["territory registered"])
	require.Regexp(t, `^ok GET `+regexp.QuoteMeta(hs.URL)+`/ answered 404 in [\d.]+ms$`, rows["territory base URL"])
	require.Equal(t, "ok not refused (no 401 or 403)", rows["territory credential"])
	require.Regexp(t, `^ok GET `+regexp.QuoteMeta(hs.URL)+`/assignments/a-1 answered 200, ETag "[^"]+", in [\d.]+ms$`, rows["territory item GET"])
	require.Regexp(t, `^ok GET `+regexp.QuoteMeta(hs.URL)+`/assignments\?fields=id%2Cetag&ids=a-1 answered 200 with 1 item\(s\) in [\d.]+ms$`, rows["territory batch ETag"])
	require.NotContains(t, out.String(), testToken)
	require.Equal(t, int64(1), countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE status = 'pending'`), "check applies nothing")
	require.Zero(t, countWhere(t, pool, `SELECT count(*) FROM stagesync.attempts`), "check records nothing")

	t.Run("refused credential", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		wrong := func(k string) string {
			if k == "SIM_TOKEN" {
				return "wrong-secret-123"
			}
			return ""
		}
		err := run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL}, wrong, &out)
		require.EqualError(t, err, "check: 3 of 7 checks failed")
		rows := checkRows(t, out.String())
		require.Regexp(t, `^FAILED refused \(GET .*/: 401; GET .*/assignments/a-1: 401; GET .*/assignments\?fields=id%2Cetag&ids=a-1: 401\): check \$SIM_TOKEN$`, rows["territory credential"])
		require.Contains(t, rows["territory item GET"], "FAILED GET "+hs.URL+"/assignments/a-1 answered 401: bad token Bearer [redacted]")
		require.NotContains(t, out.String(), "wrong-secret-123", "the credential echoed by the remote")
	})
	t.Run("no ETag", func(t *testing.T) {
		t.Parallel()
		noETag := guardedRemote(t, true)
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", checkConfig(t, noETag.URL, "/assignments/{id}"), "--database-url", dbURL, "--resource", "a-1"}, testGetenv, &out)
		require.EqualError(t, err, "check: 1 of 7 checks failed")
		rows := checkRows(t, out.String())
		require.Equal(t, "FAILED GET "+noETag.URL+"/assignments/a-1 answered 200 without an ETag header; stagesync needs one to write safely", rows["territory item GET"])
		require.Regexp(t, `^warning registered as PATCH .*; the config says PATCH .*: `+"`stagesync targets sync --config [^`]+` updates it$", rows["territory registered"])
	})
	t.Run("wrong item path", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", checkConfig(t, hs.URL, "/assignment/{id}"), "--database-url", dbURL}, testGetenv, &out)
		require.EqualError(t, err, "check: 1 of 7 checks failed")
		rows := checkRows(t, out.String())
		require.Equal(t, `FAILED GET `+hs.URL+`/assignment/a-1 answered 404: no resource "a-1" at item_path; check item_path or pass --resource with an id that exists`, rows["territory item GET"])
	})
	t.Run("a resource named on the command line", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		err := run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL, "--resource", "territory=nope"}, testGetenv, &out)
		require.EqualError(t, err, "check: 1 of 7 checks failed")
		require.Contains(t, checkRows(t, out.String())["territory item GET"], `FAILED GET `+hs.URL+`/assignments/nope answered 404`)
		require.Contains(t, checkRows(t, out.String())["territory batch ETag"], `warning GET `)
	})
}

func TestCheckWithoutRegistrationOrResourceOrValidConfig(t *testing.T) {
	t.Parallel()
	dbURL, _ := testDatabase(t)
	hs := guardedRemote(t, false)
	var out bytes.Buffer
	err := run(t.Context(), []string{"check", "--config", checkConfig(t, hs.URL, "/assignments/{id}"), "--database-url", dbURL}, testGetenv, &out)
	require.EqualError(t, err, "check: 1 of 7 checks failed")
	rows := checkRows(t, out.String())
	require.Regexp(t, "^FAILED not in stagesync.targets: the upstream's inserts fail until `stagesync targets sync --config [^`]+` \\(or run\\) registers it$", rows["territory registered"])
	require.Equal(t, "skipped no resource id known for this target (none staged or stored yet): pass --resource ID", rows["territory item GET"])
	require.Equal(t, "ok not refused (no 401 or 403)", rows["territory credential"])
	require.Regexp(t, `^warning GET \S+ answered 200 with 0 item\(s\) in \S+, asked for no id \(none staged or stored yet\): only reachability was checked; pass --resource ID$`, rows["territory batch ETag"])

	// A TARGET=ID naming a target the config lacks is a failure, not ignored.
	out.Reset()
	err = run(t.Context(), []string{"check", "--config", checkConfig(t, hs.URL, "/assignments/{id}"), "--database-url", dbURL, "--resource", "teritory=a-1"}, testGetenv, &out)
	require.EqualError(t, err, "check: 2 of 8 checks failed")
	require.Equal(t, `FAILED --resource teritory=a-1: the config has no target "teritory" (targets: territory)`, checkRows(t, out.String())["teritory resource"])

	out.Reset()
	bad := writeConfig(t, "targets:\n  territory:\n    base_url: "+hs.URL+"\n    item_path: /a/{id}\n    concurrency: many\n")
	err = run(t.Context(), []string{"check", "--config", bad, "--database-url", dbURL}, testGetenv, &out)
	require.EqualError(t, err, "check: the config is invalid; nothing else was checked")
	require.Contains(t, out.String(), `line 5: targets.territory.concurrency: must be a whole number, got "many"`)
}
