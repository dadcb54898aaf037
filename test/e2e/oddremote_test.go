package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// Whatever the remote sends can be recorded: representations holding a
// number beyond PostgreSQL's numeric range (1e200000) used to make the
// whole round's transaction fail, so the remote's 200s for those resources
// and their neighbours were forgotten and re-sent forever. Now the number
// is left out of the stored snapshot (its merge base is unknown) and kept
// as text in audit rows, and every change is written once.
func TestHugeNumbersFromTheRemoteAreRecorded(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	ids := resourceIDs("acct", 12)
	huge := ids[:3]
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	h.sim.SetMisbehavior(remotesim.Misbehavior{IDs: huge, HugeNumberField: "balance"})
	// status manual: the conflict is resolved by reading the resource (with
	// only ours fields to write it would be written again unread), so the
	// merges row holds the answer with the huge number.
	h.startProcessor(configYAML(nil, map[string]string{"merge": "{default: ours, fields: {owner: theirs, status: manual}}", "batch_size": "100"}))
	runTwoWaves(t, h, ids, huge[0])

	ctx := context.Background()
	for _, id := range huge {
		var snap map[string]any
		var covers []string
		require.NoError(t, h.pool.QueryRow(ctx, `SELECT snapshot, snapshot_fields FROM stagesync.resources WHERE resource_id = $1`, id).Scan(&snap, &covers))
		require.NotContains(t, snap, "balance", "stored snapshot of %q: got %v; want the out-of-range number left out", id, snap)
		require.NotNil(t, covers, "snapshot_fields of %q: got NULL; want the fields it covers (balance unknown)", id)
		require.NotContains(t, covers, "balance")
		require.Contains(t, covers, "status")
	}
	var theirs map[string]any
	require.NoError(t, h.pool.QueryRow(ctx, `SELECT theirs FROM stagesync.merges WHERE resource_id = $1`, huge[0]).Scan(&theirs))
	require.Equal(t, remotesim.HugeNumber, theirs["balance"], "merges.theirs.balance: got %v; want the number kept as text", theirs["balance"])
}

// ETags whose bytes are not UTF-8 (valid in HTTP, refused by PostgreSQL's
// text) are stored as raw bytes beside a readable, escaped form, and sent
// back in If-Match byte for byte: writes with the stored ETag succeed, and
// nothing is re-sent.
func TestETagsThatAreNotUTF8AreStoredAndSentBackExactly(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	ids := resourceIDs("acct", 12)
	bad := ids[:3]
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	// The batch lookup's JSON can't carry the odd bytes (it shows U+FFFD),
	// so the stored ETags come from the resources themselves.
	h.startProcessor(configYAML(nil, map[string]string{"merge": "{default: ours, fields: {owner: theirs}}", "batch_etag_path": ""}))
	h.sim.SetMisbehavior(remotesim.Misbehavior{IDs: bad, InvalidUTF8ETags: true})
	for _, id := range bad {
		_, ok := h.sim.Edit(id, map[string]any{"note": "ETag reissued"}, "seed")
		require.True(t, ok)
	}
	runTwoWaves(t, h, ids, bad[0])

	ctx := context.Background()
	for _, id := range bad {
		_, etag, _ := h.sim.Get(id)
		var text string
		var raw []byte
		require.NoError(t, h.pool.QueryRow(ctx, `SELECT etag, etag_raw FROM stagesync.resources WHERE resource_id = $1`, id).Scan(&text, &raw))
		require.Equal(t, []byte(etag), raw, "stored raw ETag of %q: got %q; want the remote's bytes %q", id, raw, etag)
		require.Contains(t, text, `\xff\xfe`, "readable ETag of %q: got %q; want the odd bytes escaped", id, text)
	}
}

