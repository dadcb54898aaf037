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

// lateChange stages c in a transaction of its own connection and leaves it
// open: the change has its id now and becomes visible only at commit, like
// an upstream batch that commits after a newer one. commit may be called
// from any goroutine.
func (h *harness) lateChange(c change) (id int64, commit func() error) {
	h.t.Helper()
	ctx := context.Background()
	tx, err := h.pool.Begin(ctx)
	require.NoError(h.t, err)
	h.t.Cleanup(func() { _ = tx.Rollback(ctx) })
	op := c.op
	if op == "" {
		op = "update"
	}
	fields := []byte("{}")
	if c.fields != nil {
		fields, err = json.Marshal(c.fields)
		require.NoError(h.t, err)
	}
	require.NoError(h.t, tx.QueryRow(ctx, `INSERT INTO stagesync.changes (target, resource_id, op, fields)
		VALUES ($1, $2, $3, $4::jsonb) RETURNING id`, target, c.resource, op, string(fields)).Scan(&id))
	return id, func() error { return tx.Commit(ctx) }
}

// lastChangeID reads resources.last_change_id of a resource (0 for NULL).
func (h *harness) lastChangeID(resource string) int64 {
	h.t.Helper()
	var id *int64
	err := h.pool.QueryRow(context.Background(),
		`SELECT last_change_id FROM stagesync.resources WHERE target = $1 AND resource_id = $2`, target, resource).Scan(&id)
	if err == pgx.ErrNoRows {
		return 0
	}
	require.NoError(h.t, err)
	if id == nil {
		return 0
	}
	return *id
}

// Create and delete obey the highest-id rule like fields do. A create or
// update committed late, after a newer delete was applied, must not bring
// the resource back or write to it; a delete committed late, after a newer
// create or update was applied, must not delete it. Either ends noop,
// naming the newer change.
func TestLateCreateOrDeleteNeverUndoesANewerOne(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		exists      bool   // the resource is on the remote at the start
		late, newer change // late has the lower id and commits after newer is applied
		wantExists  bool
		wantRemote  map[string]any
		wantDetail  string // #N for newer's id
	}{
		{
			name:       "late create after a newer delete",
			exists:     true,
			late:       change{resource: "acct", op: "create", fields: map[string]any{"status": "from-late"}},
			newer:      change{resource: "acct", op: "delete"},
			wantDetail: "superseded: resource was deleted by newer change #N",
		},
		{
			name:       "late update after a newer delete",
			exists:     true,
			late:       change{resource: "acct", fields: map[string]any{"status": "from-late"}},
			newer:      change{resource: "acct", op: "delete"},
			wantDetail: "superseded: resource was deleted by newer change #N",
		},
		{
			name:       "late delete after a newer create",
			late:       change{resource: "acct", op: "delete"},
			newer:      change{resource: "acct", op: "create", fields: map[string]any{"status": "from-newer"}},
			wantExists: true,
			wantRemote: map[string]any{"status": "from-newer"},
			wantDetail: "superseded: resource was written by newer change #N",
		},
		{
			name:       "late delete after a newer update",
			exists:     true,
			late:       change{resource: "acct", op: "delete"},
			newer:      change{resource: "acct", fields: map[string]any{"status": "from-newer"}},
			wantExists: true,
			wantRemote: map[string]any{"status": "from-newer", "owner": "seed"},
			wantDetail: "superseded: resource was written by newer change #N",
		},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			if tt.exists {
				h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
			}
			h.startProcessor(configYAML(nil, nil))

			idLate, commit := h.lateChange(tt.late)
			idNewer := h.insert(tt.newer)[0]
			require.Greater(t, idNewer, idLate)
			h.waitDrained(30 * time.Second)
			require.Equal(t, "applied", h.changes([]int64{idNewer})[idNewer].status, "newer change before the late one commits")
			versions := len(h.sim.History("acct"))

			require.NoError(t, commit())
			h.waitDrained(30 * time.Second)

			row := h.changes([]int64{idLate})[idLate]
			require.Equal(t, "noop", row.status, "late change: got %s; want noop (last_error %q)", row.status, row.lastError)
			wantDetail := strings.ReplaceAll(tt.wantDetail, "#N", fmt.Sprintf("#%d", idNewer))
			require.Equal(t, wantDetail, h.outcomeDetail(idLate))
			got, _, ok := h.sim.Get("acct")
			require.Equal(t, tt.wantExists, ok, "resource exists on the remote: got %v; want %v (%v)", ok, tt.wantExists, got)
			if tt.wantExists {
				h.requireRemote(map[string]map[string]any{"acct": tt.wantRemote})
			}
			require.Len(t, h.sim.History("acct"), versions, "the late change wrote to the remote: history %v", h.sim.History("acct"))
			require.Equal(t, idNewer, h.lastChangeID("acct"), "last_change_id after the late change")
			h.requireAuditMatchesRemote()
		})
	}
}

