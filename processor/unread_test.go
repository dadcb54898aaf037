package processor

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"
)

// A conflict is answered without a GET only when the remote's value can't
// change what is written and the write can't touch anything else: PATCH,
// every field to write policy ours, no write in doubt, and a fresh ETag in
// the conflict answer.
func TestRewriteUnreadOnlyWhenTheRemoteCannotChangeTheDecision(t *testing.T) {
	t.Parallel()
	stored := resourceState{etag: `"e1"`, snapshot: map[string]any{"status": "open"}}
	conflict := response{status: http.StatusPreconditionFailed, etag: `"e2"`}
	tests := []struct {
		name     string
		method   string
		fields   map[string]any
		inDoubt  bool
		conflict response
		want     bool
	}{
		{"PATCH of ours fields with a fresh ETag", "PATCH", map[string]any{"status": "won", "stage": "s2"}, false, conflict, true},
		{"a field to write is policy theirs", "PATCH", map[string]any{"status": "won", "owner": "crm"}, false, conflict, false},
		{"a field to write is policy manual", "PATCH", map[string]any{"region": "east"}, false, conflict, false},
		{"PUT sends the whole document", "PUT", map[string]any{"status": "won"}, false, conflict, false},
		{"the resource is in doubt", "PATCH", map[string]any{"status": "won"}, true, conflict, false},
		{"the answer carries no ETag", "PATCH", map[string]any{"status": "won"}, false, response{status: http.StatusPreconditionFailed}, false},
		{"the answer names the refused ETag", "PATCH", map[string]any{"status": "won"}, false, response{status: http.StatusPreconditionFailed, etag: `"e1"`}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tc := testTarget(8)
			tc.UpdateMethod = tt.method
			tc.Merge = MergeConfig{Default: PolicyOurs, Fields: map[string]Policy{"owner": PolicyTheirs, "region": PolicyManual}}
			a := &applier{t: tc}
			rr := newResourceRun("r1", nil, stored)
			if tt.inDoubt {
				rr.inDoubt = &inDoubtWrite{Method: "PATCH"}
			}
			got := a.canRewriteUnread(rr, tt.fields, stored, tt.conflict)
			require.Equal(t, tt.want, got, "canRewriteUnread: got %v; want %v", got, tt.want)
		})
	}
}
