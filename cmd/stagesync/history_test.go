package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// conflictedResource drains, through a real processor and simulator, two
// changes to one account: the first applied, the second after a person's
// edit conflicts, is merged and written again. It returns both change ids.
func conflictedResource(t *testing.T, dbURL string, pool *pgxpool.Pool) (s *server, first, second int64) {
	t.Helper()
	sim, hs := newSim(t, remotesim.Options{Seed: 1})
	sim.Put("acct-7", map[string]any{"owner": "rep-1", "status": "active"})
	s = startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	stage(t, pool, "acct-7", `{"status": "assigned"}`)
	waitTerminal(t, pool, 1)
	_, ok := sim.Edit("acct-7", map[string]any{"owner": "person"}, "person")
	require.True(t, ok)
	stage(t, pool, "acct-7", `{"status": "on_hold", "owner": "rep-2"}`)
	waitTerminal(t, pool, 2)
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT min(id), max(id) FROM stagesync.changes`).Scan(&first, &second))
	return s, first, second
}

func TestHistoryOfAChangeShowsEveryRequestAndTheMerge(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	_, first, second := conflictedResource(t, dbURL, pool)
	getenv := func(string) string { return "" }

	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"history", "--change", itoa(second), "--database-url", dbURL}, getenv, &out))
	text := out.String()
	t.Logf("history --change %d:\n%s", second, text)
	require.Contains(t, text, fmt.Sprintf("CHANGE #%d of territory/acct-7\n", second))
	require.Contains(t, text, fmt.Sprintf("  #%-6d update  {\"owner\":\"rep-2\",\"status\":\"on_hold\"}  staged ", second))
	require.Contains(t, text, "; merged at ")
	require.Contains(t, text, "history --target territory --resource acct-7)")
	// The events in order: staged, the conflicting PATCH, the GET, the
	// merge with its decisions, the PATCH that applied, the end.
	wantOrder := []*regexp.Regexp{
		regexp.MustCompile(`  staged    update \{"owner":"rep-2","status":"on_hold"\}`),
		regexp.MustCompile(`  request   PATCH http://[^ ]+/assignments/acct-7 · If-Match "[^"]+" · → 412( · ETag "[^"]+")? · [0-9.]+ms · conflict\n`),
		regexp.MustCompile(`  request   GET http://[^ ]+/assignments/acct-7 · → 200 · ETag "[^"]+" · [0-9.]+ms · fetched\n`),
		regexp.MustCompile(`  merge     merge: merged\n`),
		regexp.MustCompile(`owner +kept_theirs +kept the remote's "person", dropped upstream "rep-2"\n`),
		regexp.MustCompile(`status +took_ours +wrote "on_hold"\n`),
		regexp.MustCompile(`  request   PATCH http://[^ ]+/assignments/acct-7 · If-Match "[^"]+" · → 200 · ETag "[^"]+" · [0-9.]+ms · applied\n`),
		regexp.MustCompile(`  finished  merged after \d+ attempt\(s\), ETag "[^"]+"`),
	}
	at := 0
	for _, re := range wantOrder {
		loc := re.FindStringIndex(text[at:])
		require.NotNil(t, loc, "want %s after offset %d in:\n%s", re, at, text)
		at += loc[1]
	}

	// --json: the rows of change_history, and the change row.
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"history", "--change", itoa(second), "--json", "--database-url", dbURL}, getenv, &out))
	var rep historyReport
	require.NoError(t, json.Unmarshal(out.Bytes(), &rep))
	require.Equal(t, second, rep.ChangeID)
	require.Equal(t, "acct-7", rep.ResourceID)
	var kinds []string
	for _, e := range rep.Events {
		kinds = append(kinds, e.Event)
	}
	require.Equal(t, []string{"staged", "attempt", "attempt", "merge", "attempt", "finished"}, kinds)
	require.Equal(t, int32(412), rep.Events[1].StatusCode)
	require.Len(t, rep.Changes, 1)
	require.Equal(t, "merged", rep.Changes[0].Status)
	require.NotNil(t, rep.Resource)
	require.NotNil(t, rep.Resource.ETag)

	// The resource: both changes, the first applied without a conflict.
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"history", "--resource", "acct-7", "--json", "--database-url", dbURL}, getenv, &out))
	rep = historyReport{}
	require.NoError(t, json.Unmarshal(out.Bytes(), &rep))
	require.Equal(t, "territory", rep.Target, "the only target that knows the id")
	require.Len(t, rep.Changes, 2)
	require.Equal(t, []string{"applied", "merged"}, []string{rep.Changes[0].Status, rep.Changes[1].Status})
	require.Equal(t, first, rep.Changes[0].ID)
	kinds = nil
	for _, e := range rep.Events {
		kinds = append(kinds, e.Event)
	}
	// A batch ETag lookup names no single resource, so the first change
	// has only its PATCH.
	require.Equal(t, []string{"staged", "attempt", "finished", "staged", "attempt", "attempt", "merge", "attempt", "finished"}, kinds)

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"history", "--target", "territory", "--resource", "acct-7", "--database-url", dbURL}, getenv, &out))
	require.Contains(t, out.String(), "RESOURCE territory/acct-7: 2 change(s)\n")
	require.Contains(t, out.String(), fmt.Sprintf("  request   #%d  PATCH ", first))
}

