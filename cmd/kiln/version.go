package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/image"
)

func newVersion(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Kiln's version, the agent version in the guest image and the guest kernel release",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "kiln:          %s\n", version)
			agent, kernel, where := "unknown", "unknown", ""
			if cfg, err := config.Load(g.configPath); err == nil {
				if assets, err := cfg.ResolveAssets(); err == nil {
					dir := filepath.Dir(assets.Initrd)
					agent = readLine(filepath.Join(dir, image.AgentVersionName), agent)
					kernel = readLine(filepath.Join(dir, image.KernelReleaseName), kernel)
					where = " (" + dir + ")"
				}
			}
			fmt.Fprintf(w, "guest agent:   %s%s\n", agent, where)
			fmt.Fprintf(w, "guest kernel:  %s\n", kernel)
			if agent != "unknown" && agent != version {
				fmt.Fprintf(w, "warning: the guest image is from Kiln %s, not %s: run `make image` or reinstall\n", agent, version)
			}
			return nil
		},
	}
}

func readLine(path, fallback string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fallback
	}
	return strings.TrimSpace(string(b))
}
