package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// The credential named by auth.env is sent on every request and appears
// nowhere else: not in attempts rows, targets settings or logs.
func TestAuthHeaderSentNeverStored(t *testing.T) {
	t.Parallel()
	const secret = "s3cr3t-token-7f3a9"
	h := newHarness(t, remotesim.Options{})
	h.env = map[string]string{"SIM_TOKEN": secret}
	ids := resourceIDs("auth", 10)
	h.seed(ids, map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"auth": "{env: SIM_TOKEN, prefix: 'Bearer '}"}))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	cs = append(cs, change{resource: "ghost", fields: map[string]any{"owner": "crm"}})
	h.insert(cs...)
	h.waitDrained(30 * time.Second)
	require.Equal(t, map[string]int{"applied": 10, "rejected": 1}, h.statusCounts(), "status counts: got %v; want 10 applied, 1 rejected", h.statusCounts())

	reqs := h.sim.Requests()
	require.NotEmpty(t, reqs)
	for _, r := range reqs {
		require.Equal(t, "present", r.Authorization, "Authorization of %s %s: got %q; want present", r.Method, r.Path, r.Authorization)
	}
	var leaks int
	require.NoError(t, h.pool.QueryRow(context.Background(), `
		SELECT (SELECT count(*) FROM stagesync.attempts a WHERE a::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.targets t WHERE t::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.changes c WHERE c::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.resources r WHERE r::text LIKE '%' || $1 || '%')`, secret).Scan(&leaks))
	require.Equal(t, 0, leaks, "rows containing the credential: got %d; want 0", leaks)
	require.NotContains(t, h.logs.tail(1<<30), secret, "processor logs contain the credential")
}

// Resource ids are path-escaped into item_path: each id reaches exactly its
// own resource, whatever characters it holds.
func TestIDsCannotEscapeTheItemPath(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := []string{".", "..", "../admin", "a/b", "a/../b", "x?y=1", "h#f", "sp ace", "%2F", "%2e%2e", "ü/€", "semi;colon", "back\\slash"}
	h.seed(ids, map[string]any{"owner": "seed"})
	h.sim.Put("admin", map[string]any{"owner": "admin"})
	h.sim.Put("b", map[string]any{"owner": "b"})
	h.startProcessor(configYAML(nil, nil))
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": fmt.Sprintf("crm-%d", i)}})
	}
	h.insert(cs...)
	h.waitDrained(30 * time.Second)
	require.Equal(t, map[string]int{"applied": len(ids)}, h.statusCounts(), "status counts: got %v; want %d applied", h.statusCounts(), len(ids))
	want := expected(map[string]any{"owner": "seed"}, ids, cs)
	want["admin"] = map[string]any{"owner": "admin"}
	want["b"] = map[string]any{"owner": "b"}
	h.requireRemote(want)
	for _, r := range h.sim.Requests() {
		if r.ID == "" {
			continue
		}
		require.True(t, strings.HasPrefix(r.Path, "/assignments/"), "request path %q: want it under /assignments/", r.Path)
		seg := strings.TrimPrefix(r.Path, "/assignments/")
		require.NotContains(t, seg, "/", "request path %q: got more than one segment", r.Path)
		dec, err := url.PathUnescape(seg)
		require.NoError(t, err)
		require.Equal(t, r.ID, dec, "request path %q decodes to %q; want the id %q", r.Path, dec, r.ID)
	}
}

// A remote that echoes the request's Authorization header — in its error
// texts (a gateway's error page) and, through a person, in a resource's own
// fields — never gets the credential into anything stagesync stores, logs
// or shows: attempts and change rows, snapshots, merges, health rows.
func TestEchoedCredentialIsRedactedEverywhere(t *testing.T) {
	t.Parallel()
	const secret = "s3cr3t-token/with+chars<>"
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("echo", 4)
	h.seed(ids, map[string]any{"owner": "seed", "notes": ""})
	// A person pasted the credential into a field: the conflict below brings
	// it back as the remote's current representation (merge row, snapshot).
	h.sim.Edit(ids[0], map[string]any{"notes": "token was Bearer " + secret}, "person")
	front, frontURL := newFrontDoor(t, h.sim)
	h.env = map[string]string{"FRONT_URL": frontURL, "SIM_TOKEN": secret}
	// owner manual: the conflict is resolved by reading the resource (a
	// write of ours fields only would go again unread), so the answer with
	// the pasted credential reaches merges.theirs.
	h.startProcessor(configYAML(nil, map[string]string{
		"base_url": "${FRONT_URL}", "auth": "{env: SIM_TOKEN, prefix: 'Bearer '}", "max_attempts": "100",
		"merge": "{default: ours, fields: {owner: manual}}"}))
	// ids[0]'s stored ETag is stale, so its write conflicts and is merged.
	_, err := h.pool.Exec(context.Background(), `INSERT INTO stagesync.resources (target, resource_id, etag, snapshot)
		VALUES ($1, $2, '"stale"', '{"owner": "seed", "notes": ""}')`, target, ids[0])
	require.NoError(t, err)
	// While the front door fails every request with 500 and an error text
	// that repeats the Authorization header, changes retry and record it.
	front.setFailing(true)
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": fmt.Sprintf("crm-%d", i)}})
	}
	h.insert(cs...)
	h.waitFor("failed requests recorded", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code = 500`) >= 3
	})
	front.setFailing(false)
	h.waitDrained(60 * time.Second)
	require.Equal(t, map[string]int{"applied": 3, "merged": 1}, h.statusCounts())

	var leaks int
	require.NoError(t, h.pool.QueryRow(context.Background(), `
		SELECT (SELECT count(*) FROM stagesync.attempts a WHERE a::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.changes c WHERE c::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.resources r WHERE r::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.merges m WHERE m::text LIKE '%' || $1 || '%')
		     + (SELECT count(*) FROM stagesync.target_health th WHERE th::text LIKE '%' || $1 || '%')`,
		"s3cr3t-token").Scan(&leaks))
	require.Equal(t, 0, leaks, "rows containing the credential: got %d; want 0", leaks)
	require.Positive(t, h.count(`SELECT count(*) FROM stagesync.attempts WHERE error LIKE '%Bearer [redacted]%'`),
		"attempts whose error shows the echo redacted: got 0; want ≥ 1")
	require.Positive(t, h.count(`SELECT count(*) FROM stagesync.merges WHERE theirs::text LIKE '%[redacted]%'`),
		"merges whose theirs shows the pasted credential redacted: got 0; want ≥ 1")
	require.NotContains(t, h.logs.tail(1<<30), "s3cr3t-token", "processor logs contain the credential")
}