// resource_history finds a resource's changes through its requests,
// merges, open changes, last change and the changes that ended without a
// request of their own, and nothing of other resources.
func TestResourceHistorySQL(t *testing.T) {
	t.Parallel()
	_, pool := testDatabase(t)
	insertTarget(t, pool, "alpha", "beta")
	now := time.Now()
	sent := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "applied", finishedAt: now})
	coalesced := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "applied", finishedAt: now})
	merged := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "noop", finishedAt: now})
	last := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "rejected", finishedAt: now, lastError: "refused before sending"})
	open := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "pending"})
	// Ended without a request or merge of their own, and not the last.
	quietNoop := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "noop", finishedAt: now})
	quietRejected := insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "rejected", finishedAt: now, lastError: "not found"})
	other := insertFixture(t, pool, fixture{target: "alpha", resourceID: "s", status: "applied", finishedAt: now})
	otherTarget := insertFixture(t, pool, fixture{target: "beta", resourceID: "r", status: "applied", finishedAt: now})
	execSQL(t, pool, `INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url, if_match, status_code, response_etag, duration_ms, outcome)
		VALUES ('alpha', 'r', ARRAY[$1, $2]::bigint[], 'PATCH', 'http://x/r', '"e1"', 200, '"e2"', 5, 'applied'),
		       ('alpha', 's', ARRAY[$3]::bigint[], 'PATCH', 'http://x/s', '"e1"', 200, '"e2"', 5, 'applied'),
		       ('beta', 'r', ARRAY[$4]::bigint[], 'PATCH', 'http://y/r', '"e1"', 200, '"e2"', 5, 'applied'),
		       ('alpha', NULL, ARRAY[$1]::bigint[], 'GET', 'http://x?ids=r', NULL, 200, NULL, 5, 'fetched')`, sent, coalesced, other, otherTarget)
	execSQL(t, pool, `INSERT INTO stagesync.merges (target, resource_id, change_ids, base, ours, theirs, result, decisions, outcome)
		VALUES ('alpha', 'r', ARRAY[$1]::bigint[], '{}', '{"a": 1}', '{"a": 1}', '{}', '{"a": "already_equal"}', 'noop')`, merged)
	execSQL(t, pool, `INSERT INTO stagesync.resources (target, resource_id, etag, last_change_id) VALUES ('alpha', 'r', '"e2"', $1)`, last)

	rows, err := pool.Query(t.Context(), `SELECT event, change_ids FROM stagesync.resource_history('alpha', 'r')`)
	require.NoError(t, err)
	type ev struct {
		Event string
		IDs   []int64
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[ev])
	require.NoError(t, err)
	staged, finished := map[int64]bool{}, map[int64]bool{}
	var attempts, merges int
	for _, e := range got {
		switch e.Event {
		case "staged":
			staged[e.IDs[0]] = true
		case "finished":
			finished[e.IDs[0]] = true
		case "attempt":
			attempts++
			require.Equal(t, []int64{sent, coalesced}, e.IDs)
		case "merge":
			merges++
		}
	}
	require.Equal(t, map[int64]bool{sent: true, coalesced: true, merged: true, last: true, open: true, quietNoop: true, quietRejected: true}, staged)
	require.Equal(t, map[int64]bool{sent: true, coalesced: true, merged: true, last: true, quietNoop: true, quietRejected: true}, finished)
	require.Equal(t, 1, attempts, "the batch lookup and other resources' requests are not the resource's")
	require.Equal(t, 1, merges)
}

