package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// unreadDetail is the outcome_detail of a change written again at once
// after a conflict, without reading the remote.
const unreadDetail = "written again at once after a conflict, with the ETag the conflict answer carried: every field it sets has policy ours, so the remote's values (not read) could not change what to write; a PATCH leaves the remote's other fields as they are"

// A conflict need not cost a GET: when every field still to write has
// policy ours and the 412 carries the current ETag, stagesync PATCHes again
// at once with it. A person's edit of a field stagesync does not send
// survives; where a field to write is policy theirs the GET stays and the
// person's value of it is never overwritten; a PUT target keeps the GET.
// The merges row says theirs was not read, and the hot-resources view does
// not claim to know which fields the person changed.
func TestConflictOnOursFieldsIsWrittenAgainWithoutAGet(t *testing.T) {
	t.Parallel()
	base := map[string]any{"status": "open", "owner": "seed", "notes": ""}
	type want struct {
		requests  map[attemptKey]int
		remote    map[string]any
		status    string
		detail    string
		decisions map[string]string
		theirs    bool // the merges row holds theirs (the GET's body)
	}
	patch200, patch412, get200, put200, put412 := attemptKey{"PATCH", 200}, attemptKey{"PATCH", 412}, attemptKey{"GET", 200}, attemptKey{"PUT", 200}, attemptKey{"PUT", 412}
	tests := []struct {
		name   string
		method string
		edit   map[string]any // the person's edit between the syncs
		change map[string]any // the second sync
		want   want
	}{
		{"a person edits a field stagesync does not send", "PATCH",
			map[string]any{"notes": "call back"}, map[string]any{"status": "won"}, want{
				requests:  map[attemptKey]int{patch412: 1, patch200: 1},
				remote:    map[string]any{"status": "won", "owner": "seed", "notes": "call back"},
				status:    "merged",
				detail:    unreadDetail,
				decisions: map[string]string{"status": "took_ours_unread"},
			}},
		{"a person edits the field stagesync sends (policy ours)", "PATCH",
			map[string]any{"status": "lost"}, map[string]any{"status": "won"}, want{
				requests:  map[attemptKey]int{patch412: 1, patch200: 1},
				remote:    map[string]any{"status": "won", "owner": "seed", "notes": ""},
				status:    "merged",
				detail:    unreadDetail,
				decisions: map[string]string{"status": "took_ours_unread"},
			}},
		{"a person edits a theirs field stagesync also sends", "PATCH",
			map[string]any{"owner": "alice"}, map[string]any{"status": "won", "owner": "crm-bob"}, want{
				requests:  map[attemptKey]int{patch412: 1, get200: 1, patch200: 1},
				remote:    map[string]any{"status": "won", "owner": "alice", "notes": ""},
				status:    "merged",
				detail:    "kept the remote's value for owner (policy theirs)",
				decisions: map[string]string{"status": "took_ours", "owner": "kept_theirs"},
				theirs:    true,
			}},
		{"a PUT target", "PUT",
			map[string]any{"notes": "call back"}, map[string]any{"status": "won"}, want{
				requests:  map[attemptKey]int{put412: 1, get200: 1, put200: 1},
				remote:    map[string]any{"status": "won", "owner": "seed", "notes": "call back"},
				status:    "merged",
				decisions: map[string]string{"status": "took_ours"},
				theirs:    true,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.seed([]string{"acct-1"}, base)
			h.startProcessor(configYAML(nil, map[string]string{
				"update_method": tt.method, "merge": "{default: ours, fields: {owner: theirs}}"}))
			h.insert(change{resource: "acct-1", fields: map[string]any{"status": "synced"}})
			h.waitDrained(30 * time.Second)
			_, ok := h.sim.Edit("acct-1", tt.edit, "a person")
			require.True(t, ok, "the person's edit: got false; want true")
			before := h.count(`SELECT coalesce(max(id), 0) FROM stagesync.attempts`)

			ids := h.insert(change{resource: "acct-1", fields: tt.change})
			h.waitDrained(30 * time.Second)

			require.Equal(t, tt.want.requests, h.attemptsSince(before), "requests of the second sync: got %v; want %v", h.attemptsSince(before), tt.want.requests)
			got, _, _ := h.sim.Get("acct-1")
			require.Equal(t, jsonNorm(tt.want.remote), got, "remote: got %v; want %v", got, tt.want.remote)
			r := h.changes(ids)[ids[0]]
			require.Equal(t, tt.want.status, r.status, "change status: got %s; want %s (last_error %q)", r.status, tt.want.status, r.lastError)
			require.Equal(t, tt.want.detail, h.outcomeDetail(ids[0]), "outcome_detail: got %q; want %q", h.outcomeDetail(ids[0]), tt.want.detail)
			_, etag, _ := h.sim.Get("acct-1")
			require.Equal(t, etag, r.appliedETag, "applied_etag: got %q; want the remote's %q", r.appliedETag, etag)

			var decisions []byte
			var outcome string
			var hasTheirs bool
			require.NoError(t, h.pool.QueryRow(context.Background(), `
				SELECT decisions, outcome, theirs IS NOT NULL FROM stagesync.merges
				WHERE resource_id = 'acct-1' AND change_ids @> $1::bigint[]`, ids).Scan(&decisions, &outcome, &hasTheirs))
			var gotDecisions map[string]string
			require.NoError(t, json.Unmarshal(decisions, &gotDecisions))
			require.Equal(t, tt.want.decisions, gotDecisions, "merge decisions: got %v; want %v", gotDecisions, tt.want.decisions)
			require.Equal(t, "merged", outcome, "merge outcome: got %s; want merged", outcome)
			require.Equal(t, tt.want.theirs, hasTheirs, "merges.theirs recorded: got %v; want %v", hasTheirs, tt.want.theirs)

			// The next write needs no GET either: the stored state is the
			// remote's (the PATCH answer's body).
			before = h.count(`SELECT coalesce(max(id), 0) FROM stagesync.attempts`)
			h.insert(change{resource: "acct-1", fields: map[string]any{"status": "closed"}})
			h.waitDrained(30 * time.Second)
			wantNext := map[attemptKey]int{patch200: 1}
			if tt.method == "PUT" {
				wantNext = map[attemptKey]int{put200: 1}
			}
			require.Equal(t, wantNext, h.attemptsSince(before), "requests of the third sync: got %v; want %v", h.attemptsSince(before), wantNext)
			got, _, _ = h.sim.Get("acct-1")
			for f, v := range tt.want.remote {
				if f != "status" {
					require.Equal(t, v, got[f], "remote %s after the third sync: got %v; want %v", f, got[f], v)
				}
			}

			var changed []string
			require.NoError(t, h.pool.QueryRow(context.Background(), `
				SELECT changed_fields FROM stagesync.hot_resources WHERE resource_id = 'acct-1'`).Scan(&changed))
			if !tt.want.theirs {
				require.Empty(t, changed, "hot_resources.changed_fields after an unread merge: got %v; want none (which field the person changed is not known)", changed)
			}
		})
	}
}

