package e2e

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// deepJSON is an object nested depth levels deep: valid JSON that jsonb
// stores but Go's decoder refuses past 10,000 levels.
func deepJSON(depth int) string {
	return `{"x":` + strings.Repeat(`{"a":`, depth) + "1" + strings.Repeat("}", depth) + "}"
}

// execRefusingNoCheck runs sql; if a rule refuses it (such as the depth
// limit at INSERT, which stops poison rows at the door), it lifts that rule
// in this test's database and runs it again: the test is about what the
// processor does with a row that got in anyway (one staged before the rule
// existed). A rule is a CHECK constraint of that name, or else one reported
// under that name by the statement-level trigger changes_check_inserted
// (lifted first) or by the combined check changes_valid.
func execRefusingNoCheck(t *testing.T, h *harness, sql string, args ...any) {
	t.Helper()
	for range 5 {
		_, err := h.pool.Exec(context.Background(), sql, args...)
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "23514" {
			require.NoError(t, err)
			return
		}
		table := pgErr.SchemaName + "." + pgErr.TableName
		lift := `ALTER TABLE ` + table + ` DROP CONSTRAINT ` + pgErr.ConstraintName
		if h.count(`SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2`, table, pgErr.ConstraintName) == 0 {
			lift = `ALTER TABLE ` + table + ` DROP CONSTRAINT changes_valid`
			if h.count(`SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = 'changes_check_inserted' AND tgenabled <> 'D'`, table) > 0 {
				lift = `ALTER TABLE ` + table + ` DISABLE TRIGGER changes_check_inserted`
			}
		}
		_, err = h.pool.Exec(context.Background(), lift)
		require.NoError(t, err, "lift rule %s: %s", pgErr.ConstraintName, lift)
	}
	t.Fatalf("%s: still refused after lifting five rules", sql)
}

