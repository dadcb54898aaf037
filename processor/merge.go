package processor

import (
	"encoding/json"
	"fmt"
)

// Policy decides a field that the remote changed since our base.
type Policy string

// The field policies of SPEC §4.
const (
	// PolicyOurs writes the upstream value: upstream wins.
	PolicyOurs Policy = "ours"
	// PolicyTheirs keeps the remote edit and drops ours for that field.
	PolicyTheirs Policy = "theirs"
	// PolicyManual refuses to choose: the change ends dead, needs_review.
	PolicyManual Policy = "manual"
)

func (p Policy) valid() bool { return p == PolicyOurs || p == PolicyTheirs || p == PolicyManual }

// Decision is what the merge did with one field.
type Decision string

// Per-field decisions recorded in stagesync.merges.decisions.
const (
	TookOurs     Decision = "took_ours"
	KeptTheirs   Decision = "kept_theirs"
	AlreadyEqual Decision = "already_equal"
	NeedsReview  Decision = "needs_review"
)

// mergeResult is a three-way merge of one resource's desired fields.
type mergeResult struct {
	// write holds the fields still to send: those decided took_ours.
	write map[string]any
	// decisions has one entry per field of ours.
	decisions map[string]Decision
}

// merge decides each field of ours against theirs (the remote's current
// representation) and base (the representation our change was made against).
// A nil base means we never saw the remote's body (e.g. only a batch ETag
// lookup): then every field that differs counts as changed by them, the
// conservative reading that never overwrites an edit we can't rule out.
func merge(t *TargetConfig, base, ours, theirs map[string]any) mergeResult {
	r := mergeResult{write: map[string]any{}, decisions: make(map[string]Decision, len(ours))}
	for f, ov := range ours {
		tv, theirsHas := theirs[f]
		if theirsHas && jsonEqual(ov, tv) || !theirsHas && ov == nil {
			r.decisions[f] = AlreadyEqual
			continue
		}
		changedByThem := true
		if base != nil {
			bv, baseHas := base[f]
			changedByThem = baseHas != theirsHas || !jsonEqual(bv, tv)
		}
		if !changedByThem {
			r.decisions[f] = TookOurs
			r.write[f] = ov
			continue
		}
		switch t.policy(f) {
		case PolicyOurs:
			r.decisions[f] = TookOurs
			r.write[f] = ov
		case PolicyTheirs:
			r.decisions[f] = KeptTheirs
		default:
			r.decisions[f] = NeedsReview
		}
	}
	return r
}

// reviewReason explains a needs_review field for last_error.
func reviewReason(field string, ours, theirs any) string {
	o, _ := json.Marshal(ours)
	t, _ := json.Marshal(theirs)
	return fmt.Sprintf("needs_review: field %q was changed on the remote to %s; upstream wants %s (policy manual)", field, t, o)
}