// When the ETag a conflict answer carries is not current after all (a
// proxy's stale header, or another edit in between), the rewrite conflicts
// too; stagesync then reads the resource and merges as usual, and a
// person's edit still survives.
func TestUnreadRewriteThatConflictsFallsBackToAGet(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.seed([]string{"acct-1"}, map[string]any{"status": "open", "notes": ""})
	// The remote's 412 answers name an ETag that is never current.
	stale := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.sim.ServeHTTP(&staleETagOnConflict{ResponseWriter: w}, r)
	}))
	t.Cleanup(stale.Close)
	h.env = map[string]string{"STALE_URL": stale.URL}
	h.startProcessor(configYAML(nil, map[string]string{"base_url": "${STALE_URL}"}))
	h.insert(change{resource: "acct-1", fields: map[string]any{"status": "synced"}})
	h.waitDrained(30 * time.Second)
	_, ok := h.sim.Edit("acct-1", map[string]any{"notes": "call back"}, "a person")
	require.True(t, ok)
	before := h.count(`SELECT coalesce(max(id), 0) FROM stagesync.attempts`)

	ids := h.insert(change{resource: "acct-1", fields: map[string]any{"status": "won"}})
	h.waitDrained(30 * time.Second)

	want := map[attemptKey]int{{"PATCH", 412}: 2, {"GET", 200}: 1, {"PATCH", 200}: 1}
	require.Equal(t, want, h.attemptsSince(before), "requests: got %v; want the conflict, the unread rewrite's conflict, a GET and the merged write", h.attemptsSince(before))
	got, _, _ := h.sim.Get("acct-1")
	require.Equal(t, map[string]any{"status": "won", "notes": "call back"}, got, "remote: got %v; want status won and the person's notes", got)
	r := h.changes(ids)[ids[0]]
	require.Equal(t, "merged", r.status, "change status: got %s; want merged (last_error %q)", r.status, r.lastError)
	require.Equal(t, 3, r.attempts, "attempts: got %d; want 3 (one per write)", r.attempts)
}

// staleETagOnConflict replaces the ETag of a 412 answer with one that is
// never current.
type staleETagOnConflict struct{ http.ResponseWriter }

func (w *staleETagOnConflict) WriteHeader(code int) {
	if code == http.StatusPreconditionFailed {
		w.Header().Set("ETag", `"not-current"`)
	}
	w.ResponseWriter.WriteHeader(code)
}

// attemptsSince counts the attempts rows after id by method and status.
func (h *harness) attemptsSince(id int) map[attemptKey]int {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(),
		`SELECT method, coalesce(status_code, 0) FROM stagesync.attempts WHERE id > $1`, id)
	require.NoError(h.t, err)
	defer rows.Close()
	out := map[attemptKey]int{}
	for rows.Next() {
		var k attemptKey
		require.NoError(h.t, rows.Scan(&k.method, &k.status))
		out[k]++
	}
	require.NoError(h.t, rows.Err())
	return out
}
