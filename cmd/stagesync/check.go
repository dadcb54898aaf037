package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

func cmdCheck(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "check", stdout)
	configPath := fs.String("config", "stagesync.yaml", "YAML config file to check")
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: the config's database_url, $DATABASE_URL, else the PG* variables as psql uses them)")
	var resources resourceFlag
	fs.Var(&resources, "resource", "resource id to GET, as ID (every target) or TARGET=ID; repeatable (default: one stagesync stored or was given)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("check: unexpected arguments %q", pos)
	}
	return check(ctx, checkOpts{configPath: *configPath, dbURL: *dbURL, resources: resources, getenv: getenv, stdout: stdout, client: processor.NewHTTPClient()})
}

type checkOpts struct {
	configPath string
	dbURL      string
	resources  resourceFlag
	getenv     func(string) string
	stdout     io.Writer
	client     *http.Client
}

// checkRow is one line of check's table.
type checkRow struct {
	target, check string
	status        processor.ProbeStatus
	detail        string
}

func check(ctx context.Context, o checkOpts) error {
	var rows []checkRow
	add := func(target, what string, st processor.ProbeStatus, detail string) {
		rows = append(rows, checkRow{target, what, st, detail})
	}
	defer func() { writeCheckTable(o.stdout, rows) }()

	cfg, err := processor.LoadConfig(o.configPath, o.getenv)
	if err != nil {
		add("", "config", processor.ProbeFailed, err.Error())
		return fmt.Errorf("check: the config is invalid; nothing else was checked")
	}
	add("", "config", processor.ProbeOK, fmt.Sprintf("%s: %d target(s): %s", o.configPath, len(cfg.Targets), strings.Join(cfg.TargetNames(), ", ")))
	for _, v := range o.resources {
		// A TARGET=ID for a target the config lacks is a typo that would
		// otherwise leave its target probed with no id, silently.
		if t, _, ok := strings.Cut(v, "="); ok && targetNameLike(t) && cfg.Targets[t] == nil {
			add(t, "resource", processor.ProbeFailed, fmt.Sprintf("--resource %s: the config has no target %q (targets: %s)", v, t, strings.Join(cfg.TargetNames(), ", ")))
		}
	}

	src := resolveDatabase(o.dbURL, cfg.DatabaseURL, o.getenv)
	registered := map[string]db.TargetsRegisteredRow{}
	ids := map[string]string{}
	schemaOK := false
	pool, err := db.NewPool(ctx, src.url, 2)
	switch {
	case err != nil:
		add("", "database", processor.ProbeFailed, fmt.Sprintf("%v (database from %s)", err, src.from))
	default:
		defer pool.Close()
		c := pool.Config().ConnConfig
		where := fmt.Sprintf("%s:%d/%s (from %s)", c.Host, c.Port, c.Database, src.from)
		if err := requireMigrated(ctx, pool); err != nil {
			add("", "database", processor.ProbeFailed, err.Error())
			break
		}
		add("", "database", processor.ProbeOK, where+", migrated")
		q := db.New()
		regs, err := q.TargetsRegistered(ctx, pool)
		if err != nil {
			add("", "database", processor.ProbeFailed, fmt.Sprintf("read registered targets: %v", err))
			break
		}
		schemaOK = true
		for _, r := range regs {
			registered[r.Name] = r
		}
		for _, name := range cfg.TargetNames() {
			if id, err := q.CheckResourceID(ctx, pool, name); err == nil && id != "" {
				ids[name] = id
			}
		}
	}

	for _, name := range cfg.TargetNames() {
		t := cfg.Targets[name]
		if schemaOK {
			r, ok := registered[name]
			switch {
			case !ok:
				add(name, "registered", processor.ProbeFailed, fmt.Sprintf("not in stagesync.targets: the upstream's inserts fail until `%s targets sync --config %s` (or run) registers it", self, shellQuote(o.configPath)))
			case r.BaseURL != t.BaseURL || r.ItemPath != t.ItemPath || r.UpdateMethod != t.UpdateMethod:
				add(name, "registered", processor.ProbeWarning, fmt.Sprintf("registered as %s %s%s; the config says %s %s%s: `%s targets sync --config %s` updates it",
					r.UpdateMethod, r.BaseURL, r.ItemPath, t.UpdateMethod, t.BaseURL, t.ItemPath, self, shellQuote(o.configPath)))
			default:
				add(name, "registered", processor.ProbeOK, t.UpdateMethod+" "+t.BaseURL+t.ItemPath)
			}
		}
		id := o.resources.forTarget(name)
		if id == "" {
			id = ids[name]
		}
		for _, p := range processor.ProbeTarget(ctx, o.client, t, id) {
			add(name, p.Check, p.Status, p.Detail)
		}
		if t.BatchWrite != nil {
			p := processor.ProbeBatchWrite(ctx, o.client, t, id)
			add(name, p.Check, p.Status, p.Detail)
		}
	}

	failed := 0
	for _, r := range rows {
		if r.status == processor.ProbeFailed {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("check: %d of %d checks failed", failed, len(rows))
	}
	return nil
}

func writeCheckTable(w io.Writer, rows []checkRow) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "TARGET\tCHECK\tRESULT\tDETAIL\n")
	for _, r := range rows {
		target := r.target
		if target == "" {
			target = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", target, r.check, r.status, oneLine(r.detail, 400))
	}
	_ = tw.Flush() // the outcome is in the returned error
}

// resourceFlag collects --resource values: ID (for every target) or
// TARGET=ID.
type resourceFlag []string

var _ flag.Value = (*resourceFlag)(nil)

func (f *resourceFlag) String() string { return strings.Join(*f, ",") }

func (f *resourceFlag) Set(v string) error {
	if strings.TrimSpace(v) == "" {
		return fmt.Errorf("empty resource id")
	}
	*f = append(*f, v)
	return nil
}

// forTarget returns the id given for target (TARGET=ID wins over a bare
// ID), or "".
func (f resourceFlag) forTarget(target string) string {
	bare := ""
	for _, v := range f {
		if t, id, ok := strings.Cut(v, "="); ok && t == target {
			return id
		}
		if t, _, ok := strings.Cut(v, "="); !ok || !targetNameLike(t) {
			bare = v
		}
	}
	return bare
}

// targetNameLike reports whether s could be a target name, so that an id
// containing "=" (but not starting with a name) still counts as a bare id.
func targetNameLike(s string) bool {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}