func TestHistoryRefusals(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	insertTarget(t, pool, "alpha", "beta")
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "shared", status: "pending"})
	insertFixture(t, pool, fixture{target: "beta", resourceID: "shared", status: "pending"})
	getenv := func(string) string { return "" }
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"nothing asked", nil, "history: give --change N, or --resource ID (with --target T when several targets know the id)"},
		{"both", []string{"--change", "1", "--resource", "x"}, "history: give --change, or --resource (with --target), not both"},
		{"unknown change", []string{"--change", "99999"}, "history: change 99999: not found (it never existed, or retention removed it)"},
		{"unknown resource", []string{"--resource", "nope"}, `history: resource "nope": not found: no target has a stored state, a request or a change for it`},
		{"unknown resource of a target", []string{"--target", "alpha", "--resource", "nope"}, `history: resource "nope" of target "alpha": not found`},
		{"ambiguous resource", []string{"--resource", "shared"}, `history: resource "shared" is known to the targets alpha, beta: give --target`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out bytes.Buffer
			err := run(t.Context(), append(append([]string{"history"}, tt.args...), "--database-url", dbURL), getenv, &out)
			require.EqualError(t, err, tt.want)
		})
	}
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"history", "--target", "beta", "--resource", "shared", "--database-url", dbURL}, getenv, &out))
	require.Contains(t, out.String(), "RESOURCE beta/shared: 1 change(s)\n")
}

func TestHistoryPage(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	s, first, second := conflictedResource(t, dbURL, pool)
	// A second target knows a resource of the same id, and a resource id
	// that is a number.
	insertTarget(t, pool, "erp")
	insertFixture(t, pool, fixture{target: "erp", resourceID: "acct-7", status: "pending"})
	insertFixture(t, pool, fixture{target: "erp", resourceID: "424242", status: "pending"})

	code, body := s.get(t, "/history?change="+itoa(second))
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `<h2 id="subject">Change `+itoa(second)+` of territory / <a href="/history?target=territory&amp;resource=acct-7">acct-7</a></h2>`)
	require.Contains(t, body, `<span class="event">merge</span>`)
	require.Contains(t, body, `<tr><td data-label="field">owner</td><td data-label="decision">kept_theirs</td><td class="err" data-label="values">kept the remote&#39;s &#34;person&#34;, dropped upstream &#34;rep-2&#34;</td></tr>`)
	require.Regexp(t, `<li class="conflict"><span class="when">[0-9 :.-]+</span><span class="event">request</span><a href="/history\?change=`+itoa(second)+`">#`+itoa(second)+`</a> <div class="what">PATCH http://[^ ]+/assignments/acct-7 · If-Match &#34;[^&]+&#34; · → 412`, body)
	require.NotContains(t, body, "<script")

	// The search form: a change id, a resource id in any target (two
	// know it: a choice), in one target, and a number that is no change.
	code, body = s.get(t, "/history?q="+itoa(first))
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `<h2 id="subject">Change `+itoa(first)+` of territory`)
	code, body = s.get(t, "/history?q=acct-7")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "Several targets know this resource id; choose one:")
	require.Contains(t, body, `<li><a href="/history?target=erp&amp;resource=acct-7">erp: acct-7</a></li><li><a href="/history?target=territory&amp;resource=acct-7">territory: acct-7</a></li>`)
	code, body = s.get(t, "/history?q=acct-7&target=territory")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `<h2 id="subject">Resource acct-7 of territory: 2 change(s)</h2>`)
	code, body = s.get(t, "/history?q=424242")
	require.Equal(t, http.StatusOK, code, "a number that is no change id is looked up as a resource id")
	require.Contains(t, body, `<h2 id="subject">Resource 424242 of erp: 1 change(s)</h2>`)
	code, body = s.get(t, "/history?q="+url.QueryEscape("no such thing"))
	require.Equal(t, http.StatusNotFound, code)
	require.Contains(t, body, `<p class="none" id="notice">Nothing found: resource &#34;no such thing&#34;: not found`)
	code, _ = s.get(t, "/history?change=abc")
	require.Equal(t, http.StatusBadRequest, code)
	// Text PostgreSQL refuses is no outage: a 400 saying no id can be so,
	// and no WARN in the log for whoever sends it.
	for _, bad := range []string{"/history?target=territory&resource=%ff%fe", "/history?resource=a%00b", "/history?q=%c3"} {
		code, body = s.get(t, bad)
		require.Equal(t, http.StatusBadRequest, code, "%s: got %d; want 400", bad, code)
		require.Contains(t, body, "UTF-8 text without NUL characters", bad)
	}
	require.NotContains(t, s.logs.String(), "history page: database query failed")
	code, body = s.get(t, "/history")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `<form class="search"`)
	require.True(t, strings.Contains(body, `<option>erp</option><option>territory</option>`), "the form offers the targets")
}

