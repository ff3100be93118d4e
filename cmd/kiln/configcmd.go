package main

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
)

func newConfig(g *globalFlags) *cobra.Command {
	cfgCmd := &cobra.Command{Use: "config", Short: "Inspect Kiln's configuration"}
	show := &cobra.Command{
		Use:   "show",
		Short: "Print the effective configuration and where each value came from; exit non-zero on an invalid file",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(g.configPath)
			if err != nil {
				return err
			}
			return printSettings(cmd.OutOrStdout(), cfg)
		},
	}
	cfgCmd.AddCommand(show)
	return cfgCmd
}

func printSettings(w io.Writer, cfg config.Config) error {
	settings, err := cfg.Settings()
	if err != nil {
		return err
	}
	src := cfg.Source
	if src == "" {
		src = "built-in defaults (no " + config.DefaultPath + ")"
	}
	fmt.Fprintf(w, "# configuration: %s\n", src)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, s := range settings {
		fmt.Fprintf(tw, "%s = %s\t# %s\n", s.Key, s.Value, s.Source)
	}
	return tw.Flush()
}
