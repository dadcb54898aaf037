package e2e

import (
	"context"
	"strings"
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
