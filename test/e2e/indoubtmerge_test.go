package e2e

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A merged write (after a conflict) whose answer was lost is resolved by
// sending it again; a remote that honours Idempotency-Key replays the
// answer. The change ends merged, as its merges row says, not applied.
// Both ways a conflict is merged: after a GET (a field with policy manual),
// and written again at once without one (every field ours).
func TestReplayOfAMergedWriteEndsMerged(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"merged after a GET", "written again unread"} {
		t.Run(strings.ReplaceAll(how, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: 412, IdempotencyCache: true})
			h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
			tgt := map[string]string{"max_attempts": "20"}
			if how == "merged after a GET" {
				tgt["merge"] = "{default: ours, fields: {status: manual}}"
			}
			h.startProcessor(configYAML(nil, tgt))
			// Wave 1 stores the ETag: the next write goes out with If-Match.
			h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
			h.waitDrained(30 * time.Second)

			// A person's edit makes the next write conflict; the merged
			// write lands and its connection is dropped.
			_, ok := h.sim.Edit("acct", map[string]any{"owner": "person"}, "other-user")
			require.True(t, ok)
			h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(context.Context, remotesim.Commit) {
				h.sim.SetFaults(remotesim.Faults{})
			}})
			h.sim.SetFaults(remotesim.Faults{DropAfterCommitRate: 1})
			id := h.insert(change{resource: "acct", fields: map[string]any{"status": "crm"}})[0]
			h.waitDrained(30 * time.Second)

			row := h.changes([]int64{id})[id]
			require.Equal(t, "merged", row.status, "change: got %s; want merged (last_error %q, detail %q)", row.status, row.lastError, h.outcomeDetail(id))
			require.Positive(t, h.count(`SELECT count(*) FROM stagesync.merges WHERE $1 = ANY (change_ids) AND outcome = 'merged'`, id),
				"merges rows of the change: got none; want its merge kept")
			require.Positive(t, h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND outcome = 'unknown'`),
				"PATCH attempts with an unknown outcome: got none; want the dropped answer")
			h.requireRemote(map[string]map[string]any{"acct": {"status": "crm", "owner": "person", "note": "w1"}})
			n := 0
			for _, v := range h.apiVersions("acct") {
				if v.Written["status"] == "crm" {
					n++
				}
			}
			require.Equal(t, 1, n, "api writes carrying the change: got %d; want 1", n)
			require.Zero(t, h.count(`SELECT count(*) FROM stagesync.resources WHERE in_doubt IS NOT NULL`), "resources still in doubt")
		})
	}
}

// A write in doubt resolved by a GET never hides a person's edit of a field
// the in-doubt write did not touch: that field's merge base stays what
// stagesync knew before (the GET's value could be the person's). A PATCH of
// status is in doubt; meanwhile a person sets owner (policy manual) and a
// newer change sets owner too. The newer change goes to review and the
// person's value stays. With the stored base unknown (it could not be
// kept), the same: a guarded field with an unknown base goes to review,
// never a silent overwrite. The in-doubt change itself ends applied.
func TestInDoubtResolvedByAGetNeverHidesAPersonsEdit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		personEdits bool
		loseBase    bool
	}{
		{name: "a person edits owner while the write is in doubt", personEdits: true},
		{name: "the stored base is unknown", loseBase: true},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: 412})
			h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
			h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "20", "merge": "{default: ours, fields: {owner: manual}}"}))
			h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
			h.waitDrained(30 * time.Second)
			if tc.loseBase {
				// As one too large to keep: the ETag is known, the base is not.
				_, err := h.pool.Exec(context.Background(), `UPDATE stagesync.resources SET snapshot = NULL WHERE resource_id = 'acct'`)
				require.NoError(t, err)
			}

			var meanwhile func()
			if tc.personEdits {
				meanwhile = func() { h.sim.Edit("acct", map[string]any{"owner": "person"}, "other-user") }
			}
			doubted, ids := h.inDoubtThen(change{resource: "acct", fields: map[string]any{"status": "crm"}}, meanwhile,
				change{resource: "acct", fields: map[string]any{"owner": "crm-owner"}})
			newer := ids[0]
			h.waitDrained(30 * time.Second)

			rows := h.changes([]int64{doubted, newer})
			require.Equal(t, "applied", rows[doubted].status, "the in-doubt change (last_error %q)", rows[doubted].lastError)
			require.Equal(t, "dead", rows[newer].status, "the newer change: got %s (%q); want review", rows[newer].status, rows[newer].lastError)
			require.Contains(t, rows[newer].lastError, "needs_review")
			wantOwner := "seed"
			if tc.personEdits {
				wantOwner = "person"
			}
			got, _, _ := h.sim.Get("acct")
			require.Equal(t, wantOwner, got["owner"], "remote owner")
			require.Positive(t, h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND outcome = 'unknown'`), "the dropped answer's attempts row")
		})
	}
}

