package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// mergePolicies is the field-policy part of the merge tests' config.
const mergePolicies = "{default: ours, fields: {status: ours, owner: theirs, region: manual}}"

// Remote edits between the stored base and new changes, one category of
// conflict per group of resources; every field is checked on the remote,
// in the change states and in the merges rows.
func TestMergePolicies(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	base := map[string]any{"status": "open", "owner": "seed-owner", "region": "north", "note": "n0"}

	type want struct {
		statuses  []string           // per change, in order
		details   []string           // per change: its outcome_detail; nil: all empty
		lastError string             // substring of a dead change's last_error
		decisions map[string]string  // the merges row's decisions; nil: no merge
		outcome   string             // the merges row's outcome
		remote    map[string]any     // fields that differ from base (after note: w1)
		requests  map[attemptKey]int // wave-2 requests to the resource
	}
	type category struct {
		name    string
		edit    map[string]any // the other user's edit; nil: none
		changes []map[string]any
		want    want
	}
	patch200 := attemptKey{"PATCH", 200}
	patch412 := attemptKey{"PATCH", 412}
	get200 := attemptKey{"GET", 200}
	categories := []category{
		{"untouched", nil, []map[string]any{{"status": "closed"}}, want{
			statuses: []string{"applied"},
			remote:   map[string]any{"status": "closed"},
			requests: map[attemptKey]int{patch200: 1},
		}},
		{"owner edited, ours sets owner and status", map[string]any{"owner": "alice"},
			[]map[string]any{{"owner": "crm-bob", "status": "won"}}, want{
				statuses:  []string{"merged"},
				details:   []string{"kept the remote's value for owner (policy theirs)"},
				decisions: map[string]string{"owner": "kept_theirs", "status": "took_ours"},
				outcome:   "merged",
				remote:    map[string]any{"owner": "alice", "status": "won"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1, patch200: 1},
			}},
		// Every field to write is policy ours: the conflict's ETag is used
		// at once, without a GET (t7: rewriteUnread).
		{"status edited, ours sets status", map[string]any{"status": "lost"},
			[]map[string]any{{"status": "won"}}, want{
				statuses:  []string{"merged"},
				details:   []string{unreadDetail},
				decisions: map[string]string{"status": "took_ours_unread"},
				outcome:   "merged",
				remote:    map[string]any{"status": "won"},
				requests:  map[attemptKey]int{patch412: 1, patch200: 1},
			}},
		{"region edited, ours sets another region", map[string]any{"region": "south"},
			[]map[string]any{{"region": "east"}}, want{
				statuses:  []string{"dead"},
				lastError: "needs_review",
				decisions: map[string]string{"region": "needs_review"},
				outcome:   "needs_review",
				remote:    map[string]any{"region": "south"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1},
			}},
		{"region edited to ours", map[string]any{"region": "east"},
			[]map[string]any{{"region": "east"}}, want{
				statuses:  []string{"noop"},
				details:   []string{"nothing sent: the remote already held these values"},
				decisions: map[string]string{"region": "already_equal"},
				outcome:   "noop",
				remote:    map[string]any{"region": "east"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1},
			}},
		{"owner edited, ours sets status", map[string]any{"owner": "carol"},
			[]map[string]any{{"status": "won"}}, want{
				statuses:  []string{"merged"},
				details:   []string{unreadDetail},
				decisions: map[string]string{"status": "took_ours_unread"},
				outcome:   "merged",
				remote:    map[string]any{"owner": "carol", "status": "won"},
				requests:  map[attemptKey]int{patch412: 1, patch200: 1},
			}},
		// A value set aside by a policy is a merge, not a noop: noop means
		// the remote already held the value (issue 7 §5).
		{"owner edited, ours sets owner", map[string]any{"owner": "dave"},
			[]map[string]any{{"owner": "crm-erin"}}, want{
				statuses:  []string{"merged"},
				details:   []string{"kept the remote's value for owner (policy theirs)"},
				decisions: map[string]string{"owner": "kept_theirs"},
				outcome:   "merged",
				remote:    map[string]any{"owner": "dave"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1},
			}},
		{"region edited, ours sets region then status", map[string]any{"region": "west"},
			[]map[string]any{{"region": "east"}, {"status": "won"}}, want{
				statuses:  []string{"dead", "merged"},
				lastError: "needs_review",
				decisions: map[string]string{"region": "needs_review", "status": "took_ours"},
				outcome:   "needs_review",
				remote:    map[string]any{"region": "west", "status": "won"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1, patch200: 1},
			}},
		{"owner edited, ours sets owner then status", map[string]any{"owner": "frank"},
			[]map[string]any{{"owner": "crm-gina"}, {"status": "won"}}, want{
				statuses:  []string{"merged", "merged"},
				details:   []string{"kept the remote's value for owner (policy theirs)", ""},
				decisions: map[string]string{"owner": "kept_theirs", "status": "took_ours"},
				outcome:   "merged",
				remote:    map[string]any{"owner": "frank", "status": "won"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1, patch200: 1},
			}},
		{"status and owner edited, ours sets both", map[string]any{"status": "lost", "owner": "hank"},
			[]map[string]any{{"status": "won", "owner": "crm-ivan"}}, want{
				statuses:  []string{"merged"},
				details:   []string{"kept the remote's value for owner (policy theirs)"},
				decisions: map[string]string{"owner": "kept_theirs", "status": "took_ours"},
				outcome:   "merged",
				remote:    map[string]any{"owner": "hank", "status": "won"},
				requests:  map[attemptKey]int{patch412: 1, get200: 1, patch200: 1},
			}},
	}
	const perCategory = 4
	resOf := func(ci, k int) string { return fmt.Sprintf("c%02d-%d", ci, k) }
	var all []string
	for ci := range categories {
		for k := range perCategory {
			all = append(all, resOf(ci, k))
		}
	}
	h.seed(all, base)
	h.startProcessor(configYAML(nil, map[string]string{"merge": mergePolicies}))

	// Wave 1 stores every resource's ETag and snapshot (the merge base).
	var wave1 []change
	for _, id := range all {
		wave1 = append(wave1, change{resource: id, fields: map[string]any{"note": "w1"}})
	}
	h.insert(wave1...)
	h.waitDrained(30 * time.Second)
	require.Equal(t, map[string]int{"applied": len(all)}, h.statusCounts(), "wave 1: got %v; want all applied", h.statusCounts())
	lastAttempt := h.count(`SELECT coalesce(max(id), 0) FROM stagesync.attempts`)

	// The other users' edits, then wave 2.
	type placed struct {
		ci, k int
		ids   []int64
	}
	var wave2 []change
	var order []placed
	for ci, c := range categories {
		for k := range perCategory {
			id := resOf(ci, k)
			if c.edit != nil {
				_, ok := h.sim.Edit(id, c.edit, "other-user")
				require.True(t, ok, "edit %q: got false; want true", id)
			}
			p := placed{ci: ci, k: k}
			for _, f := range c.changes {
				wave2 = append(wave2, change{resource: id, fields: f})
				p.ids = append(p.ids, 0)
			}
			order = append(order, p)
		}
	}
	ids := h.insert(wave2...)
	next := 0
	for i := range order {
		for j := range order[i].ids {
			order[i].ids[j] = ids[next]
			next++
		}
	}
	h.waitDrained(30 * time.Second)

	rows := h.changes(ids)
	stored := h.storedResources()
	for ci, c := range categories {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			for _, p := range order {
				if p.ci != ci {
					continue
				}
				id := resOf(p.ci, p.k)
				// Change states.
				for j, cid := range p.ids {
					r := rows[cid]
					require.Equal(t, c.want.statuses[j], r.status, "change %d (%v) of %q: got %s; want %s (last_error %q)",
						cid, c.changes[j], id, r.status, c.want.statuses[j], r.lastError)
					if r.status == "dead" {
						require.Contains(t, r.lastError, c.want.lastError, "last_error of change %d: got %q; want it to contain %q", cid, r.lastError, c.want.lastError)
					}
					wantDetail := ""
					if c.want.details != nil {
						wantDetail = c.want.details[j]
					}
					if r.status != "dead" {
						require.Equal(t, wantDetail, h.outcomeDetail(cid), "outcome_detail of change %d: got %q; want %q", cid, h.outcomeDetail(cid), wantDetail)
						var shown string
						require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT coalesce(detail->>'outcome_detail', '')
							FROM stagesync.change_history($1) WHERE event = 'finished'`, cid).Scan(&shown))
						require.Equal(t, wantDetail, shown, "change_history's finished event of change %d: got %q; want %q", cid, shown, wantDetail)
					}
				}
				// Written changes carry the ETag of their write; the stored
				// ETag is the remote's, whatever the outcome.
				_, etag, _ := h.sim.Get(id)
				for _, cid := range p.ids {
					r := rows[cid]
					want := ""
					if r.status == "applied" || r.status == "merged" {
						want = etag
					}
					require.Equal(t, want, r.appliedETag, "applied_etag of %s change %d: got %q; want %q", r.status, cid, r.appliedETag, want)
				}
				require.Equal(t, etag, stored[id].etag, "stored ETag of %q: got %q; want %q", id, stored[id].etag, etag)
				// The remote, field by field.
				wantRemote := map[string]any{"status": "open", "owner": "seed-owner", "region": "north", "note": "w1"}
				for f, v := range c.want.remote {
					wantRemote[f] = v
				}
				got, _, _ := h.sim.Get(id)
				for _, f := range []string{"status", "owner", "region", "note"} {
					require.Equal(t, wantRemote[f], got[f], "remote %s of %q: got %v; want %v", f, id, got[f], wantRemote[f])
				}
				if o, ok := c.edit["owner"]; ok {
					require.Equal(t, o, got["owner"], "owner of %q (user edit, policy theirs): got %v; want the user's %v", id, got["owner"], o)
				}
				// Wave-2 requests, from the audit.
				reqs := map[attemptKey]int{}
				r2, err := h.pool.Query(context.Background(), `
					SELECT method, coalesce(status_code, 0) FROM stagesync.attempts
					WHERE id > $1 AND resource_id = $2`, lastAttempt, id)
				require.NoError(t, err)
				for r2.Next() {
					var k attemptKey
					require.NoError(t, r2.Scan(&k.method, &k.status))
					reqs[k]++
				}
				require.NoError(t, r2.Err())
				require.Equal(t, c.want.requests, reqs, "wave-2 requests of %q: got %v; want %v", id, reqs, c.want.requests)
				// The merges row.
				var n int
				var decisions []byte
				var outcome string
				var changeIDs []int64
				err = h.pool.QueryRow(context.Background(), `
					SELECT count(*) OVER (), decisions, outcome, change_ids FROM stagesync.merges
					WHERE target = $1 AND resource_id = $2 ORDER BY id DESC LIMIT 1`, target, id).
					Scan(&n, &decisions, &outcome, &changeIDs)
				if c.want.decisions == nil {
					require.ErrorIs(t, err, pgx.ErrNoRows, "merges rows of %q: got one; want none", id)
					continue
				}
				require.NoError(t, err, "merges row of %q", id)
				require.Equal(t, 1, n, "merges rows of %q: got %d; want 1", id, n)
				var gotDecisions map[string]string
				require.NoError(t, json.Unmarshal(decisions, &gotDecisions))
				require.Equal(t, c.want.decisions, gotDecisions, "merge decisions of %q: got %v; want %v", id, gotDecisions, c.want.decisions)
				require.Equal(t, c.want.outcome, outcome, "merge outcome of %q: got %s; want %s", id, outcome, c.want.outcome)
				require.Equal(t, p.ids, changeIDs, "merge change_ids of %q: got %v; want %v", id, changeIDs, p.ids)
			}
		})
	}
	st := h.sim.Stats()
	require.Equal(t, 1, st.MaxInFlightPerResource, "max in flight per resource: got %d; want 1", st.MaxInFlightPerResource)
	h.requireAuditMatchesRemote()
}

// Other users edit owner, status and region of random resources while the
// processor works. Each resource gets one change setting owner (policy
// theirs) and status (policy ours): its single api write must carry our
// status, and must keep the owner whenever the version it replaced held a
// user's owner.
func TestOtherUsersDuringRun(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 409, Seed: 7})
	ids := resourceIDs("busy", 60)
	h.seed(ids, map[string]any{"status": "open", "owner": "seed-owner", "region": "north"})
	h.startProcessor(configYAML(nil, map[string]string{"merge": mergePolicies, "batch_size": "10", "concurrency": "4", "max_attempts": "50"}))
	var wave1 []change
	for _, id := range ids {
		wave1 = append(wave1, change{resource: id, fields: map[string]any{"note": "w1"}})
	}
	h.insert(wave1...)
	h.waitDrained(30 * time.Second)
	baseVersions := map[string]int{}
	for _, id := range ids {
		baseVersions[id] = len(h.sim.History(id))
	}

	h.sim.SetFaults(remotesim.Faults{Latency: 10 * time.Millisecond})
	stop := h.sim.StartOtherUsers(context.Background(), 400, []string{"owner", "status", "region"})
	defer stop()
	var wave2 []change
	for i, id := range ids {
		wave2 = append(wave2, change{resource: id, fields: map[string]any{"owner": fmt.Sprintf("crm-%d", i), "status": fmt.Sprintf("s-%d", i)}})
	}
	h.insert(wave2...)
	h.waitDrained(60 * time.Second)
	stop()

	counts := h.statusCounts()
	require.Zero(t, counts["dead"]+counts["rejected"]+counts["noop"], "wave 2: got %v; want only applied and merged", counts)
	require.Greater(t, h.sim.Stats().Conflicts, 0, "conflicts: got 0; want some (other users edit at 400/s)")
	for i, id := range ids {
		hist := h.sim.History(id)[baseVersions[id]:]
		var api []int
		for k, v := range hist {
			if v.Writer == "api" {
				api = append(api, k)
			}
		}
		require.Len(t, api, 1, "api writes of %q after wave 1: got %d; want 1", id, len(api))
		k := api[0]
		v := hist[k]
		prev := h.sim.History(id)[baseVersions[id]-1]
		if k > 0 {
			prev = hist[k-1]
		}
		require.Equal(t, fmt.Sprintf("s-%d", i), v.Fields["status"], "status written to %q: got %v; want ours", id, v.Fields["status"])
		require.Equal(t, prev.Fields["region"], v.Fields["region"], "region of %q: got %v; want the remote's %v (never sent)", id, v.Fields["region"], prev.Fields["region"])
		if owner, _ := prev.Fields["owner"].(string); strings.HasPrefix(owner, "user-edit-") {
			require.Equal(t, owner, v.Fields["owner"], "owner of %q overwrote a user's edit: got %v; want %v", id, v.Fields["owner"], owner)
		} else {
			require.Equal(t, fmt.Sprintf("crm-%d", i), v.Fields["owner"], "owner of %q: got %v; want ours", id, v.Fields["owner"])
		}
	}
	h.requireAuditMatchesRemote()
}
