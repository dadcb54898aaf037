// Package migrations holds stagesync's schema as goose SQL files, embedded so
// the binary migrates a database without the source tree.
package migrations

import "embed"

// FS holds the migration files, named NNNNN_name.sql so that goose's order
// and sqlc's lexicographic order agree.
//
//go:embed *.sql
var FS embed.FS
