// Command critest runs cri-tools' CRI validation suite (critest, pinned cri-tools version) against a private
// containerd with CRI, once per runtime handler (runc, the baseline, then kiln), with the images it needs
// built here and served by a local docker-registry that containerd's hosts.toml mirrors registry.k8s.io,
// gcr.io and k8s.gcr.io to. It prints pass, fail and skip counts for each handler and the failed specs.
// `make critest` runs it; it is not part of `make test`.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-runtime/kiln/integration/cri"
)

func main() {
	repo := flag.String("repo", ".", "Kiln source tree")
	tools := flag.String("tools", "_output/tools/bin", "tools directory (pinned containerd, runc, crictl, critest)")
	share := flag.String("share", "_output/share/kiln", "Kiln guest image directory")
	handlers := flag.String("handlers", "runc,kiln", "comma-separated CRI runtime handlers to validate, in order")
	skipFile := flag.String("skip-file", "integration/cri/critest/skip.txt", "critest specs to skip (regular expressions)")
	focus := flag.String("focus", "", "run only specs matching this regular expression")
	parallel := flag.Int("parallel", 1, "critest parallel nodes")
	reportDir := flag.String("report-dir", "_output/critest", "where each handler's critest log and JSON report go")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *repo, *tools, *share, strings.Split(*handlers, ","), *skipFile, *focus, *parallel, *reportDir); err != nil {
		fmt.Fprintln(os.Stderr, "critest:", err)
		os.Exit(1)
	}
}

// result is one handler's counts.
type result struct {
	handler                 string
	passed, failed, skipped int
	failures                []string
	duration                time.Duration
	log, report             string
}

func run(ctx context.Context, repo, tools, share string, handlers []string, skipFile, focus string, parallel int, reportDir string) error {
	repo, _ = filepath.Abs(repo)
	abs := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(repo, p)
	}
	skips, err := readSkips(abs(skipFile))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(abs(reportDir), 0o755); err != nil {
		return err
	}
	start := time.Now()
	reg, err := cri.StartRegistry(ctx, cri.RegistryAddr)
	if err != nil {
		return err
	}
	defer reg.Stop()
	mirror, err := os.MkdirTemp("", "kcri-certs.d-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(mirror)
	if err := cri.WriteMirrorConfig(mirror, reg.Addr, cri.CritestMirroredHosts...); err != nil {
		return err
	}
	// Kiln's configuration through containerd's environment, not the runtime entry's options: critest's
	// user-namespace specs start containers in pods with user namespaces, which containerd's CRI cannot do for an
	// entry with options.
	env, err := cri.Start(ctx, cri.Options{
		RepoRoot: repo, ToolsDir: abs(tools), KilnAssets: abs(share), Handlers: handlers,
		RegistryConfigDir: mirror, Debug: true, Critest: true, KilnConfigInEnv: true,
	})
	if err != nil {
		return err
	}
	defer func() {
		if err := env.Stop(context.WithoutCancel(ctx)); err != nil {
			fmt.Fprintln(os.Stderr, "critest: stop containerd:", err)
		}
	}()
	images, err := cri.CritestImages(ctx, repo, env.Pause)
	if err != nil {
		return err
	}
	if err := reg.PushAll(ctx, images); err != nil {
		return err
	}
	fmt.Printf("critest %s: containerd with CRI at %s, registry %s, set up in %s\n",
		env.CRI.Critest, env.Endpoint(), reg.Addr, time.Since(start).Round(time.Second))

	var results []result
	for _, h := range handlers {
		r := result{handler: h, log: filepath.Join(abs(reportDir), h+".log"), report: filepath.Join(abs(reportDir), h+".json")}
		args := []string{
			"-runtime-endpoint", env.Endpoint(), "-image-endpoint", env.Endpoint(), "-config", env.CrictlConfig(),
			"-runtime-handler", h, "-ginkgo.no-color", "-ginkgo.json-report=" + r.report,
		}
		// Ginkgo refuses a -parallel flag it sees on the command line, even 1.
		if parallel > 1 {
			args = append(args, fmt.Sprintf("-parallel=%d", parallel))
		}
		for _, s := range skips {
			args = append(args, "-ginkgo.skip="+s)
		}
		if focus != "" {
			args = append(args, "-ginkgo.focus="+focus)
		}
		logf, err := os.Create(r.log)
		if err != nil {
			return err
		}
		fmt.Printf("critest -runtime-handler %s (log %s)...\n", h, r.log)
		t0 := time.Now()
		cmd := exec.CommandContext(ctx, env.CRI.Critest, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		// Ginkgo's parallel mode runs `ginkgo`; the tools directory is where it would be.
		cmd.Env = append(os.Environ(), "PATH="+abs(tools)+":"+os.Getenv("PATH"))
		runErr := cmd.Run()
		logf.Close()
		r.duration = time.Since(t0)
		if err := r.count(); err != nil {
			return fmt.Errorf("handler %s: critest %v and no report: %w (log %s)", h, runErr, err, r.log)
		}
		results = append(results, r)
		if ctx.Err() != nil {
			break
		}
	}
	fmt.Println()
	fmt.Printf("%-8s %7s %7s %8s %9s\n", "handler", "passed", "failed", "skipped", "time")
	for _, r := range results {
		fmt.Printf("%-8s %7d %7d %8d %9s\n", r.handler, r.passed, r.failed, r.skipped, r.duration.Round(time.Second))
	}
	for _, r := range results {
		if len(r.failures) > 0 {
			fmt.Printf("\n%s failures (details in %s):\n", r.handler, r.log)
			for _, f := range r.failures {
				fmt.Println("  " + f)
			}
		}
	}
	return nil
}

// count reads the Ginkgo JSON report.
func (r *result) count() error {
	b, err := os.ReadFile(r.report)
	if err != nil {
		return err
	}
	var reports []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
		}
	}
	if err := json.Unmarshal(b, &reports); err != nil {
		return fmt.Errorf("parse %s: %w", r.report, err)
	}
	for _, rep := range reports {
		for _, s := range rep.SpecReports {
			if s.LeafNodeType != "It" {
				continue
			}
			switch s.State {
			case "passed":
				r.passed++
			case "skipped", "pending":
				r.skipped++
			default:
				r.failed++
				r.failures = append(r.failures, strings.Join(append(s.ContainerHierarchyTexts, s.LeafNodeText), " ")+" ["+s.State+"]")
			}
		}
	}
	sort.Strings(r.failures)
	return nil
}

// readSkips reads the skip list: one regular expression a line, # comments and blank lines ignored.
func readSkips(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read skip list: %w", err)
	}
	defer f.Close()
	var skips []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l != "" && !strings.HasPrefix(l, "#") {
			skips = append(skips, l)
		}
	}
	return skips, sc.Err()
}
