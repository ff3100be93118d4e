package cri

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/containerd"
)

// Runtime handler names of a harness containerd.
const (
	HandlerRunc = "runc"
	HandlerKiln = "kiln"
)

// Options describe a harness containerd with CRI.
type Options struct {
	// RepoRoot is the Kiln source tree (for the tools module, the pause program and the shim).
	RepoRoot string
	// ToolsDir caches the pinned tools (containerd, ctr, runc, crictl, critest): _output/tools/bin.
	ToolsDir string
	// Handlers are the CRI runtime handlers to configure (HandlerRunc, HandlerKiln); the first is the default.
	Handlers []string
	// KilnAssets is the guest image directory (_output/share/kiln), needed with HandlerKiln.
	KilnAssets string
	// KilnConfigExtra is TOML appended to the Kiln configuration the harness writes.
	KilnConfigExtra string
	// Network chooses dual-stack and MTU for the pods' CNI network.
	Network NetworkOptions
	// RegistryConfigDir is a hosts.toml tree for CRI's pulls (see Registry.WriteMirrorConfig); empty: none.
	RegistryConfigDir string
	// Debug logs containerd and shims at debug level.
	Debug bool
	// Critest builds critest too (minutes, the first time).
	Critest bool
	// KilnConfigInEnv names the Kiln configuration in containerd's environment (config.PathEnv) instead of the
	// kiln handler's options: containerd's CRI cannot start the containers of a pod with a user namespace from a
	// runtime entry with options.
	KilnConfigInEnv bool
}

// Env is a running private containerd with CRI, its CNI network and crictl pointed at it.
type Env struct {
	// Dir holds the CNI configuration and IPAM state, pod logs, the Kiln configuration and Kiln's state.
	Dir    string
	Daemon *containerd.Daemon
	Net    *Network
	Tools  containerd.Tools
	CRI    containerd.CRITools
	// KilnConfig is the Kiln configuration the kiln handler reads (empty without HandlerKiln).
	KilnConfig string
	// LogDir is the parent of the pods' log directories.
	LogDir string
	// Pause is the pause image CRI's sandboxes run (imported as PauseRef).
	Pause *containerd.Image
}