// The reporting role may read both lookups; the upstream role may not.
func TestLookupsAreGrantedToReporting(t *testing.T) {
	t.Parallel()
	_, pool := testDatabase(t)
	for _, q := range []string{
		`SELECT count(*) FROM stagesync.resource_history('alpha', 'r')`,
		`SELECT count(*) FROM stagesync.hot_resources`,
		`SELECT count(*) FROM stagesync.hot_resources_since(now() - interval '1 hour', 5)`,
	} {
		for role, allowed := range map[string]bool{"stagesync_reporting": true, "stagesync_admin": true, "stagesync_upstream": false} {
			err := pgx.BeginFunc(t.Context(), pool, func(tx pgx.Tx) error {
				if _, err := tx.Exec(t.Context(), `SET LOCAL ROLE `+role); err != nil {
					return err
				}
				var n int64
				return tx.QueryRow(t.Context(), q).Scan(&n)
			})
			if allowed {
				require.NoError(t, err, "%s: %s", role, q)
			} else {
				require.ErrorContains(t, err, "permission denied", "%s: %s", role, q)
			}
		}
	}
}

// A resource whose only change ended without a request (refused as not
// found by the batch lookup, say) is found by a search that names no
// target, and its change is shown.
func TestHistoryFindsAResourceWhoseOnlyChangeSentNothing(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	id := insertFixture(t, pool, fixture{target: "alpha", resourceID: "ghost", status: "rejected", finishedAt: time.Now(), lastError: "resource not found on the remote"})
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"history", "--resource", "ghost", "--database-url", dbURL}, func(string) string { return "" }, &out))
	require.Contains(t, out.String(), "RESOURCE alpha/ghost: 1 change(s)\n")
	require.Contains(t, out.String(), fmt.Sprintf("#%d", id))
	require.Contains(t, out.String(), "resource not found on the remote")
}

// With --limit the header still counts every change of the resource, and
// staged values read as staged (no HTML escapes in a terminal).
func TestHistoryLimitCountsEveryChangeAndShowsValuesAsStaged(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	start := time.Now().Add(-time.Hour)
	for i := range 5 {
		insertFixture(t, pool, fixture{target: "alpha", resourceID: "r", status: "noop",
			createdAt: start.Add(time.Duration(i) * time.Minute), finishedAt: start.Add(time.Duration(i)*time.Minute + time.Second)})
	}
	execSQL(t, pool, `UPDATE stagesync.changes SET fields = '{"note": "a & b < c"}'`)
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"history", "--target", "alpha", "--resource", "r", "--limit", "2", "--database-url", dbURL}, func(string) string { return "" }, &out))
	t.Logf("\n%s", out.String())
	require.Contains(t, out.String(), "RESOURCE alpha/r: 5 change(s), 1 of them in the events shown\n")
	require.Contains(t, out.String(), `{"note":"a & b < c"}`)
	require.NotContains(t, out.String(), `\u003c`)
}
