package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// One bad value costs its change, not the changes coalesced with it: a
// PATCH carrying five changes of one resource is refused 422 for the value
// of one of them; the changes are sent again one by one in id order, each
// with the ETag the previous one left, so only the two carrying a refused
// value end rejected (with the remote's reason) and the other three apply.
// Per field the highest applied id wins.
func TestRefusedCoalescedWriteIsSplit(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed", "region": "north"})
	h.startProcessor(configYAML(nil, nil))
	ids := h.insert(
		change{resource: "acct", fields: map[string]any{"status": "won"}},
		change{resource: "acct", fields: map[string]any{"region": "INVALID"}},
		change{resource: "acct", fields: map[string]any{"owner": "crm", "status": "closed"}},
		change{resource: "acct", fields: map[string]any{"score": "INVALID"}},
		change{resource: "acct", fields: map[string]any{"owner": "crm2"}},
	)
	h.waitDrained(30 * time.Second)

	rows := h.changes(ids)
	want := []string{"applied", "rejected", "applied", "rejected", "applied"}
	for i, id := range ids {
		require.Equal(t, want[i], rows[id].status, "change %d (#%d): got %s; want %s (last_error %q)", id, i, rows[id].status, want[i], rows[id].lastError)
	}
	require.Contains(t, rows[ids[1]].lastError, "field region: value INVALID is not allowed")
	require.Contains(t, rows[ids[3]].lastError, "field score: value INVALID is not allowed")
	h.requireRemote(map[string]map[string]any{"acct": {"status": "closed", "owner": "crm2", "region": "north"}})

	patches := 0
	for _, r := range h.sim.Requests() {
		if r.Method == http.MethodPatch {
			patches++
		}
	}
	require.Equal(t, 6, patches, "PATCHes: got %d; want 6 (the coalesced one, then one per change)", patches)
	require.Len(t, h.apiVersions("acct"), 3, "api writes: got %d; want 3 (the three good changes)", len(h.apiVersions("acct")))
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND cardinality(change_ids) = 1`)
	require.Equal(t, 5, n, "PATCH attempts carrying one change: got %d; want 5", n)
	h.requireAuditMatchesRemote()
}

// A resource with many pending changes is written in requests of at most
// max_coalesce changes (100 by default), in id order: no unbounded body,
// and a refusal costs at most that many changes a second request.
func TestCoalescingIsCapped(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		keys    map[string]string
		changes int
		want    []int
	}{
		{"max_coalesce 4", map[string]string{"max_coalesce": "4"}, 10, []int{4, 4, 2}},
		{"default 100", nil, 250, []int{100, 100, 50}},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.sim.Put("acct", map[string]any{"n": 0})
			h.startProcessor(configYAML(nil, tt.keys))
			var cs []change
			for i := range tt.changes {
				cs = append(cs, change{resource: "acct", fields: map[string]any{"n": i + 1}})
			}
			h.insert(cs...)
			h.waitDrained(60 * time.Second)
			require.Equal(t, map[string]int{"applied": tt.changes}, h.statusCounts())
			h.requireRemote(map[string]map[string]any{"acct": {"n": tt.changes}})
			h.requireIncreasing("acct", "n")
			var got []int
			rows, err := h.pool.Query(t.Context(), `SELECT cardinality(change_ids) FROM stagesync.attempts WHERE method = 'PATCH' ORDER BY id`)
			require.NoError(t, err)
			for rows.Next() {
				var k int
				require.NoError(t, rows.Scan(&k))
				got = append(got, k)
			}
			require.NoError(t, rows.Err())
			require.Equal(t, tt.want, got, "changes per PATCH: got %v; want %v", got, tt.want)
		})
	}
}

// A batch ETag lookup that leaves a resource out (a stale index, a page
// limit, a remote that ignores ids and answers []) does not prove it
// missing: a GET of the resource decides. It exists → it is written; 404 →
// only then rejected as not found.
func TestUnclearBatchLookupIsConfirmedWithAGet(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		omit     []string // nil: every entry (the answer is [])
		wantGets int
	}{
		{"two ids left out", []string{"acct-0001", "acct-0007"}, 3},
		{"the answer is []", nil, 11},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			ids := resourceIDs("acct", 10)
			h.seed(ids, map[string]any{"owner": "seed"})
			h.sim.SetMisbehavior(remotesim.Misbehavior{IDs: tt.omit, OmitFromBatchLookup: true})
			h.startProcessor(configYAML(nil, nil))
			var cs []change
			for _, id := range append(slices.Clone(ids), "ghost") {
				cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm-" + id}})
			}
			changeIDs := h.insert(cs...)
			h.waitDrained(30 * time.Second)
			rows := h.changes(changeIDs)
			for _, cid := range changeIDs {
				r := rows[cid]
				if r.resource == "ghost" {
					require.Equal(t, "rejected", r.status)
					require.Contains(t, r.lastError, "resource not found on the remote", "ghost last_error: got %q", r.lastError)
					continue
				}
				require.Equal(t, "applied", r.status, "change of %q: got %s; want applied (last_error %q)", r.resource, r.status, r.lastError)
			}
			st := h.sim.Stats()
			require.Equal(t, 1, st.BatchGets, "batch GETs: got %d; want 1", st.BatchGets)
			require.Equal(t, tt.wantGets, st.Gets, "single GETs: got %d; want %d (one per resource the lookup left unclear)", st.Gets, tt.wantGets)
			require.Equal(t, 10, st.Patches, "PATCHes: got %d; want 10", st.Patches)
			h.requireAuditMatchesRemote()
		})
	}
}

// A refused credential is the target's problem, not the changes': a 401
// (or a proxy's 407) on a write, a GET or the batch lookup pauses the
// target for every process (targets.paused_until, a reason that says to
// check the credential, one WARN), sends nothing more while paused, and
// keeps every change waiting without using up max_attempts (1 here). Once
// the remote takes the credential again, stagesync.lift_pause resumes at
// once, long before the pause (backoff.max, a minute) would have ended.
func TestRefusedCredentialPausesTheTarget(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		mb   remotesim.Misbehavior
	}{
		{"401 on writes", remotesim.Misbehavior{Status: http.StatusUnauthorized, StatusMethods: []string{http.MethodPatch}}},
		{"401 on the batch lookup and GETs", remotesim.Misbehavior{Status: http.StatusUnauthorized, StatusMethods: []string{http.MethodGet}}},
		{"407 on every request", remotesim.Misbehavior{Status: http.StatusProxyAuthRequired}},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			ids := resourceIDs("acct", 20)
			h.seed(ids, map[string]any{"owner": "seed"})
			h.sim.SetMisbehavior(tt.mb)
			h.env = map[string]string{"CRM_TOKEN": "token-that-was-revoked"}
			h.startProcessor(configYAML(nil, map[string]string{
				"auth": "{env: CRM_TOKEN}", "max_attempts": "1", "backoff": "{base: 10ms, max: 1m}"}))
			var cs []change
			for _, id := range ids {
				cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
			}
			changeIDs := h.insert(cs...)
			h.waitFor("the target paused in the database", 15*time.Second, func() bool {
				return h.count(`SELECT count(*) FROM stagesync.targets WHERE paused_until > now() + interval '30 seconds'`) == 1
			})
			refused := func() int {
				n := 0
				for _, r := range h.sim.Requests() {
					if r.Status == tt.mb.Status {
						n++
					}
				}
				return n
			}
			time.Sleep(300 * time.Millisecond)
			before, requests := refused(), h.sim.Stats().Requests
			time.Sleep(700 * time.Millisecond)
			require.Equal(t, requests, h.sim.Stats().Requests, "requests while paused: got %d more; want none", h.sim.Stats().Requests-requests)
			require.LessOrEqual(t, before, 17, "refused requests: got %d; want at most the in-flight limit and one", before)
			reason := h.strings(`SELECT pause_reason FROM stagesync.targets`)[0]
			require.Contains(t, reason, fmt.Sprint(tt.mb.Status))
			require.Contains(t, reason, "check the credential (header Authorization from environment variable CRM_TOKEN)")
			require.Contains(t, reason, "stagesync.lift_pause('crm')")
			require.NotContains(t, reason, "token-that-was-revoked")
			counts := h.statusCounts()
			require.Equal(t, len(ids), counts["processing"]+counts["pending"], "open changes while paused: got %v; want all %d waiting", counts, len(ids))
			require.Equal(t, 1, strings.Count(h.logs.tail(1<<30), "the remote refused the credential: target paused"), "credential WARN lines: want exactly 1")

			// The credential works again; an operator lifts the pause.
			h.sim.SetMisbehavior(remotesim.Misbehavior{})
			var was bool
			require.NoError(t, h.pool.QueryRow(t.Context(), `SELECT stagesync.lift_pause('crm')`).Scan(&was))
			require.True(t, was, "lift_pause: got false; want true (the target was paused)")
			h.waitDrained(15 * time.Second)
			rows := h.changes(changeIDs)
			for _, cid := range changeIDs {
				r := rows[cid]
				require.Equal(t, "applied", r.status, "change of %q: got %s; want applied (last_error %q)", r.resource, r.status, r.lastError)
				require.Equal(t, 1, r.attempts, "attempts of the change of %q: got %d; want 1 (refusals of the credential are not attempts)", r.resource, r.attempts)
			}
			h.requireAuditMatchesRemote()
		})
	}
}

// A credential the remote keeps refusing ends the waiting changes dead
// after give_up_after, saying so, like throttling does.
func TestRefusedCredentialEndsDeadAfterGiveUpAfter(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("acct", map[string]any{"owner": "seed"})
	h.sim.SetMisbehavior(remotesim.Misbehavior{Status: http.StatusUnauthorized})
	h.startProcessor(configYAML(nil, map[string]string{"give_up_after": "1s", "backoff": "{base: 10ms, max: 500ms}"}))
	ids := h.insert(change{resource: "acct", fields: map[string]any{"owner": "crm"}})
	h.waitDrained(30 * time.Second)
	r := h.changes(ids)[ids[0]]
	require.Equal(t, "dead", r.status)
	require.Contains(t, r.lastError, "gave up: the remote kept refusing the credential for longer than give_up_after (1s)")
	require.Contains(t, r.lastError, "no auth is configured for this target")
}

// The credential never travels back to the remote in anything stagesync
// builds from what it stored (where it is [redacted]): a resource whose
// ETag holds the credential is refused with words that say so (its ETag is
// never stored or sent as If-Match), and a PUT whose body would carry the
// [redacted] placeholder of a credential a person pasted into the record is
// not sent. Neighbours apply.
func TestCredentialNeverTravelsBackToTheRemote(t *testing.T) {
	t.Parallel()
	const secret = "tok-4f9a-secret"
	tests := []struct {
		name    string
		keys    map[string]string
		mb      remotesim.Misbehavior
		fields  map[string]any
		wantErr string
	}{
		{
			name:    "an ETag holding the credential",
			mb:      remotesim.Misbehavior{IDs: []string{"acct"}, ETagEchoesAuthorization: true},
			fields:  map[string]any{"status": "open"},
			wantErr: "the remote put the credential stagesync sends into this resource's ETag",
		},
		{
			name:    "a PUT body holding the redacted credential",
			keys:    map[string]string{"update_method": "PUT"},
			fields:  map[string]any{"status": "open", "note": "api key " + secret + " (do not share)"},
			wantErr: "a PUT would write that placeholder onto the remote (field note)",
		},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.sim.Put("acct", tt.fields)
			h.sim.Put("other", map[string]any{"status": "open"})
			h.sim.SetMisbehavior(tt.mb)
			h.env = map[string]string{"CRM_TOKEN": secret}
			keys := map[string]string{"auth": "{env: CRM_TOKEN}", "batch_etag_path": ""}
			for k, v := range tt.keys {
				keys[k] = v
			}
			h.startProcessor(configYAML(nil, keys))
			ids := h.insert(
				change{resource: "acct", fields: map[string]any{"status": "won"}},
				change{resource: "other", fields: map[string]any{"status": "won"}})
			h.waitDrained(30 * time.Second)
			rows := h.changes(ids)
			require.Equal(t, "rejected", rows[ids[0]].status, "acct: got %s; want rejected (last_error %q)", rows[ids[0]].status, rows[ids[0]].lastError)
			require.Contains(t, rows[ids[0]].lastError, tt.wantErr)
			require.Equal(t, "applied", rows[ids[1]].status, "other: got %s (last_error %q)", rows[ids[1]].status, rows[ids[1]].lastError)
			for _, r := range h.sim.Requests() {
				if r.ID == "acct" {
					require.Equal(t, http.MethodGet, r.Method, "requests for acct: got a %s; want only GETs", r.Method)
				}
			}
			got, _, _ := h.sim.Get("acct")
			require.Equal(t, jsonNorm(tt.fields), got, "acct on the remote: got %v; want it untouched", got)
			require.Zero(t, h.count(`SELECT count(*) FROM stagesync.resources r WHERE r::text LIKE '%' || $1 || '%'`, secret))
			require.Zero(t, h.count(`SELECT count(*) FROM stagesync.resources WHERE etag LIKE '%[redacted]%'`), "a redacted ETag was stored")
			require.Zero(t, h.count(`SELECT count(*) FROM stagesync.attempts a WHERE a::text LIKE '%' || $1 || '%'`, secret))
		})
	}
}

// Odd answers end the change with words that say what happened and what
// to do, not just a status: a write answered 404 or 410, 403, 405, 415 or a
// redirect, and a 200 whose body is a web page where a document was needed.
// The neighbour resource applies.
func TestOddAnswersGetClearWords(t *testing.T) {
	t.Parallel()
	patch := []string{http.MethodPatch}
	tests := []struct {
		name string
		keys map[string]string
		mb   remotesim.Misbehavior
		// gone: the resource is not on the remote although an ETag is
		// stored for it.
		gone bool
		want []string
	}{
		{name: "404 on a write", gone: true,
			want: []string{"404", "the resource does not exist on the remote", "op create"}},
		{name: "410 on a write", mb: remotesim.Misbehavior{Status: http.StatusGone, StatusMethods: patch},
			want: []string{"410", "gone for good", "op create"}},
		{name: "403 on a write", mb: remotesim.Misbehavior{Status: http.StatusForbidden, StatusMethods: patch},
			want: []string{"403", "may not change this resource", "permissions"}},
		{name: "405 on a write", mb: remotesim.Misbehavior{Status: http.StatusMethodNotAllowed, StatusMethods: patch},
			want: []string{"405", "does not allow PATCH", "update_method"}},
		{name: "415 on a write", mb: remotesim.Misbehavior{Status: http.StatusUnsupportedMediaType, StatusMethods: patch},
			want: []string{"415", "Content-Type: application/json"}},
		{name: "302 on a write", mb: remotesim.Misbehavior{Status: http.StatusFound, StatusMethods: patch},
			want: []string{"302", "redirect to /elsewhere", "never follows", "base_url"}},
		{name: "200 with a web page, PUT", keys: map[string]string{"update_method": "PUT", "batch_etag_path": ""},
			mb:   remotesim.Misbehavior{HTMLBody: true},
			want: []string{"text/html", "not a JSON object", "base_url"}},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.sim.Put("other", map[string]any{"status": "open"})
			if !tt.gone {
				h.sim.Put("acct", map[string]any{"status": "open"})
			}
			tt.mb.IDs = []string{"acct"}
			h.sim.SetMisbehavior(tt.mb)
			h.startProcessor(configYAML(nil, tt.keys))
			if tt.gone {
				_, err := h.pool.Exec(t.Context(), `INSERT INTO stagesync.resources (target, resource_id, etag, snapshot)
					VALUES ($1, 'acct', '"e1"', '{"status": "open"}')`, target)
				require.NoError(t, err)
			}
			ids := h.insert(
				change{resource: "acct", fields: map[string]any{"status": "won"}},
				change{resource: "other", fields: map[string]any{"status": "won"}})
			h.waitDrained(30 * time.Second)
			rows := h.changes(ids)
			r := rows[ids[0]]
			t.Logf("last_error: %s", r.lastError)
			require.Equal(t, "rejected", r.status, "acct: got %s; want rejected (last_error %q)", r.status, r.lastError)
			for _, w := range tt.want {
				require.Contains(t, r.lastError, w)
			}
			require.Equal(t, "applied", rows[ids[1]].status, "other: got %s (last_error %q)", rows[ids[1]].status, rows[ids[1]].lastError)
		})
	}
}

// A merged write refused after a write in doubt was resolved costs only its
// culprit: the in-doubt change, which landed (the read shows its value),
// ends applied rather than rejected for a value it does not carry, and the
// newer changes written with the merge are split so only the one with the
// refused value is rejected.
func TestRefusalAfterAResolvedDoubtCostsOnlyItsCulprit(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "20"}))
	h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
	h.waitDrained(30 * time.Second)

	// The write of the first change lands and its answer is dropped;
	// newer changes arrive while it is in doubt, one with a value the
	// remote refuses.
	first, newer := h.inDoubtThen(change{resource: "acct", fields: map[string]any{"status": "s1"}}, nil,
		change{resource: "acct", fields: map[string]any{"prio": "p2"}},
		change{resource: "acct", fields: map[string]any{"region": "INVALID"}},
		change{resource: "acct", fields: map[string]any{"owner": "o4"}},
	)
	h.waitDrained(30 * time.Second)

	rows := h.changes(append([]int64{first}, newer...))
	want := map[int64]string{first: "applied", newer[0]: "applied", newer[1]: "rejected", newer[2]: "applied"}
	for id, st := range want {
		require.Equal(t, st, rows[id].status, "change #%d: got %s; want %s (last_error %q)", id, rows[id].status, st, rows[id].lastError)
	}
	require.Contains(t, rows[newer[1]].lastError, "field region: value INVALID is not allowed")
	require.Equal(t, 1, h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'unknown'`), "the lost answer is in the audit")
	h.requireRemote(map[string]map[string]any{"acct": {"status": "s1", "owner": "o4", "prio": "p2", "note": "w1"}})
	for _, v := range h.apiVersions("acct") {
		require.NotEqual(t, "INVALID", v.Written["region"])
	}
}