// Start builds what is missing (tools, crictl and critest, the pause image, the Kiln shim when HandlerKiln is
// asked for), writes the CNI configuration, starts containerd with CRI, and imports the pause and busybox
// images into CRI's namespace. On error nothing is left running.
func Start(ctx context.Context, opts Options) (_ *Env, retErr error) {
	if len(opts.Handlers) == 0 {
		opts.Handlers = []string{HandlerRunc}
	}
	dir, err := os.MkdirTemp("", "kcri-")
	if err != nil {
		return nil, fmt.Errorf("create CRI harness dir: %w", err)
	}
	e := &Env{Dir: dir, LogDir: filepath.Join(dir, "logs")}
	defer func() {
		if retErr != nil {
			_ = e.Stop(context.WithoutCancel(ctx))
		}
	}()
	if e.Tools, err = containerd.EnsureTools(ctx, opts.RepoRoot, opts.ToolsDir); err != nil {
		return nil, err
	}
	if e.CRI, err = containerd.EnsureCRITools(ctx, opts.ToolsDir, opts.Critest); err != nil {
		return nil, err
	}
	if e.Pause, err = BuildPauseImage(ctx, opts.RepoRoot); err != nil {
		return nil, err
	}
	if e.Net, err = NewNetwork(filepath.Join(dir, "ipam"), opts.Network); err != nil {
		return nil, err
	}
	confDir := filepath.Join(dir, "net.d")
	if err := e.Net.WriteConf(confDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(e.LogDir, 0o755); err != nil {
		return nil, err
	}
	cri := &containerd.CRIConfig{
		SandboxImage:      PauseRef,
		CNIConfDir:        confDir,
		CNIBinDirs:        []string{CNIBinDir},
		RegistryConfigDir: opts.RegistryConfigDir,
	}
	var path, env []string
	for _, h := range opts.Handlers {
		switch h {
		case HandlerRunc:
			cri.Runtimes = append(cri.Runtimes, containerd.RuncCRIRuntime(h, e.Tools.Runc))
		case HandlerKiln:
			shimDir, err := containerd.BuildShim(ctx, opts.RepoRoot, filepath.Join(dir, "bin"))
			if err != nil {
				return nil, err
			}
			path = append(path, shimDir)
			e.KilnConfig = filepath.Join(dir, "kiln.toml")
			if err := containerd.WriteKilnConfig(e.KilnConfig, opts.KilnAssets, e.KilnStateDir(), opts.KilnConfigExtra); err != nil {
				return nil, err
			}
			if opts.KilnConfigInEnv {
				env = append(env, config.PathEnv+"="+e.KilnConfig)
				cri.Runtimes = append(cri.Runtimes, containerd.KilnCRIRuntime(h, ""))
			} else {
				cri.Runtimes = append(cri.Runtimes, containerd.KilnCRIRuntime(h, e.KilnConfig))
			}
		default:
			return nil, fmt.Errorf("unknown CRI runtime handler %q", h)
		}
	}
	e.Daemon, err = containerd.Start(ctx, containerd.Options{Tools: e.Tools, Path: path, Env: env, Debug: opts.Debug, CRI: cri})
	if err != nil {
		return nil, err
	}
	if err := e.Daemon.ImportImage(ctx, containerd.CRINamespace, e.Pause, PauseRef); err != nil {
		return nil, fmt.Errorf("import pause image: %w", err)
	}
	busybox, err := containerd.BusyboxLayer()
	if err != nil {
		return nil, err
	}
	bb, err := containerd.BuildImage(containerd.ImageConfig{Cmd: []string{"sh"}}, busybox)
	if err != nil {
		return nil, err
	}
	if err := e.Daemon.ImportImage(ctx, containerd.CRINamespace, bb, containerd.BusyboxRef); err != nil {
		return nil, fmt.Errorf("import busybox image: %w", err)
	}
	// crictl and critest read a configuration file whatever their flags say: give them one of their own.
	crictlYAML := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 120\n", e.Endpoint(), e.Endpoint())
	if err := os.WriteFile(e.CrictlConfig(), []byte(crictlYAML), 0o644); err != nil {
		return nil, fmt.Errorf("write crictl config: %w", err)
	}
	if err := e.waitReady(ctx); err != nil {
		return nil, err
	}
	return e, nil
}

// waitReady waits until CRI reports RuntimeReady and NetworkReady (CNI configuration loaded).
func (e *Env) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := e.Crictl(ctx, "info", "-o", "json")
		if err == nil {
			var info struct {
				Status struct {
					Conditions []struct {
						Type   string `json:"type"`
						Status bool   `json:"status"`
					} `json:"conditions"`
				} `json:"status"`
			}
			ready := 0
			if json.Unmarshal([]byte(out), &info) == nil {
				for _, c := range info.Status.Conditions {
					if (c.Type == "RuntimeReady" || c.Type == "NetworkReady") && c.Status {
						ready++
					}
				}
			}
			if ready == 2 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRI not ready after 30 s (%v):\n%s\n%s", err, out, e.Daemon.LogTail(30))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// KilnStateDir is the state directory of the Kiln configuration the harness writes.
func (e *Env) KilnStateDir() string { return filepath.Join(e.Dir, "kiln") }

// Endpoint is the CRI endpoint (crictl's and critest's --runtime-endpoint).
func (e *Env) Endpoint() string { return "unix://" + e.Daemon.Address }

// NetnsDir is where CRI keeps its pods' network namespace files (netns_mounts_under_state_dir).
func (e *Env) NetnsDir() string {
	return filepath.Join(e.Daemon.Dir, "state", "io.containerd.grpc.v1.cri", "netns")
}

// CrictlConfig is the crictl configuration file (runtime and image endpoints) crictl and critest read.
func (e *Env) CrictlConfig() string { return filepath.Join(e.Dir, "crictl.yaml") }

// CrictlCommand builds a crictl command against this containerd (no /etc/crictl.yaml is read).
func (e *Env) CrictlCommand(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"--config", e.CrictlConfig(), "--runtime-endpoint", e.Endpoint(),
		"--image-endpoint", e.Endpoint(), "--timeout", "2m"}, args...)
	cmd := exec.CommandContext(ctx, e.CRI.Crictl, full...)
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Crictl runs crictl and returns its standard output; the error carries its standard error.
func (e *Env) Crictl(ctx context.Context, args ...string) (string, error) {
	cmd := e.CrictlCommand(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// PodLogDir is the log directory the harness gives a pod named name.
func (e *Env) PodLogDir(name string) string { return filepath.Join(e.LogDir, name) }

// RunPod writes cfg and runs `crictl runp --runtime handler`; it returns the pod's id.
func (e *Env) RunPod(ctx context.Context, handler string, cfg *PodConfig) (string, error) {
	if cfg.LogDirectory != "" {
		if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
			return "", err
		}
	}
	path := filepath.Join(e.Dir, "pod-"+cfg.Metadata.Name+".json")
	if err := writeJSON(path, cfg); err != nil {
		return "", err
	}
	out, err := e.Crictl(ctx, "runp", "--runtime", handler, path)
	return strings.TrimSpace(out), err
}

// CreateContainer writes the container's and the pod's configurations and runs `crictl create`; it returns
// the container's id. The image must be in CRI's namespace already (nothing is pulled).
func (e *Env) CreateContainer(ctx context.Context, podID string, c *ContainerConfig, pod *PodConfig) (string, error) {
	cpath := filepath.Join(e.Dir, "ctr-"+pod.Metadata.Name+"-"+c.Metadata.Name+".json")
	ppath := filepath.Join(e.Dir, "pod-"+pod.Metadata.Name+".json")
	if err := writeJSON(cpath, c); err != nil {
		return "", err
	}
	if err := writeJSON(ppath, pod); err != nil {
		return "", err
	}
	out, err := e.Crictl(ctx, "create", "--no-pull", podID, cpath, ppath)
	return strings.TrimSpace(out), err
}

// Exec runs cmd in a container through CRI's streaming Exec (crictl exec, through containerd's stream
// server) and returns its stdout, stderr and exit code; err is set only when the exit code cannot be told.
// crictl loses the exit code (it exits 1), so it is read from crictl's own error line, which is removed
// from stderr.
func (e *Env) Exec(ctx context.Context, id string, cmd ...string) (string, string, int, error) {
	c := e.CrictlCommand(ctx, append([]string{"exec", id}, cmd...)...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	if err == nil {
		return stdout.String(), stderr.String(), 0, nil
	}
	errOut := stderr.String()
	if m := execExitRE.FindStringSubmatchIndex(errOut); m != nil {
		code, _ := strconv.Atoi(errOut[m[2]:m[3]])
		// crictl's log line starts at the line holding the match.
		lineStart := strings.LastIndex(errOut[:m[0]], "\n") + 1
		return stdout.String(), errOut[:lineStart], code, nil
	}
	return stdout.String(), errOut, -1, fmt.Errorf("crictl exec %s %v: %w: %s", id, cmd, err, strings.TrimSpace(errOut))
}

// execExitRE finds the exit code in crictl's error for a command that exited non-zero.
var execExitRE = regexp.MustCompile(`command terminated with exit code (\d+)`)

// PodIPs are the pod's addresses as CRI reports them (the primary first).
func (e *Env) PodIPs(ctx context.Context, podID string) ([]string, error) {
	out, err := e.Crictl(ctx, "inspectp", "-o", "json", podID)
	if err != nil {
		return nil, err
	}
	var st struct {
		Status struct {
			Network struct {
				IP            string `json:"ip"`
				AdditionalIps []struct {
					IP string `json:"ip"`
				} `json:"additionalIps"`
			} `json:"network"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("parse crictl inspectp %s: %w", podID, err)
	}
	if st.Status.Network.IP == "" {
		return nil, fmt.Errorf("pod %s has no IP", podID)
	}
	ips := []string{st.Status.Network.IP}
	for _, a := range st.Status.Network.AdditionalIps {
		ips = append(ips, a.IP)
	}
	return ips, nil
}

// RemovePod stops and removes a pod and its containers (stopp, then rmp).
func (e *Env) RemovePod(ctx context.Context, podID string) error {
	if _, err := e.Crictl(ctx, "stopp", podID); err != nil {
		return err
	}
	_, err := e.Crictl(ctx, "rmp", podID)
	return err
}

// Pods lists the ids of every pod CRI knows.
func (e *Env) Pods(ctx context.Context) ([]string, error) {
	out, err := e.Crictl(ctx, "pods", "--quiet")
	return strings.Fields(out), err
}

// Stop removes every pod left (reporting them), stops containerd (reporting leftover containers and shims),
// deletes the CNI bridge and removes the harness's directory.
func (e *Env) Stop(ctx context.Context) error {
	var errs []error
	if e.Daemon != nil {
		if pods, err := e.Pods(ctx); err == nil && len(pods) > 0 {
			errs = append(errs, fmt.Errorf("pods left behind: %v", pods))
			_, _ = e.Crictl(ctx, "rmp", "--force", "--all")
		}
		if err := e.Daemon.Stop(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if e.Net != nil {
		if err := e.Net.Remove(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(e.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
