package remotesim

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"time"
)

// writerOtherUser is the Version.Writer of StartOtherUsers' edits.
const writerOtherUser = "other-user"

// StartOtherUsers simulates other people editing the remote system: about ratePerSec times
// a second it picks a random existing resource and sets one random field from fields to a
// new value "user-edit-<n>", as Edit with writer "other-user" would. It runs until ctx ends
// or stop is called; stop waits for the goroutine to end and may be called more than once.
// A rate <= 0 or no fields starts nothing.
func (s *Sim) StartOtherUsers(ctx context.Context, ratePerSec float64, fields []string) (stop func()) {
	if !(ratePerSec > 0) || len(fields) == 0 {
		return func() {}
	}
	fields = slices.Clone(fields)
	interval := max(time.Microsecond, time.Duration(float64(time.Second)/ratePerSec))
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				s.otherUserEdit(fields)
			}
		}
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// otherUserEdit makes one edit; it does nothing while there are no resources.
func (s *Sim) otherUserEdit(fields []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.ids) == 0 {
		return
	}
	id := s.ids[s.rng.IntN(len(s.ids))]
	field := fields[s.rng.IntN(len(fields))]
	s.editSeq++
	patch := map[string]any{field: "user-edit-" + strconv.FormatUint(s.editSeq, 10)}
	s.commitLocked(id, merge(s.resources[id].fields, patch), patch, writerOtherUser, "PATCH")
}