// A write in doubt counts for its fields before any older change: a change
// with a lower id that commits late, while the resource has an unresolved
// write of a newer change (its connection dropped after the remote
// committed it), loses the fields that write carried, whatever the
// resolution finds: the remote replays the answer (the newer change ends
// applied), or a person edited the field after our write (the newer change
// ends dead, needs_review). The older value is never written over either.
func TestLateOlderChangeLosesTheFieldsOfAWriteInDoubt(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		idempotent   bool
		personEdits  bool
		wantNewer    string
		wantOlder    string // it still sets region
		wantStatusOn string
	}{
		{name: "the remote replays the answer", idempotent: true, wantNewer: "applied", wantOlder: "applied", wantStatusOn: "from-newer"},
		// Written with the merge that sent the newer change to review.
		{name: "a person edits after our write", personEdits: true, wantNewer: "dead", wantOlder: "merged", wantStatusOn: "person"},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: 412, IdempotencyCache: tc.idempotent})
			h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
			h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "20"}))
			h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
			h.waitDrained(30 * time.Second)

			older, commitOlder := h.lateChange(change{resource: "acct", fields: map[string]any{"status": "from-older", "region": "older-region"}})
			var once sync.Once
			h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(context.Context, remotesim.Commit) {
				once.Do(func() {
					// Runs after the newer write committed, before its answer is
					// dropped: the older change becomes visible while the newer
					// one's write is in doubt.
					h.sim.SetFaults(remotesim.Faults{})
					if tc.personEdits {
						h.sim.Edit("acct", map[string]any{"status": "person"}, "other-user")
					}
					if err := commitOlder(); err != nil {
						t.Errorf("commit the older change: %v", err)
					}
				})
			}})
			h.sim.SetFaults(remotesim.Faults{DropAfterCommitRate: 1})
			newer := h.insert(change{resource: "acct", fields: map[string]any{"status": "from-newer"}})[0]
			require.Greater(t, newer, older)
			h.waitFor("the older change committed", 30*time.Second, func() bool {
				return h.count(`SELECT count(*) FROM stagesync.changes WHERE id = $1`, older) == 1
			})
			h.waitDrained(30 * time.Second)

			rows := h.changes([]int64{older, newer})
			require.Equal(t, tc.wantNewer, rows[newer].status, "newer change (last_error %q)", rows[newer].lastError)
			require.Equal(t, tc.wantOlder, rows[older].status, "older change: it still sets region (last_error %q)", rows[older].lastError)
			want := fmt.Sprintf("superseded: field status was set by newer change #%d", newer)
			require.Equal(t, want, h.outcomeDetail(older), "older change's outcome_detail")
			got, _, _ := h.sim.Get("acct")
			require.Equal(t, tc.wantStatusOn, got["status"], "remote status: got %v; want %v (never the older value)", got["status"], tc.wantStatusOn)
			require.Equal(t, "older-region", got["region"], "remote region")
			for _, v := range h.apiVersions("acct") {
				require.NotEqual(t, "from-older", v.Written["status"], "api write %v carried the older status", v.Written)
			}
		})
	}
}