// The split of a refused write after a resolved doubt never sends the
// in-doubt change alone as if nothing were in doubt: its write landed, a
// person then changed the field, and a newer change of the same field (with
// a value the remote refuses) decided the combined write. The in-doubt
// change is judged by the in-doubt rules (the person's edit is never
// overwritten: review), the newer one is rejected, and the person's value
// stays; no API write repeats the in-doubt value.
func TestSplitAfterADoubtKeepsTheInDoubtRules(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "20"}))
	h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
	h.waitDrained(30 * time.Second)

	first, newer := h.inDoubtThen(change{resource: "acct", fields: map[string]any{"status": "s1"}},
		func() { h.sim.Edit("acct", map[string]any{"status": "X"}, "person") },
		change{resource: "acct", fields: map[string]any{"status": "s2", "region": "INVALID"}},
		change{resource: "acct", fields: map[string]any{"prio": "p3"}},
	)
	h.waitDrained(30 * time.Second)

	rows := h.changes(append([]int64{first}, newer...))
	require.Equal(t, "dead", rows[first].status, "in-doubt change (last_error %q)", rows[first].lastError)
	require.Contains(t, rows[first].lastError, "needs_review")
	require.Equal(t, "rejected", rows[newer[0]].status, "the change with the refused value (last_error %q)", rows[newer[0]].lastError)
	require.Equal(t, "applied", rows[newer[1]].status, "the other newer change (last_error %q)", rows[newer[1]].lastError)
	got, _, _ := h.sim.Get("acct")
	require.Equal(t, "X", got["status"], "the person's edit was overwritten")
	require.Equal(t, "p3", got["prio"])
	n := 0
	for _, v := range h.apiVersions("acct") {
		if v.Written["status"] == "s1" {
			n++
		}
	}
	require.Equal(t, 1, n, "API writes of status s1: got %d; want 1 (the write that landed)", n)
}

// inDoubtThen stages first while the remote drops the answer of every write
// it committed, so first's write lands and is in doubt. At that moment
// meanwhile runs (if set) and newer is staged. It returns first's id and
// newer's ids, once all are staged; the processor then resolves the doubt.
func (h *harness) inDoubtThen(first change, meanwhile func(), newer ...change) (int64, []int64) {
	h.t.Helper()
	var once sync.Once
	var newerIDs []int64
	h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(context.Context, remotesim.Commit) {
		once.Do(func() {
			h.sim.SetFaults(remotesim.Faults{})
			if meanwhile != nil {
				meanwhile()
			}
			ids, err := h.tryInsert(newer...)
			if err != nil {
				h.t.Errorf("stage the newer changes: %v", err)
			}
			newerIDs = ids
		})
	}})
	h.sim.SetFaults(remotesim.Faults{DropAfterCommitRate: 1})
	firstID := h.insert(first)[0]
	h.waitFor("the newer changes staged", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.changes WHERE id > $1`, firstID) == len(newer)
	})
	require.Len(h.t, newerIDs, len(newer))
	return firstID, newerIDs
}
