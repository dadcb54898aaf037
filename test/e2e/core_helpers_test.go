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
