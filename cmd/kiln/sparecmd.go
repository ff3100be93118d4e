package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/runtime/spare"
)

func newSpare() *cobra.Command {
	spareCmd := &cobra.Command{Use: "spare", Short: "Manage the spare shims that keep booted VMs ready for the next tasks"}
	var (
		exe     string
		purge   bool
		timeout time.Duration
	)
	stop := &cobra.Command{
		Use:   "stop",
		Short: "Stop the spare shims waiting in their slots (each stops its VM); a spare that took a task is that task's shim and is left",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if timeout <= 0 {
				return fmt.Errorf("--timeout %s: want a positive duration, the time spares get to stop their VMs", timeout)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			return stopSpares(ctx, cmd.OutOrStdout(), exe, purge)
		},
	}
	stop.Flags().StringVar(&exe, "exe", "", "stop only the spares run from the shim binary at `path` (make uninstall names the one it removes)")
	stop.Flags().BoolVar(&purge, "purge", false, "then remove "+spare.Dir+" (failed spares' logs, the boot turns' queue) when no spare is left in it")
	stop.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long spares get to stop before they are killed")
	spareCmd.AddCommand(stop)
	return spareCmd
}

// stopSpares stops the spares run from exe (every spare when exe is ""), says which, and with purge removes the
// spares' directory when none is left.
func stopSpares(ctx context.Context, w io.Writer, exe string, purge bool) error {
	var which func(spare.Info) bool
	if exe != "" {
		abs, err := filepath.Abs(exe)
		if err != nil {
			return fmt.Errorf("--exe %s: %w", exe, err)
		}
		// A spare's executable is the resolved path its spawner ran (os.Executable).
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			abs = real
		}
		which = func(sp spare.Info) bool { return runsFrom(sp.Pid, abs) }
	}
	stopped, err := spare.Stop(ctx, which)
	for _, sp := range stopped {
		fmt.Fprintf(w, "stopped spare shim %d (containerd %s)\n", sp.Pid, sp.Address)
	}
	if err != nil {
		return err
	}
	if purge {
		if err := spare.Purge(); err != nil {
			// Another installation's spares (or a test's) keep the directory: not this command's failure.
			fmt.Fprintln(w, err)
		}
	}
	return nil
}

// runsFrom says whether process pid runs the binary at path, also when the file was replaced or removed since
// it started (a reinstall). A process on its way out has lost its executable (the kernel drops it with the
// memory, before the files) and may still hold a slot: it counts, so that spare.Stop waits for that slot, which
// it never signals.
func runsFrom(pid int, path string) bool {
	dir := "/proc/" + strconv.Itoa(pid)
	exe, err := os.Readlink(dir + "/exe")
	if err != nil {
		_, err := os.Stat(dir)
		return err == nil
	}
	return strings.TrimSuffix(exe, " (deleted)") == path
}
