package db_test

import (
	"context"
	"log"
	"os"

	"github.com/stagesync/stagesync/db"
)

// Migrate brings a database to the current schema: River's tables first,
// then stagesync's. Several processes may call it at once; a second call
// is a no-op.
func ExampleMigrate() {
	ctx := context.Background()
	pool, err := db.NewPool(ctx, os.Getenv("DATABASE_URL"), 4)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := db.Migrate(ctx, pool, nil); err != nil {
		log.Fatal(err)
	}
	current, err := db.MigrationsCurrent(ctx, pool)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("schema current: %v", current)
}