// resources.last_change_id never goes back: a late-committed lower id that
// finishes after a higher one leaves it at the higher.
func TestLastChangeIDNeverGoesBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, nil))

	idLate, commit := h.lateChange(change{resource: "acct", fields: map[string]any{"owner": "from-late"}})
	idNewer := h.insert(change{resource: "acct", fields: map[string]any{"status": "from-newer"}})[0]
	h.waitDrained(30 * time.Second)
	require.Equal(t, idNewer, h.lastChangeID("acct"))
	require.NoError(t, commit())
	h.waitDrained(30 * time.Second)
	require.Equal(t, "applied", h.changes([]int64{idLate})[idLate].status)
	h.requireRemote(map[string]map[string]any{"acct": {"status": "from-newer", "owner": "from-late"}})
	require.Equal(t, idNewer, h.lastChangeID("acct"), "last_change_id: got %d; want the higher id %d (late id %d)", h.lastChangeID("acct"), idNewer, idLate)
}

// An update newer than a create that committed late was rejected only
// because the resource did not exist yet (404 on its GET, or missing from a
// batch ETag lookup). When the older create applies, such rejections of
// newer changes of the same resource are worked again, after the create,
// and end applied. A not-found rejection of a change older than the create
// stays rejected.
func TestNotFoundRejectionsOfNewerChangesAreWorkedAfterALateCreate(t *testing.T) {
	t.Parallel()
	for _, lookup := range []string{"single GET", "batch ETag lookup"} {
		t.Run(strings.ReplaceAll(lookup, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			tgt := map[string]string{}
			if lookup == "single GET" {
				tgt["batch_etag_path"] = ""
			}
			h.startProcessor(configYAML(nil, tgt))

			// Older than the create: rejected, and stays so.
			idOlder := h.insert(change{resource: "acct", fields: map[string]any{"region": "from-older"}})[0]
			h.waitDrained(30 * time.Second)
			idCreate, commit := h.lateChange(change{resource: "acct", op: "create", fields: map[string]any{"status": "created", "owner": "crm"}})
			idNewer := h.insert(change{resource: "acct", fields: map[string]any{"status": "from-newer"}})[0]
			// Another resource's not-found rejection is not touched.
			idOther := h.insert(change{resource: "other", fields: map[string]any{"status": "x"}})[0]
			h.waitDrained(30 * time.Second)
			rows := h.changes([]int64{idOlder, idNewer, idOther})
			for _, id := range []int64{idOlder, idNewer, idOther} {
				require.Equal(t, "rejected", rows[id].status, "change %d before the create commits", id)
				require.Contains(t, rows[id].lastError, "not found", "change %d before the create commits", id)
			}

			require.NoError(t, commit())
			h.waitDrained(30 * time.Second)
			rows = h.changes([]int64{idOlder, idCreate, idNewer, idOther})
			require.Equal(t, "applied", rows[idCreate].status, "the late create (last_error %q)", rows[idCreate].lastError)
			require.Equal(t, "applied", rows[idNewer].status, "the newer update rejected as not found: got %s; want applied after the create (last_error %q)", rows[idNewer].status, rows[idNewer].lastError)
			require.Equal(t, "rejected", rows[idOlder].status, "the older update rejected as not found")
			require.Equal(t, "rejected", rows[idOther].status, "another resource's rejection")
			h.requireRemote(map[string]map[string]any{"acct": {"status": "from-newer", "owner": "crm"}})
			// The create was written before the newer change, never after it.
			var seq []any
			for _, v := range h.apiVersions("acct") {
				seq = append(seq, v.Fields["status"])
			}
			require.Equal(t, []any{"created", "from-newer"}, seq, "api writes of status")
		})
	}
}
