package remotesim

import "context"

// Hooks are callbacks a test runs inside the Sim at exact points of a request. Set them in
// Options.Hooks or, while serving, with SetHooks.
type Hooks struct {
	// AfterCommitFunc, if set, runs right after an API write (PATCH, PUT, DELETE, or a
	// $batch item carrying one) has changed state and before its answer is sent: the
	// moment a client crash or a dropped connection leaves the client not knowing that its
	// write landed. It runs on the request's goroutine, outside the Sim's lock, so it may
	// call any Sim method (Edit, Get, SetFaults, SetHooks); the answer waits until it
	// returns. ctx is the request's context, which ends when the client goes away. Writes
	// that change nothing (conflicts, refusals, idempotent replays) do not call it; a write
	// that will be dropped (DropAfterCommitRate) does, with Request.Fault saying so.
	AfterCommitFunc func(ctx context.Context, c Commit)
}

// Commit describes an API write that has just changed state; see Hooks.AfterCommitFunc.
type Commit struct {
	// Request is the write as it will be logged, without Status and End, which are not
	// known yet.
	Request Request
	// Status is the status of the answer about to be sent (never sent if Request.Fault is
	// "drop-after-commit").
	Status int
	// Version is the version the write created, as History will show it (a copy).
	Version Version
}

// SetHooks replaces the hooks for requests that commit from now on.
func (s *Sim) SetHooks(h Hooks) {
	s.mu.Lock()
	s.hooks = h
	s.mu.Unlock()
}

// afterCommit runs the AfterCommitFunc, if any, for x, which has committed.
func (s *Sim) afterCommit(ctx context.Context, x *exchange) {
	s.mu.Lock()
	f := s.hooks.AfterCommitFunc
	s.mu.Unlock()
	if f == nil {
		return
	}
	v := *x.committed
	v.Fields, v.Written = deepCopyMap(v.Fields), deepCopyMap(v.Written)
	f(ctx, Commit{Request: x.rec, Status: x.resp.status, Version: v})
}