// A change whose fields Go cannot decode (nested 10,001 deep) ends rejected
// alone, with the reason; the other changes of its job, and of its own
// resource, finish. A resource whose stored snapshot can't be decoded is
// worked with an unknown merge base instead of failing the job.
func TestPoisonChangeCostsOneChange(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("acct", 20)
	h.seed(ids, map[string]any{"owner": "seed"})
	// Register the target and store an unreadable snapshot for acct-0001
	// before the processor starts.
	_, err := h.pool.Exec(context.Background(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ($1, 'http://127.0.0.1:1', '/x/{id}')`, target)
	require.NoError(t, err)
	_, etag, _ := h.sim.Get("acct-0001")
	execRefusingNoCheck(t, h, `INSERT INTO stagesync.resources (target, resource_id, etag, snapshot) VALUES ($1, 'acct-0001', $2, $3::jsonb)`,
		target, etag, deepJSON(10001))
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm", "n": i}})
	}
	h.insert(cs...)
	var poison int64
	execRefusingNoCheck(t, h, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ($1, 'acct-0005', $2::jsonb)`, target, deepJSON(10001))
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT max(id) FROM stagesync.changes`).Scan(&poison))
	after := h.insert(change{resource: "acct-0005", fields: map[string]any{"note": "after the poison"}})
	h.startProcessor(configYAML(nil, map[string]string{"batch_size": "100"}))
	h.waitDrained(30 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(ids) + 1, "rejected": 1}, counts, "status counts: got %v; want %d applied, 1 rejected", counts, len(ids)+1)
	r := h.changes([]int64{poison, after[0]})
	require.Equal(t, "rejected", r[poison].status, "poison change: got %s; want rejected", r[poison].status)
	require.Contains(t, r[poison].lastError, "cannot read this change's fields", "last_error: got %q; want the reason", r[poison].lastError)
	require.Equal(t, "applied", r[after[0]].status, "the change after the poison on its resource: got %s; want applied", r[after[0]].status)
	h.requireRemote(expected(map[string]any{"owner": "seed"}, ids, append(cs, change{resource: "acct-0005", fields: map[string]any{"note": "after the poison"}})))
}

// When River gives up on an apply job (its last attempt failed), the
// processing changes of its resources end dead with the error, instead of
// going back to pending and failing the same way forever.
func TestJobRiverGivesUpOnEndsItsChangesDead(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.startProcessor(configYAML(map[string]string{"poll_interval": "500ms", "rescue_after": "1s"}, nil))
	// A target no process serves; its job lands in crm's queue, whose
	// worker can only fail it.
	_, err := h.pool.Exec(context.Background(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ('ghost', 'http://127.0.0.1:1', '/x/{id}')`)
	require.NoError(t, err)
	_, err = h.pool.Exec(context.Background(), `INSERT INTO stagesync.changes (target, resource_id, fields, status)
		SELECT 'ghost', 'g-' || g, '{"owner":"crm"}', 'processing' FROM generate_series(1, 3) g`)
	require.NoError(t, err)
	client, err := river.NewClient(riverpgxv5.New(h.pool), &river.Config{})
	require.NoError(t, err)
	_, err = client.Insert(context.Background(), processor.ApplyArgs{Target: "ghost", ResourceIDs: []string{"g-1", "g-2", "g-3"}},
		&river.InsertOpts{Queue: processor.QueueName(target), MaxAttempts: 1})
	require.NoError(t, err)
	h.waitDrained(30 * time.Second)

	require.Equal(t, map[string]int{"dead": 3}, h.statusCounts(), "status counts: got %v; want 3 dead", h.statusCounts())
	var lastError string
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT last_error FROM stagesync.changes WHERE resource_id = 'g-1'`).Scan(&lastError))
	require.Contains(t, lastError, "gave up: apply job", "last_error: got %q; want the give-up and its cause", lastError)
	require.Contains(t, lastError, `target "ghost" is not configured`, "last_error: got %q; want the job's error", lastError)
	// And they stay dead: the orphan reset does not send them around again.
	time.Sleep(1500 * time.Millisecond)
	require.Equal(t, map[string]int{"dead": 3}, h.statusCounts(), "status counts a while later: got %v; want still 3 dead", h.statusCounts())
}

// An answer PostgreSQL refuses to store for one resource (here a trigger
// stands in for what an odd remote might send) costs only that resource:
// the round is recorded resource by resource, the neighbours' answers are
// kept, and the refused resource's changes end dead with the reason, its
// write kept as in doubt so the next change checks it instead of
// forgetting it.
func TestUnrecordableAnswerCostsOneResource(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("acct", 10)
	h.seed(ids, map[string]any{"owner": "seed"})
	h.sim.Put("acct-0003", map[string]any{"owner": "seed", "refuse-me": true})
	_, err := h.pool.Exec(context.Background(), `
		CREATE FUNCTION public.refuse_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.snapshot ? 'refuse-me' THEN
				RAISE EXCEPTION 'snapshot refused (stands in for an answer PostgreSQL cannot store)';
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER refuse_snapshot BEFORE INSERT OR UPDATE ON stagesync.resources
			FOR EACH ROW EXECUTE FUNCTION public.refuse_snapshot();`)
	require.NoError(t, err)
	h.startProcessor(configYAML(nil, map[string]string{"batch_size": "100", "batch_etag_path": ""}))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(30 * time.Second)

	rows := h.changes(changeIDs)
	for i, id := range ids {
		want := "applied"
		if id == "acct-0003" {
			want = "dead"
		}
		require.Equal(t, want, rows[changeIDs[i]].status, "change of %q: got %s; want %s (last_error %q)", id, rows[changeIDs[i]].status, want, rows[changeIDs[i]].lastError)
	}
	require.Contains(t, rows[changeIDs[3]].lastError, "could not record the remote's answer", "last_error: got %q; want the reason", rows[changeIDs[3]].lastError)
	var inDoubt bool
	require.NoError(t, h.pool.QueryRow(context.Background(),
		`SELECT in_doubt IS NOT NULL FROM stagesync.resources WHERE resource_id = 'acct-0003'`).Scan(&inDoubt))
	require.True(t, inDoubt, "acct-0003 in doubt: got false; want true (its write landed unrecorded)")
	require.Equal(t, 1, len(h.apiVersions("acct-0003")), "api writes of acct-0003: got %d; want 1 (never resent)", len(h.apiVersions("acct-0003")))
	require.Zero(t, h.count(`SELECT count(*) FROM stagesync.outbox`), "outbox rows left: got some; want none")
	requireAttemptForEveryRequest(t, h)
}
