package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/stagesync/stagesync/test/remotesim"
)

// simulateShutdownTimeout bounds how long in-flight requests may take once ctx ends.
const simulateShutdownTimeout = 5 * time.Second

// cmdSimulate serves the ETag-enforcing remote API simulator (package remotesim) until ctx
// is cancelled, for demos and manual testing. Every setting comes from flags; getenv is
// accepted for the dispatcher's uniform signature.
func cmdSimulate(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("simulate", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8080", "address to listen on; port 0 picks a free port")
	itemPrefix := fs.String("item-prefix", "/items", "path of the collection; items live at PREFIX/ID")
	conflictStatus := fs.Int("conflict-status", http.StatusPreconditionFailed, "status for a stale If-Match: 409 or 412")
	weakETags := fs.Bool("weak-etags", false, `serve weak ETags (W/"…")`)
	idempotency := fs.Bool("idempotency", false, "replay completed 2xx writes that repeat an Idempotency-Key")
	latency := fs.Duration("latency", 0, "latency added to every request")
	errorRate := fs.Float64("error-rate", 0, "fraction [0,1] of requests answered 500 or 503")
	rateLimitRate := fs.Float64("ratelimit-rate", 0, "fraction [0,1] of requests answered 429")
	retryAfter := fs.Duration("retry-after", time.Second, "Retry-After of 429 and 503 responses, whole seconds (min 1s)")
	resetRate := fs.Float64("reset-rate", 0, "fraction [0,1] of requests whose connection is reset")
	seed := fs.Int64("seed", 0, "random seed for faults and other users; 0 means time-based")
	otherUsersRate := fs.Float64("other-users-rate", 0, "edits per second by simulated other users; 0 is off")
	otherUsersFields := fs.String("other-users-fields", "owner,status", "comma-separated fields other users edit")
	seedResources := fs.Int("seed-resources", 0, `create N resources r-0000… with {"owner":"crm","status":"new"}`)
	if err := fs.Parse(args); err != nil {
		return err // the flag set has printed the problem and usage; ErrHelp passes through
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}

	if *conflictStatus != http.StatusConflict && *conflictStatus != http.StatusPreconditionFailed {
		return fmt.Errorf("--conflict-status: must be 409 or 412, got %d", *conflictStatus)
	}
	for _, r := range []struct {
		flag string
		v    float64
	}{{"--error-rate", *errorRate}, {"--ratelimit-rate", *rateLimitRate}, {"--reset-rate", *resetRate}} {
		if !(r.v >= 0 && r.v <= 1) {
			return fmt.Errorf("%s: must be in [0,1], got %v", r.flag, r.v)
		}
	}
	if p := strings.TrimRight(*itemPrefix, "/"); !strings.HasPrefix(*itemPrefix, "/") || p == "" || p == "/_sim" || strings.HasPrefix(p, "/_sim/") {
		return fmt.Errorf("--item-prefix: must start with / and be neither / nor under /_sim, got %q", *itemPrefix)
	}
	if *latency < 0 {
		return fmt.Errorf("--latency: must not be negative, got %v", *latency)
	}
	if *retryAfter < 0 {
		return fmt.Errorf("--retry-after: must not be negative, got %v", *retryAfter)
	}
	if !(*otherUsersRate >= 0) || *otherUsersRate > 1e6 {
		return fmt.Errorf("--other-users-rate: must be in [0,1000000] edits/s, got %v", *otherUsersRate)
	}
	var fields []string
	for f := range strings.SplitSeq(*otherUsersFields, ",") {
		if f = strings.TrimSpace(f); f != "" {
			fields = append(fields, f)
		}
	}
	if *otherUsersRate > 0 && len(fields) == 0 {
		return errors.New("--other-users-fields: must name at least one field when --other-users-rate is set")
	}
	if *seedResources < 0 || *seedResources > 10_000_000 {
		return fmt.Errorf("--seed-resources: must be in [0,10000000], got %d", *seedResources)
	}

	sim := remotesim.New(remotesim.Options{
		ItemPrefix:       *itemPrefix,
		ConflictStatus:   *conflictStatus,
		WeakETags:        *weakETags,
		IdempotencyCache: *idempotency,
		Latency:          *latency,
		ErrorRate:        *errorRate,
		RateLimitRate:    *rateLimitRate,
		RetryAfter:       *retryAfter,
		ResetRate:        *resetRate,
		Seed:             *seed,
	})
	for i := range *seedResources {
		sim.Put(fmt.Sprintf("r-%04d", i), map[string]any{"owner": "crm", "status": "new"})
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	srv := &http.Server{Handler: sim, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }() // waited for below, on every path

	if _, err := fmt.Fprintf(stdout, "simulate: listening on http://%s %s\n", ln.Addr(), strings.TrimRight(*itemPrefix, "/")); err != nil {
		_ = srv.Close()
		<-served
		return fmt.Errorf("write listening address: %w", err)
	}

	stopUsers := sim.StartOtherUsers(ctx, *otherUsersRate, fields)
	defer stopUsers()

	select {
	case err := <-served:
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), simulateShutdownTimeout)
	defer cancel()
	shutdownErr := srv.Shutdown(shutdownCtx)
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	}
	if shutdownErr != nil {
		return fmt.Errorf("shut down simulator on %s: %w", ln.Addr(), shutdownErr)
	}
	return nil
}
