package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
)

// plan prints what the next run would send, as a table or as JSON, from
// the stored state alone: the remote is never contacted (its URL here
// answers nothing), and no row changes.
func TestPlanPrintsTheNextRequests(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	cfg := writeConfig(t, "targets:\n  territory:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n    batch_etag_path: /a\n")
	getenv := func(string) string { return "" }
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg, "--database-url", dbURL}, getenv, &out))
	execSQL(t, pool, `INSERT INTO stagesync.resources (target, resource_id, etag, snapshot, fetched_at)
		VALUES ('territory', 'ACC-1', '"e-7"', '{"status": "open"}', now()), ('territory', 'ACC-3', '"e-9"', '{"status": "open"}', now())`)
	execSQL(t, pool, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES
		('territory', 'ACC-1', '{"status": "won"}'),
		('territory', 'ACC-2', '{"status": "lost"}'),
		('territory', 'ACC-1', '{"owner": "amy"}'),
		('territory', 'ACC-3', '{"status": "open"}')`)
	var before string
	digest := `SELECT md5((SELECT string_agg(c::text, '|' ORDER BY id) FROM stagesync.changes c) ||
		(SELECT string_agg(r::text, '|' ORDER BY resource_id) FROM stagesync.resources r))`
	require.NoError(t, pool.QueryRow(t.Context(), digest).Scan(&before))

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL}, getenv, &out))
	text := out.String()
	require.Contains(t, text, "plan: the next requests for 4 open changes of 3 resources; nothing was sent, no row changed\n", "got:\n%s", text)
	lines := strings.Split(text, "\n")
	require.Regexp(t, `^TARGET +RESOURCE +CHANGES +REQUEST +IF-MATCH +BODY$`, lines[2])
	require.Regexp(t, `^territory +ACC-1 +#1 #3 +PATCH http://127\.0\.0\.1:1/a/ACC-1 +"e-7" +\{"owner":"amy","status":"won"\}$`, lines[3], "got:\n%s", text)
	require.Regexp(t, `^territory +ACC-2 +#2 +PATCH http://127\.0\.0\.1:1/a/ACC-2 +lookup first +\{"status":"lost"\}$`, lines[4], "got:\n%s", text)
	require.Regexp(t, `^territory +ACC-3 +#4 +— +noop: nothing sent: the stored state of the remote \(ETag "e-9"\) already shows these values +$`, lines[5], "got:\n%s", text)
	require.Contains(t, text, "notes:\n  territory ACC-2: no usable ETag stored: its ETag comes from the job's batch ETag lookup (http://127.0.0.1:1/a?ids=…) first")

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL, "--json", "--limit", "1"}, getenv, &out))
	var steps []processor.PlannedStep
	require.NoError(t, json.Unmarshal(out.Bytes(), &steps), "--json output: %s", out.String())
	require.Len(t, steps, 1, "--limit 1: got %d steps; want the oldest resource's one", len(steps))
	require.Equal(t, "ACC-1", steps[0].ResourceID)
	require.Equal(t, `"e-7"`, steps[0].IfMatch)
	require.True(t, strings.HasPrefix(steps[0].IdempotencyKey, "stagesync-"), "Idempotency-Key: got %q; want the one the write will carry", steps[0].IdempotencyKey)

	var after string
	require.NoError(t, pool.QueryRow(t.Context(), digest).Scan(&after))
	require.Equal(t, before, after, "rows after plan: changed; want none changed")

	err := run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL, "--target", "erp"}, getenv, &out)
	require.EqualError(t, err, `plan: target "erp" is not in the config (it has [territory])`)
	err = run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL, "--limit", "0"}, getenv, &out)
	require.EqualError(t, err, "plan: --limit must be between 1 and 10000, got 0")
}

func TestPlanWithNothingOpenSaysSo(t *testing.T) {
	t.Parallel()
	dbURL, _ := testDatabase(t)
	cfg := writeConfig(t, "targets:\n  territory:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n")
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL}, func(string) string { return "" }, &out))
	require.Equal(t, "plan: no open changes: nothing would be sent\n", out.String())
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"plan", "--config", cfg, "--database-url", dbURL, "--json"}, func(string) string { return "" }, &out))
	require.Equal(t, "[]\n", out.String())
}