// runTwoWaves writes every resource twice; between the waves a person
// edits owner of edited, so its second write conflicts and merges. Every
// change ends applied (edited's second merged), each wave is one write per
// resource, and the only conflict is the person's.
func runTwoWaves(t *testing.T, h *harness, ids []string, edited string) {
	t.Helper()
	var changeIDs []int64
	for w := range 2 {
		if w == 1 {
			_, ok := h.sim.Edit(edited, map[string]any{"owner": "person"}, "other-user")
			require.True(t, ok)
		}
		var wave []change
		for _, id := range ids {
			wave = append(wave, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("w%d", w)}})
		}
		changeIDs = append(changeIDs, h.insert(wave...)...)
		h.waitDrained(30 * time.Second)
	}
	rows := h.changes(changeIDs)
	for i, cid := range changeIDs {
		id := ids[i%len(ids)]
		want := "applied"
		if id == edited && i >= len(ids) {
			want = "merged"
		}
		require.Equal(t, want, rows[cid].status, "change %d of %q: got %s; want %s (last_error %q)", cid, id, rows[cid].status, want, rows[cid].lastError)
	}
	for _, id := range ids {
		require.Len(t, h.apiVersions(id), 2, "api writes of %q: got %d; want 2 (each wave once)", id, len(h.apiVersions(id)))
	}
	require.Equal(t, 1, h.sim.Stats().Conflicts, "conflicts: got %d; want 1 (the person's edit)", h.sim.Stats().Conflicts)
	h.requireAuditMatchesRemote()
}

// Clear words for odd remotes: a 200 without an ETag rejects the change
// saying what is missing, and a server refusing weak ETags in If-Match (it
// compares strongly, RFC 9110 §13.1.1) rejects it saying so after one
// conflict, instead of retrying until the attempts run out.
func TestOddRemotesGetClearWords(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		opts     remotesim.Options
		mb       remotesim.Misbehavior
		wantErr  string
		maxPatch int
	}{
		{
			name:     "no ETag",
			mb:       remotesim.Misbehavior{NoETag: true},
			wantErr:  "the remote sent no ETag; stagesync needs one to write safely",
			maxPatch: 0,
		},
		{
			name:     "strict server, weak ETags",
			opts:     remotesim.Options{WeakETags: true, StrictIfMatch: true},
			wantErr:  "the remote refuses weak ETags in If-Match",
			maxPatch: 1,
		},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			tt.opts.Misbehavior = tt.mb
			h := newHarness(t, tt.opts)
			h.sim.Put("acct", map[string]any{"status": "open"})
			// No batch endpoint: the resource is fetched, as a PUT target or
			// a remote without one would.
			h.startProcessor(configYAML(nil, map[string]string{"batch_etag_path": "", "max_attempts": "5"}))
			ids := h.insert(change{resource: "acct", fields: map[string]any{"status": "won"}})
			h.waitDrained(30 * time.Second)
			r := h.changes(ids)[ids[0]]
			require.Equal(t, "rejected", r.status, "change: got %s; want rejected (last_error %q)", r.status, r.lastError)
			require.Contains(t, r.lastError, tt.wantErr, "last_error: got %q; want it to say %q", r.lastError, tt.wantErr)
			require.Equal(t, tt.maxPatch, h.sim.Stats().Patches, "PATCHes: got %d; want %d", h.sim.Stats().Patches, tt.maxPatch)
		})
	}
}

// An answer too large to keep (over 256 KiB) is not stored as the merge
// base: the base is unknown, the attempts row says why, and the change is
// applied.
func TestHugeAnswersAreNotStoredAsTheMergeBase(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("acct", map[string]any{"status": "open"})
	h.sim.SetMisbehavior(remotesim.Misbehavior{IDs: []string{"acct"}, PadBodyBytes: 300 << 10})
	h.startProcessor(configYAML(nil, map[string]string{"batch_etag_path": ""}))
	ids := h.insert(change{resource: "acct", fields: map[string]any{"status": "won"}})
	h.waitDrained(30 * time.Second)
	require.Equal(t, "applied", h.changes(ids)[ids[0]].status)
	var stored bool
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT snapshot IS NOT NULL FROM stagesync.resources WHERE resource_id = 'acct'`).Scan(&stored))
	require.False(t, stored, "snapshot stored: got true; want false (the answer is over the cap)")
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND error LIKE '%over the 256 KiB stagesync keeps as a merge base%'`)
	require.Equal(t, 1, n, "PATCH attempts noting the size: got %d; want 1", n)
}
