package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

func newVM(g *globalFlags) *cobra.Command {
	vmCmd := &cobra.Command{Use: "vm", Short: "Work with Kiln microVMs directly"}
	var asJSON bool
	boot := &cobra.Command{
		Use:   "boot",
		Short: "Boot a guest with the configured assets, print GuestInfo and the boot time, then stop it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			res, err := bootOnce(cmd.Context(), g.configPath)
			if err != nil {
				return err
			}
			return printBoot(cmd.OutOrStdout(), res, asJSON)
		},
	}
	boot.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	vmCmd.AddCommand(boot)
	return vmCmd
}

// bootResult is what `kiln vm boot` reports.
type bootResult struct {
	KernelRelease    string  `json:"kernel_release"`
	KernelVersion    string  `json:"kernel_version"`
	BootID           string  `json:"boot_id"`
	MemoryTotalBytes uint64  `json:"memory_total_bytes"`
	VCPUs            uint32  `json:"vcpus"`
	AgentVersion     string  `json:"agent_version"`
	UptimeSeconds    float64 `json:"uptime_seconds"`
	// PivotRoot: containers are entered with pivot_root (the agent left the initramfs), not MS_MOVE and chroot.
	PivotRoot bool `json:"pivot_root"`
	// RandomReady: the guest kernel's random number generator was initialised when the agent answered (the host
	// seeds it as the VM starts), so getrandom(2) does not block in a container.
	RandomReady bool `json:"random_ready"`
	// GuestClockOffsetMS is the guest's wall clock less the host's when the agent's answer arrived (the host sets
	// the guest's clock as the VM starts): within the answer's round trip of 0.
	GuestClockOffsetMS float64 `json:"guest_clock_offset_ms"`
	Accelerator        string  `json:"accelerator"`
	// BootToAgentReadyMS is from QEMU's start to the agent's first successful health check.
	BootToAgentReadyMS float64 `json:"boot_to_agent_ready_ms"`
	StopMS             float64 `json:"stop_ms"`
	// TranslatedBlocks and TranslatedCodeBytes are what QEMU translated of the guest's code to boot it, under
	// TCG only (qemu.Translation).
	TranslatedBlocks    int   `json:"translated_blocks,omitempty"`
	TranslatedCodeBytes int64 `json:"translated_code_bytes,omitempty"`
}

func bootOnce(ctx context.Context, configPath string) (bootResult, error) {
	cfg, err := config.Load(configPath)
	if err != nil {
		return bootResult{}, err
	}
	log := logrus.WithField("cmd", "vm boot")
	if _, err := qemu.Sweep(cfg.Runtime.StateDir); err != nil {
		log.WithError(err).Warn("sweep stale VM state")
	}
	id := "boot-" + randomID()
	qcfg, err := qemu.ConfigFrom(cfg, id, log)
	if err != nil {
		return bootResult{}, err
	}
	m, err := qemu.New(qcfg)
	if err != nil {
		return bootResult{}, err
	}
	start := time.Now()
	sb, err := sandbox.Start(ctx, m, sandbox.OptionsFrom(cfg, version, log))
	if err != nil {
		return bootResult{}, err
	}
	ready := time.Since(start)
	info, infoErr := sb.GuestInfo(ctx)
	answered := time.Now()
	tr, trErr := m.Translation(ctx)
	stopStart := time.Now()
	stopErr := sb.Stop(context.WithoutCancel(ctx))
	if infoErr != nil {
		return bootResult{}, infoErr
	}
	if stopErr != nil {
		return bootResult{}, stopErr
	}
	res := resultFrom(info, answered, string(qcfg.Accel), ready, time.Since(stopStart))
	switch {
	case trErr == nil:
		res.TranslatedBlocks, res.TranslatedCodeBytes = tr.Blocks, tr.CodeBytes
	case !errors.Is(trErr, qemu.ErrNoTranslation):
		log.WithError(trErr).Warn("no translation statistics")
	}
	return res, nil
}

func resultFrom(info *agentv1.GuestInfo, answered time.Time, accelerator string, ready, stop time.Duration) bootResult {
	offset := time.Duration(info.GetWallClockUnixNano() - answered.UnixNano())
	return bootResult{
		KernelRelease:      info.GetKernelRelease(),
		KernelVersion:      info.GetKernelVersion(),
		BootID:             info.GetBootId(),
		MemoryTotalBytes:   info.GetMemoryTotalBytes(),
		VCPUs:              info.GetVcpus(),
		AgentVersion:       info.GetAgentVersion(),
		UptimeSeconds:      info.GetUptime().AsDuration().Seconds(),
		PivotRoot:          info.GetPivotRoot(),
		RandomReady:        info.GetRandomReady(),
		GuestClockOffsetMS: float64(offset.Microseconds()) / 1000,
		Accelerator:        accelerator,
		BootToAgentReadyMS: float64(ready.Microseconds()) / 1000,
		StopMS:             float64(stop.Microseconds()) / 1000,
	}
}

func printBoot(w io.Writer, r bootResult, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintf(w, "kernel release:      %s\n", r.KernelRelease)
	fmt.Fprintf(w, "kernel version:      %s\n", r.KernelVersion)
	fmt.Fprintf(w, "boot id:             %s\n", r.BootID)
	fmt.Fprintf(w, "memory:              %d MiB\n", r.MemoryTotalBytes>>20)
	fmt.Fprintf(w, "vcpus:               %d\n", r.VCPUs)
	fmt.Fprintf(w, "agent version:       %s\n", r.AgentVersion)
	fmt.Fprintf(w, "guest uptime:        %.3f s\n", r.UptimeSeconds)
	enter := "pivot_root"
	if !r.PivotRoot {
		enter = "MS_MOVE and chroot (the guest's root is the initial ramfs)"
	}
	fmt.Fprintf(w, "containers entered:  %s\n", enter)
	fmt.Fprintf(w, "random ready:        %t\n", r.RandomReady)
	fmt.Fprintf(w, "guest clock offset:  %.1f ms\n", r.GuestClockOffsetMS)
	fmt.Fprintf(w, "accelerator:         %s\n", r.Accelerator)
	fmt.Fprintf(w, "boot to agent ready: %.1f ms\n", r.BootToAgentReadyMS)
	fmt.Fprintf(w, "stop:                %.1f ms\n", r.StopMS)
	if r.TranslatedBlocks > 0 {
		fmt.Fprintf(w, "guest code translated: %d blocks, %.1f MB\n", r.TranslatedBlocks, float64(r.TranslatedCodeBytes)/1e6)
	}
	return nil
}

func randomID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
