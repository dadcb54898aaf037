package processor

import (
	"encoding/json"
	"fmt"
	"slices"
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
	// TookOursUnread: written again at once after a conflict, with the
	// ETag the conflict answer carried, without reading the remote: every
	// field to write had policy ours, so its value could not change the
	// decision (applier.rewriteUnread). The merges row has no theirs.
	TookOursUnread Decision = "took_ours_unread"
)

// mergeBase is what stagesync knew of the remote's representation when the
// change was made: possibly nothing, possibly only some fields (a batch
// lookup asks only for the fields the merge needs).
type mergeBase struct {
	fields map[string]any // nil: nothing known
	// covers, when non-nil, lists the only fields fields speaks for.
	covers map[string]bool
}

// get returns the base value of f, whether the field existed, and whether
// the base of f is known at all.
func (b mergeBase) get(f string) (v any, has, known bool) {
	if b.fields == nil || b.covers != nil && !b.covers[f] {
		return nil, false, false
	}
	v, has = b.fields[f]
	return v, has, true
}

// mergeResult is a three-way merge of one resource's desired fields.
type mergeResult struct {
	// write holds the fields still to send: those decided took_ours.
	write map[string]any
	// decisions has one entry per field of ours.
	decisions map[string]Decision
	// reasons explains each needs_review decision.
	reasons map[string]string
}

// merge decides each field of ours against theirs (the remote's current
// representation) and base (what stagesync knew before the change).
//
// A field whose base is unknown may have been changed by a person or not:
// policy ours writes ours anyway, theirs and manual send it to review
// rather than silently keep the remote's value over the upstream's.
//
// With doubt (an earlier write of ours may or may not have landed), a
// remote value the in-doubt write accounts for (its own value, or the
// value it was made against) is not a person's edit. A field whose value
// comes from a change that write carried (strict) may be overwritten only
// when its remote value is one stagesync can account for: any other value
// is someone's edit that may have come after our write, and writing the
// same old value again would revert it, so it is never overwritten,
// whatever the policy: theirs keeps it, ours and manual ask for review. A
// field set by a newer change merges as usual.
func merge(t *TargetConfig, base mergeBase, ours, theirs map[string]any, doubt *inDoubtWrite, strict map[string]bool) mergeResult {
	r := mergeResult{write: map[string]any{}, decisions: make(map[string]Decision, len(ours)), reasons: map[string]string{}}
	for f, ov := range ours {
		tv, theirsHas := theirs[f]
		if sameValue(ov, true, tv, theirsHas) {
			r.decisions[f] = AlreadyEqual
			continue
		}
		bv, baseHas, known := base.get(f)
		untouched := known && sameValue(bv, baseHas, tv, theirsHas) || doubt != nil && doubt.explains(f, tv, theirsHas)
		policy := t.policy(f)
		if strict[f] {
			switch {
			case untouched:
				r.decisions[f], r.write[f] = TookOurs, ov
			case policy == PolicyTheirs:
				r.decisions[f] = KeptTheirs
			default:
				r.decisions[f] = NeedsReview
				r.reasons[f] = fmt.Sprintf("needs_review: field %q is %s on the remote, a value stagesync did not write; an earlier write to this resource has an unknown outcome, so that edit may have come after it (policy %s); upstream wants %s",
					f, jsonText(tv, theirsHas), policy, jsonText(ov, true))
			}
			continue
		}
		switch {
		case untouched, policy == PolicyOurs:
			r.decisions[f], r.write[f] = TookOurs, ov
		case policy == PolicyTheirs && known:
			r.decisions[f] = KeptTheirs
		case !known:
			r.decisions[f] = NeedsReview
			r.reasons[f] = fmt.Sprintf("needs_review: field %q is %s on the remote; upstream wants %s, and stagesync does not know the remote's value before this change, so it cannot tell whether a person changed it (policy %s)",
				f, jsonText(tv, theirsHas), jsonText(ov, true), policy)
		default:
			r.decisions[f] = NeedsReview
			r.reasons[f] = fmt.Sprintf("needs_review: field %q was changed on the remote to %s; upstream wants %s (policy manual)",
				f, jsonText(tv, theirsHas), jsonText(ov, true))
		}
	}
	return r
}

// sameValue compares two field values, each possibly absent; a null value
// of ours means "remove the field", which an absent field satisfies.
func sameValue(a any, aHas bool, b any, bHas bool) bool {
	switch {
	case aHas && bHas:
		return jsonEqual(a, b)
	case aHas:
		return a == nil
	case bHas:
		return b == nil
	}
	return true
}

// jsonText shows a field value in a reason.
func jsonText(v any, has bool) string {
	if !has {
		return "absent"
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return cleanText(string(b), 200)
}

// mergeFields are the fields a batch lookup asks for as the merge base:
// every field whose policy is theirs or manual (a field whose policy is
// ours needs no base). all says the default policy is not ours, so every
// field may need one: ask for the whole representation.
func (t *TargetConfig) mergeFields() (fields []string, all bool) {
	if t.Merge.Default != PolicyOurs {
		return nil, true
	}
	for f, p := range t.Merge.Fields {
		if p != PolicyOurs && f != "id" && f != "etag" {
			fields = append(fields, f)
		}
	}
	slices.Sort(fields)
	return fields, false
}
