package processor

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMergeDecidesEachFieldByPolicy(t *testing.T) {
	t.Parallel()
	target := &TargetConfig{Merge: MergeConfig{Default: PolicyOurs, Fields: map[string]Policy{
		"owner": PolicyTheirs, "region": PolicyManual,
	}}}
	tests := []struct {
		name         string
		base, theirs map[string]any
		covers       map[string]bool
		doubt        *inDoubtWrite
		strict       map[string]bool
		ours         map[string]any
		want         map[string]Decision
		wantWrite    map[string]any
	}{
		{
			name:      "remote left the field alone",
			base:      map[string]any{"owner": "a"},
			theirs:    map[string]any{"owner": "a"},
			ours:      map[string]any{"owner": "b"},
			want:      map[string]Decision{"owner": TookOurs},
			wantWrite: map[string]any{"owner": "b"},
		},
		{
			name:      "theirs policy keeps a remote edit",
			base:      map[string]any{"owner": "a"},
			theirs:    map[string]any{"owner": "user"},
			ours:      map[string]any{"owner": "b"},
			want:      map[string]Decision{"owner": KeptTheirs},
			wantWrite: map[string]any{},
		},
		{
			name:      "ours policy overwrites a remote edit",
			base:      map[string]any{"status": "new"},
			theirs:    map[string]any{"status": "user"},
			ours:      map[string]any{"status": "won"},
			want:      map[string]Decision{"status": TookOurs},
			wantWrite: map[string]any{"status": "won"},
		},
		{
			name:      "manual policy asks for review",
			base:      map[string]any{"region": "eu"},
			theirs:    map[string]any{"region": "us"},
			ours:      map[string]any{"region": "apac"},
			want:      map[string]Decision{"region": NeedsReview},
			wantWrite: map[string]any{},
		},
		{
			name:      "remote already holds our value",
			base:      map[string]any{"region": "eu"},
			theirs:    map[string]any{"region": "apac"},
			ours:      map[string]any{"region": "apac"},
			want:      map[string]Decision{"region": AlreadyEqual},
			wantWrite: map[string]any{},
		},
		{
			name:      "numbers compare as JSON numbers",
			base:      map[string]any{"n": float64(1)},
			theirs:    map[string]any{"n": float64(2)},
			ours:      map[string]any{"n": 2},
			want:      map[string]Decision{"n": AlreadyEqual},
			wantWrite: map[string]any{},
		},
		{
			name:      "unknown base: ours writes, theirs and manual ask for review",
			base:      nil,
			theirs:    map[string]any{"owner": "a", "status": "x", "region": "eu"},
			ours:      map[string]any{"owner": "b", "status": "y", "region": "us"},
			want:      map[string]Decision{"owner": NeedsReview, "status": TookOurs, "region": NeedsReview},
			wantWrite: map[string]any{"status": "y"},
		},
		{
			name:      "a partial base knows only the fields it covers",
			base:      map[string]any{"id": "r", "owner": "a"},
			covers:    map[string]bool{"id": true, "owner": true, "region": true},
			theirs:    map[string]any{"owner": "a", "region": "eu", "team": "t1"},
			ours:      map[string]any{"owner": "b", "region": "us", "team": "t2"},
			want:      map[string]Decision{"owner": TookOurs, "region": NeedsReview, "team": TookOurs},
			wantWrite: map[string]any{"owner": "b", "team": "t2"},
		},
		{
			name:      "in doubt: values stagesync can account for are overwritten",
			base:      map[string]any{"owner": "a", "status": "open"},
			doubt:     &inDoubtWrite{Method: "PATCH", Body: map[string]any{"status": "won"}},
			strict:    map[string]bool{"owner": true, "status": true},
			theirs:    map[string]any{"owner": "a", "status": "won"},
			ours:      map[string]any{"owner": "b", "status": "lost"},
			want:      map[string]Decision{"owner": TookOurs, "status": TookOurs},
			wantWrite: map[string]any{"owner": "b", "status": "lost"},
		},
		{
			name:      "in doubt: a person's value is never overwritten, whatever the policy",
			base:      map[string]any{"owner": "a", "status": "open", "region": "eu"},
			doubt:     &inDoubtWrite{Method: "PATCH", Body: map[string]any{"status": "won", "owner": "b", "region": "us"}},
			strict:    map[string]bool{"owner": true, "status": true, "region": true},
			theirs:    map[string]any{"owner": "person", "status": "person", "region": "person"},
			ours:      map[string]any{"owner": "b", "status": "won", "region": "us"},
			want:      map[string]Decision{"owner": KeptTheirs, "status": NeedsReview, "region": NeedsReview},
			wantWrite: map[string]any{},
		},
		{
			name:      "in doubt: a newer change's field merges as usual",
			base:      map[string]any{"status": "open"},
			doubt:     &inDoubtWrite{Method: "PATCH", Body: map[string]any{"status": "won"}},
			strict:    map[string]bool{},
			theirs:    map[string]any{"status": "person"},
			ours:      map[string]any{"status": "newer"},
			want:      map[string]Decision{"status": TookOurs},
			wantWrite: map[string]any{"status": "newer"},
		},
		{
			name:      "in doubt: the value a merged write was made against is accounted for",
			base:      map[string]any{"status": "open"},
			doubt:     &inDoubtWrite{Method: "PATCH", Body: map[string]any{"status": "won"}, Base: map[string]any{"status": "lost"}},
			strict:    map[string]bool{"status": true},
			theirs:    map[string]any{"status": "lost"},
			ours:      map[string]any{"status": "won"},
			want:      map[string]Decision{"status": TookOurs},
			wantWrite: map[string]any{"status": "won"},
		},
		{
			name:      "field added remotely is a remote edit",
			base:      map[string]any{},
			theirs:    map[string]any{"owner": "user"},
			ours:      map[string]any{"owner": "b"},
			want:      map[string]Decision{"owner": KeptTheirs},
			wantWrite: map[string]any{},
		},
		{
			name:      "removing an absent field is already equal",
			base:      map[string]any{},
			theirs:    map[string]any{},
			ours:      map[string]any{"note": nil},
			want:      map[string]Decision{"note": AlreadyEqual},
			wantWrite: map[string]any{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := merge(target, mergeBase{fields: tt.base, covers: tt.covers}, tt.ours, tt.theirs, tt.doubt, tt.strict)
			require.Equal(t, tt.want, got.decisions)
			require.Equal(t, tt.wantWrite, got.write)
		})
	}
}

