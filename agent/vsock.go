package agent

import (
	"fmt"
	"net"

	"github.com/mdlayher/vsock"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Well-known vsock addresses as the guest sees them.
const (
	// APIPort is the vsock port the agent API is served on.
	APIPort = agentv1.APIPort
	// HostCID is the host's context id, the one a guest dials.
	HostCID = vsock.Host
)

// AnnounceReady tells the host that the agent API listens: it connects to the host's agentv1.ReadyPort and
// hangs up. A host that does not listen there polls instead, so a failure is only logged.
func AnnounceReady(log *logrus.Entry) {
	c, err := vsock.Dial(HostCID, agentv1.ReadyPort, nil)
	if err != nil {
		log.WithError(err).Debug("announce the agent API to the host")
		return
	}
	_ = c.Close()
}

// ListenVsock listens for vsock connections on port, on whatever context id
// the guest was given.
func ListenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	return l, nil
}
