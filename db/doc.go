// Package db is stagesync's database layer: the sqlc-generated queries of
// queries/*.sql (one Queries value works on a pool or a transaction), the
// connection pool, and migrations (River's, then stagesync's).
package db
