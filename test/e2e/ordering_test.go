package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// Two upstream transactions on two connections: A inserts and holds its
// transaction open, B inserts for the same resource and commits, the
// processor applies B, then A commits. A has the lower id, so id order says
// B's values are the newer ones: per field the highest id wins. A fully
// superseded A ends noop naming B; a partly superseded A applies only the
// fields B did not set.
func TestLateCommitNeverOverwritesANewerValue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		a, b       map[string]any
		wantRemote map[string]any
		wantA      string
		wantDetail string // with #B for B's id
	}{
		{
			name:       "fully overlapping",
			a:          map[string]any{"status": "from-A"},
			b:          map[string]any{"status": "from-B"},
			wantRemote: map[string]any{"status": "from-B", "owner": "seed", "region": "north"},
			wantA:      "noop",
			wantDetail: "superseded: field status was set by newer change #B",
		},
		{
			name:       "partly overlapping",
			a:          map[string]any{"status": "from-A", "owner": "A-owner"},
			b:          map[string]any{"status": "from-B", "region": "B-region"},
			wantRemote: map[string]any{"status": "from-B", "owner": "A-owner", "region": "B-region"},
			wantA:      "applied",
			wantDetail: "superseded: field status was set by newer change #B",
		},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed", "region": "north"})
			h.startProcessor(configYAML(nil, nil))
			ctx := context.Background()

			txA, err := h.pool.Begin(ctx)
			require.NoError(t, err)
			defer func() { _ = txA.Rollback(ctx) }()
			var idA int64
			fa, err := json.Marshal(tt.a)
			require.NoError(t, err)
			require.NoError(t, txA.QueryRow(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields)
				VALUES ($1, 'acct', $2::jsonb) RETURNING id`, target, string(fa)).Scan(&idA))

			idB := h.insert(change{resource: "acct", fields: tt.b})[0]
			require.Greater(t, idB, idA, "ids: got B %d ≤ A %d; want A's lower", idB, idA)
			h.waitDrained(30 * time.Second)
			require.Equal(t, "applied", h.changes([]int64{idB})[idB].status, "B before A commits: got %s; want applied", h.changes([]int64{idB})[idB].status)

			require.NoError(t, txA.Commit(ctx))
			h.waitDrained(30 * time.Second)

			rows := h.changes([]int64{idA, idB})
			require.Equal(t, tt.wantA, rows[idA].status, "late change A: got %s; want %s (last_error %q)", rows[idA].status, tt.wantA, rows[idA].lastError)
			wantDetail := strings.ReplaceAll(tt.wantDetail, "#B", fmt.Sprintf("#%d", idB))
			require.Equal(t, wantDetail, h.outcomeDetail(idA), "outcome_detail of A: got %q; want %q", h.outcomeDetail(idA), wantDetail)
			h.requireRemote(map[string]map[string]any{"acct": tt.wantRemote})
			// A's status never reached the remote, not even briefly.
			for _, v := range h.apiVersions("acct") {
				require.NotEqual(t, "from-A", v.Fields["status"], "api write %v: status from the older change A reached the remote", v.Fields)
			}
			// The field's provenance names B.
			var fv map[string]int64
			require.NoError(t, h.pool.QueryRow(ctx, `SELECT field_versions FROM stagesync.resources WHERE resource_id = 'acct'`).Scan(&fv))
			require.Equal(t, idB, fv["status"], "field_versions.status: got %d; want B's id %d", fv["status"], idB)
			h.requireAuditMatchesRemote()
		})
	}
}

// Many small transactions to a few resources, interleaved and committed
// out of id order (up to eight held open at once), while the processor
// works against a remote that fails 10% of requests: per field the remote
// ends with the value of the highest id that set it, and its history never
// shows an older value of a field after a newer one.
func TestOrderingUnderInterleavedInserts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 2 * time.Millisecond, ErrorRate: 0.1, Seed: 5})
	ids := []string{"hot-a", "hot-b", "hot-c"}
	base := map[string]any{"seq": -1, "f0": -1, "f1": -1}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "100", "batch_size": "2"}))
	ctx := context.Background()

	const n = 300
	rng := rand.New(rand.NewPCG(7, 7))
	var cs []change
	var open []pgx.Tx
	commitOne := func() {
		i := rng.IntN(len(open))
		require.NoError(t, open[i].Commit(ctx))
		open = slices.Delete(open, i, i+1)
	}
	outOfOrder := 0
	for i := range n {
		c := change{resource: ids[i%len(ids)], fields: map[string]any{"seq": i, fmt.Sprintf("f%d", i%2): i}}
		cs = append(cs, c)
		b, err := json.Marshal(c.fields)
		require.NoError(t, err)
		// One transaction per change: ids follow this loop, commits don't.
		tx, err := h.pool.Begin(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ($1, $2, $3::jsonb)`, target, c.resource, string(b))
		require.NoError(t, err)
		open = append(open, tx)
		for len(open) > 8 || len(open) > 0 && rng.IntN(3) == 0 {
			if len(open) > 1 {
				outOfOrder++
			}
			commitOne()
		}
		if i%25 == 24 {
			// Let the processor catch up now and then, so that late
			// commits land on resources whose newer changes are applied.
			before := h.sim.Stats().Requests
			h.waitFor("some progress", 30*time.Second, func() bool { return h.sim.Stats().Requests > before })
		}
	}
	for len(open) > 0 {
		commitOne()
	}
	h.waitDrained(60 * time.Second)
	require.Greater(t, outOfOrder, 50, "commits made while an older transaction was open: got %d; want many", outOfOrder)

	counts := h.statusCounts()
	require.Equal(t, n, counts["applied"]+counts["noop"], "status counts: got %v; want all %d applied or noop (superseded)", counts, n)
	require.Greater(t, counts["noop"], 0, "superseded late changes: got none; want some (commits were out of order)")
	h.requireRemote(expected(base, ids, cs))
	writes := 0
	for _, id := range ids {
		for _, f := range []string{"seq", "f0", "f1"} {
			seq := h.fieldWrites(id, f)
			for i := 1; i < len(seq); i++ {
				require.Greater(t, seq[i], seq[i-1], "resource %q: values written to %s went %v; want strictly increasing", id, f, seq)
			}
		}
		writes += len(h.apiVersions(id))
	}
	require.Less(t, writes, n, "api writes: got %d; want fewer than %d changes (coalescing)", writes, n)
	require.Equal(t, 1, h.sim.Stats().MaxInFlightPerResource, "max in flight per resource: got %d; want 1", h.sim.Stats().MaxInFlightPerResource)
	h.requireAuditMatchesRemote()
}

