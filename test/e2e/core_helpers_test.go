package e2e

import (
	"context"

	"github.com/stretchr/testify/require"
)

// outcomeDetail reads a change's outcome_detail ("" for NULL).
func (h *harness) outcomeDetail(id int64) string {
	h.t.Helper()
	var d string
	err := h.pool.QueryRow(context.Background(),
		`SELECT coalesce(outcome_detail, '') FROM stagesync.changes WHERE id = $1`, id).Scan(&d)
	require.NoError(h.t, err, "read outcome_detail of change %d", id)
	return d
}

// fieldWrites is the sequence of numeric values the remote's API writes
// gave field: a write counts when it changed the field's value (the sim's
// history holds whole representations).
func (h *harness) fieldWrites(id, field string) []float64 {
	h.t.Helper()
	var out []float64
	var prev any
	for _, v := range h.sim.History(id) {
		cur, ok := v.Fields[field]
		if v.Writer == "api" && ok && cur != prev {
			n, isNum := cur.(float64)
			require.True(h.t, isNum, "resource %q: field %q is %T; want a number", id, field, cur)
			out = append(out, n)
		}
		prev = cur
	}
	return out
}
