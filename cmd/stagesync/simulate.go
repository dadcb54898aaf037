package main

import (
	"context"
	"errors"
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
	fs := newFlagSet(ctx, "simulate", stdout)
	listen := fs.String("listen", "127.0.0.1:8080", "address to listen on; port 0 picks a free port")
	itemPrefix := fs.String("item-prefix", "/items", "path of the collection; items live at PREFIX/ID")
	conflictStatus := fs.Int("conflict-status", http.StatusPreconditionFailed, "status for a stale If-Match: 409 or 412")
	weakETags := fs.Bool("weak-etags", false, `serve weak ETags (W/"…")`)
	idempotency := fs.Bool("idempotency", false, "replay completed 2xx writes that repeat an Idempotency-Key")
	latency := fs.Duration("latency", 0, "latency added to every request")
	errorRate := fs.Float64("error-rate", 0, "fraction [0,1] of requests (and of $batch items) answered 500 or 503")
	rateLimitRate := fs.Float64("ratelimit-rate", 0, "fraction [0,1] of requests (and of $batch items) answered 429")
	retryAfter := fs.Duration("retry-after", time.Second, "Retry-After of 429 and 503 responses, whole seconds (min 1s)")
	resetRate := fs.Float64("reset-rate", 0, "fraction [0,1] of single requests whose connection is reset")
	seed := fs.Int64("seed", 0, "random seed for faults and other users; 0 means time-based")
	otherUsersRate := fs.Float64("other-users-rate", 0, "edits per second by simulated other users; 0 is off")
	otherUsersFields := fs.String("other-users-fields", "owner,status", "comma-separated fields other users edit")
	seedResources := fs.Int("seed-resources", 0, `create N resources r-0000… with {"owner":"crm","status":"new"}`)
	dropAfterCommitRate := fs.Float64("drop-after-commit-rate", 0, "fraction [0,1] of writes applied and then left unanswered (connection reset, or a $batch item missing)")
	strictIfMatch := fs.Bool("strict-if-match", false, `refuse every weak If-Match (W/"…") with 412, as RFC 9110 requires; with --weak-etags no write can succeed`)

	batch := fs.Bool("batch", false, "serve OData 4.01 JSON batch requests (POST {\"requests\": […]}) at --batch-path")
	batchPath := fs.String("batch-path", "/$batch", "path of the $batch endpoint; item urls without a leading / are relative to its folder")
	maxBatchRequests := fs.Int("max-batch-requests", 100, "most items one $batch may hold; more are answered 413")
	batchShuffle := fs.Bool("batch-shuffle", false, "answer $batch items in a random order (clients must match answers by id)")
	batchErrorRate := fs.Float64("batch-error-rate", 0, "fraction [0,1] of $batch POSTs answered 500 or 503 as a whole (items draw --error-rate)")
	batchRateLimitRate := fs.Float64("batch-ratelimit-rate", 0, "fraction [0,1] of $batch POSTs answered 429 as a whole (items draw --ratelimit-rate)")
	batchResetRate := fs.Float64("batch-reset-rate", 0, "fraction [0,1] of $batch POSTs whose connection is reset before any item runs")
	batchMissingRate := fs.Float64("batch-missing-rate", 0, "fraction [0,1] of $batch items left out of the answer")
	batchMissingAppliedRate := fs.Float64("batch-missing-applied-rate", 0, "fraction [0,1] of the missing items that were applied before being left out")

	noETag := fs.Bool("no-etag", false, "misbehave: send no ETag header (ETags are still enforced)")
	hugeNumberField := fs.String("huge-number-field", "", "misbehave: add this field holding the number "+remotesim.HugeNumber+" to every representation")
	invalidUTF8ETags := fs.Bool("invalid-utf8-etags", false, "misbehave: issue ETags holding bytes that are not UTF-8")
	echoAuthorization := fs.Bool("echo-authorization", false, "misbehave: copy the request's Authorization header into error bodies")
	padBodyBytes := fs.Int64("pad-body-bytes", 0, "misbehave: pad JSON object answers to this many bytes (streamed; at most 1 GiB)")
	slowBodyRate := fs.Int64("slow-body-rate", 0, "misbehave: send headers at once, then the body at this many bytes per second")
	misbehaveIDs := fs.String("misbehave-ids", "", "comma-separated resource ids the misbehave flags are limited to; empty means all")
	rest, err := parseFlags(fs, args)
	if err != nil {
		return err // the flag set has printed the problem and usage; ErrHelp passes through
	}
	if len(rest) > 0 {
		return fmt.Errorf("simulate: unexpected arguments %q", rest)
	}

	if *conflictStatus != http.StatusConflict && *conflictStatus != http.StatusPreconditionFailed {
		return fmt.Errorf("--conflict-status: must be 409 or 412, got %d", *conflictStatus)
	}
	for _, r := range []struct {
		flag string
		v    float64
	}{
		{"--error-rate", *errorRate}, {"--ratelimit-rate", *rateLimitRate}, {"--reset-rate", *resetRate},
		{"--drop-after-commit-rate", *dropAfterCommitRate}, {"--batch-error-rate", *batchErrorRate},
		{"--batch-ratelimit-rate", *batchRateLimitRate}, {"--batch-reset-rate", *batchResetRate},
		{"--batch-missing-rate", *batchMissingRate}, {"--batch-missing-applied-rate", *batchMissingAppliedRate},
	} {
		if !(r.v >= 0 && r.v <= 1) {
			return fmt.Errorf("%s: must be in [0,1], got %v", r.flag, r.v)
		}
	}
	if p := strings.TrimRight(*itemPrefix, "/"); !strings.HasPrefix(*itemPrefix, "/") || p == "" || p == "/_sim" || strings.HasPrefix(p, "/_sim/") {
		return fmt.Errorf("--item-prefix: must start with / and be neither / nor under /_sim, got %q", *itemPrefix)
	}
	prefix := strings.TrimRight(*itemPrefix, "/")
	if b := *batchPath; !strings.HasPrefix(b, "/") || b == "/" || b == prefix || strings.HasPrefix(b, prefix+"/") || b == "/_sim" || strings.HasPrefix(b, "/_sim/") {
		return fmt.Errorf("--batch-path: must start with / and be neither / nor under --item-prefix or /_sim, got %q", b)
	}
	if *maxBatchRequests < 1 {
		return fmt.Errorf("--max-batch-requests: must be at least 1, got %d", *maxBatchRequests)
	}
	if *padBodyBytes < 0 || *padBodyBytes > 1<<30 {
		return fmt.Errorf("--pad-body-bytes: must be in [0,1073741824], got %d", *padBodyBytes)
	}
	if *slowBodyRate < 0 {
		return fmt.Errorf("--slow-body-rate: must not be negative, got %d", *slowBodyRate)
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
	fields := splitList(*otherUsersFields)
	if *otherUsersRate > 0 && len(fields) == 0 {
		return errors.New("--other-users-fields: must name at least one field when --other-users-rate is set")
	}
	if *seedResources < 0 || *seedResources > 10_000_000 {
		return fmt.Errorf("--seed-resources: must be in [0,10000000], got %d", *seedResources)
	}

	sim := remotesim.New(remotesim.Options{
		ItemPrefix:              *itemPrefix,
		ConflictStatus:          *conflictStatus,
		WeakETags:               *weakETags,
		StrictIfMatch:           *strictIfMatch,
		IdempotencyCache:        *idempotency,
		Latency:                 *latency,
		ErrorRate:               *errorRate,
		RateLimitRate:           *rateLimitRate,
		RetryAfter:              *retryAfter,
		ResetRate:               *resetRate,
		DropAfterCommitRate:     *dropAfterCommitRate,
		Seed:                    *seed,
		BatchWrites:             *batch,
		BatchPath:               *batchPath,
		MaxBatchRequests:        *maxBatchRequests,
		ShuffleBatchResponses:   *batchShuffle,
		BatchErrorRate:          *batchErrorRate,
		BatchRateLimitRate:      *batchRateLimitRate,
		BatchResetRate:          *batchResetRate,
		BatchMissingRate:        *batchMissingRate,
		BatchMissingAppliedRate: *batchMissingAppliedRate,
		Misbehavior: remotesim.Misbehavior{
			IDs:                 splitList(*misbehaveIDs),
			NoETag:              *noETag,
			HugeNumberField:     *hugeNumberField,
			InvalidUTF8ETags:    *invalidUTF8ETags,
			EchoAuthorization:   *echoAuthorization,
			PadBodyBytes:        *padBodyBytes,
			SlowBodyBytesPerSec: *slowBodyRate,
		},
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

	where := prefix
	if *batch {
		where += " " + *batchPath
	}
	if _, err := fmt.Fprintf(stdout, "simulate: listening on http://%s %s\n", ln.Addr(), where); err != nil {
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

// splitList splits a comma-separated flag value, dropping blanks.
func splitList(v string) []string {
	var out []string
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
