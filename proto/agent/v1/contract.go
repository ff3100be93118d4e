package agentv1

// What host and guest must agree on beyond the messages: where the agent listens and where the host's shared
// directory appears in the guest. Both sides take these values from here, so they cannot drift apart.
const (
	// APIPort is the vsock port the agent serves this API on (ttrpc).
	APIPort = 1024
	// StdioPort is the vsock port for process stdio streams (see container.proto's header).
	StdioPort = 1025
	// PortForwardPort is the vsock port for port-forward connections: one connection per forwarded stream, opened
	// by the host, introduced by a request line (see portforward.go).
	PortForwardPort = 1026
	// ReadyPort is the host port a booting guest's agent connects to once its API listens, and closes at once:
	// the host, listening there while the guest boots, dials the API then instead of polling a guest whose every
	// refused attempt interrupts its boot. Template guests do not connect (their clones' agents already listen).
	ReadyPort = 1027
	// SharedFSTag is the virtio-fs tag of the host's per-VM shared directory.
	SharedFSTag = "kiln-shared"
	// GuestSharedDir is where the agent mounts the shared directory in the guest; container root filesystems and
	// bind-mount sources are below it.
	GuestSharedDir = "/run/kiln/shared"
	// GuestPodShm is a tmpfs the agent mounts for the pod's shared memory: the host points a container's /dev/shm
	// bind mount (CRI's pod shm) at it, so the pod's containers share one /dev/shm in guest memory.
	GuestPodShm = "/run/kiln/shm"
	// CmdlineTemplate, on the guest kernel's command line, says the guest boots to be saved as a template and
	// restored many times: it has no vsock or virtio-fs device yet (both are hot-plugged into each restored copy),
	// so the agent does not mount the shared directory at boot but once SeedGuest tells it it was restored.
	CmdlineTemplate = "kiln.template"
	// TemplateReadyLine is the console line a template guest's agent writes once its setup is done and it is
	// idle: from then on the host may save it.
	TemplateReadyLine = "kiln-agent: template ready"
	// CmdlineAgentImage, on a template guest's command line, says a virtio-pmem device holds a read-only ext2
	// image with the agent's binary at AgentImageBinary: the agent mounts it with DAX at GuestAgentImageDir and
	// runs from it, so that the template's clones map the binary from the host's page cache, one copy for all of
	// them, instead of each holding the initramfs's copy in its RAM.
	CmdlineAgentImage = "kiln.agent_image"
	// AgentImageBinary is the agent's binary in the agent image, from its root.
	AgentImageBinary = "kiln-agent"
	// GuestAgentImageDir is where the agent mounts the agent image in the guest.
	GuestAgentImageDir = "/run/kiln/agent"
	// WarmExitEnv, set to "1" in a process's environment, makes the agent's binary exit at once, after the Go
	// runtime's start and its package initialisers. A spare's warm-up container runs it (as /proc/self/exe, which
	// in a container's init is the agent's binary), so that its QEMU translates the container path before a
	// task's container needs it.
	WarmExitEnv = "KILN_AGENT_WARM_EXIT"
)