func TestSegmentsCoalesceInOrder(t *testing.T) {
	t.Parallel()
	ops := func(segs [][]openChange) [][]int64 {
		var out [][]int64
		for _, s := range segs {
			out = append(out, changeIDs(s))
		}
		return out
	}
	cs := []openChange{
		{id: 1, op: "update"}, {id: 2, op: "update"}, {id: 3, op: "delete"}, {id: 4, op: "update"},
		{id: 5, op: "create"}, {id: 6, op: "update"}, {id: 7, op: "delete"}, {id: 8, op: "delete"},
	}
	require.Equal(t, [][]int64{{1, 2}, {3}, {4}, {5, 6}, {7}, {8}}, ops(segments(cs, 100)))
	// max_coalesce cuts a run of updates (and a create's) into pieces.
	long := []openChange{
		{id: 1, op: "update"}, {id: 2, op: "update"}, {id: 3, op: "update"},
		{id: 4, op: "create"}, {id: 5, op: "update"}, {id: 6, op: "update"},
	}
	require.Equal(t, [][]int64{{1, 2}, {3}, {4, 5}, {6}}, ops(segments(long, 2)))

	folded := fold([]openChange{
		{fields: map[string]any{"a": 1, "b": 1}},
		{fields: map[string]any{"b": 2}},
	})
	require.Equal(t, map[string]any{"a": 1, "b": 2}, folded, "later changes must win")
}

func TestBackoffGrowsWithJitterAndCap(t *testing.T) {
	t.Parallel()
	for attempt := 1; attempt <= 12; attempt++ {
		want := min(100*(1<<(attempt-1)), 2000) // milliseconds
		for range 50 {
			got := backoff(100e6, 2000e6, attempt).Milliseconds()
			require.GreaterOrEqual(t, got, int64(want/2), "attempt %d", attempt)
			require.LessOrEqual(t, got, int64(want), "attempt %d", attempt)
		}
	}
}

func TestItemURLEscapesIDs(t *testing.T) {
	t.Parallel()
	r := &remote{t: &TargetConfig{BaseURL: "http://api.test/v1", ItemPath: "/assignments/{id}"}}
	tests := map[string]string{
		"plain":         "http://api.test/v1/assignments/plain",
		"../admin":      "http://api.test/v1/assignments/..%2Fadmin",
		"..":            "http://api.test/v1/assignments/%2E%2E",
		".":             "http://api.test/v1/assignments/%2E",
		"a b?c=d#e":     "http://api.test/v1/assignments/a%20b%3Fc=d%23e",
		"x/y":           "http://api.test/v1/assignments/x%2Fy",
		"%2e%2e":        "http://api.test/v1/assignments/%252e%252e",
		"http://evil/x": "http://api.test/v1/assignments/http:%2F%2Fevil%2Fx",
	}
	for id, want := range tests {
		require.Equal(t, want, r.itemURL(id), "id %q", id)
	}
}

// Dropping a needs_review change can change the folded value of another
// field, and so its decision: the merge is repeated until stable, so an
// earlier change's value never overwrites a person's edit of a manual field.
func TestMergeAndWriteRepeatsUntilNoChangeNeedsReview(t *testing.T) {
	t.Parallel()
	target := &TargetConfig{Name: "t", Merge: MergeConfig{Default: PolicyManual}}
	a := &applier{t: target, r: &remote{t: target}, now: time.Now}
	base := map[string]any{"f": "b0", "g": "g0"}
	theirs := map[string]any{"f": "T", "g": "gT"}
	live := []openChange{
		{id: 1, op: "update", fields: map[string]any{"g": "x"}},
		{id: 2, op: "update", fields: map[string]any{"f": "y", "g": "gT"}},
	}
	rr := newResourceRun("r", live, resourceState{etag: "old", snapshot: base})
	done := a.mergeAndWrite(t.Context(), rr, live, mergeBase{fields: base}, response{status: 200, etag: "new", body: theirs}, nil)
	require.True(t, done)
	require.Equal(t, statusDead, rr.outcome(2).status, "change 2 touches f, changed remotely")
	require.Equal(t, statusDead, rr.outcome(1).status, "without change 2, change 1's g differs from the person's gT")
	require.Contains(t, rr.outcome(1).errText, `field "g"`)
	require.Len(t, rr.merges, 1)
	require.Equal(t, "needs_review", rr.merges[0].outcome)
	require.Empty(t, rr.merges[0].result, "nothing may be written")
	require.Equal(t, NeedsReview, rr.merges[0].decisions["f"])
	require.Equal(t, NeedsReview, rr.merges[0].decisions["g"])
	require.Empty(t, rr.attempts, "no request may be sent")
	require.Equal(t, "new", rr.state.etag, "the fetched state becomes the stored one")
}