// A backlog deeper than one round of a job (5,000 changes) is worked in
// bounded rounds: a resource cut off by the round's limit gets its older
// changes first and the rest in the next round, so the remote still ends
// with the newest values and never sees an older one after a newer.
func TestDeepBacklogIsWorkedInBoundedRoundsInOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := []string{"deep-a", "deep-b"}
	h.seed(ids, map[string]any{"seq": -1})
	_, err := h.pool.Exec(context.Background(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ($1, 'http://127.0.0.1:1', '/x/{id}')`, target)
	require.NoError(t, err)
	// 3,500 changes each, staged before the processor starts so that one
	// job finds all 7,000 open: deep-a fits in the first round, deep-b is
	// cut after 1,500.
	const perResource = 3500
	_, err = h.pool.Exec(context.Background(), `INSERT INTO stagesync.changes (target, resource_id, fields)
		SELECT $1, r, jsonb_build_object('seq', g) FROM generate_series(0, $2::int - 1) g, unnest($3::text[]) r
		ORDER BY g, r`, target, perResource, ids)
	require.NoError(t, err)
	// max_coalesce at its ceiling, so that the PATCHes show the rounds (the
	// default, 100, would cut each round's changes into requests of 100).
	h.startProcessor(configYAML(nil, map[string]string{"max_coalesce": "10000"}))
	h.waitDrained(60 * time.Second)

	require.Equal(t, map[string]int{"applied": 2 * perResource}, h.statusCounts())
	for _, id := range ids {
		seq := h.requireIncreasing(id, "seq")
		require.Equal(t, float64(perResource-1), seq[len(seq)-1], "last seq of %s: got %v; want %d", id, seq[len(seq)-1], perResource-1)
	}
	require.Len(t, h.apiVersions("deep-a"), 1, "deep-a: all its changes fit one round, one PATCH")
	require.Len(t, h.apiVersions("deep-b"), 2, "deep-b: cut by the round limit, two PATCHes in id order")
}
