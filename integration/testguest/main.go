// Command testguest is the guest of the vsock data path integration tests:
// the Kiln agent plus a few plain vsock services whose behaviour a host-side
// test can check byte for byte. It must not know how the host reaches it.
//
//	5001 echo       everything back; half-closes on EOF
//	5002 sink       reads to EOF, answers "<sha256 hex> <byte count>\n"
//	5003 source     reads "<n> <seed>\n", sends n bytes of stream.New(seed)
//	5004 dial-back  reads "<port>\n", dials host port, relays one line
//	5005 slow sink  like sink, pausing 5 ms after each 64 KiB
//	5006 small-buffer source  like source, from a socket with a 64 KiB buffer
package main

import (
	"context"
	"fmt"
	"net"

	"github.com/mdlayher/vsock"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/agent"
)

// version is set at build time: -ldflags '-X main.version=...'.
var version = "dev"

// Ports of the test services.
const (
	EchoPort     = 5001
	SinkPort     = 5002
	SourcePort   = 5003
	DialBackPort = 5004
	SlowSinkPort = 5005
	// SmallBufferSourcePort's socket has a buffer smaller than the host's: Linux caps what it sends unacknowledged
	// at its own buffer, so the host must advertise its consumption within that smaller window.
	SmallBufferSourcePort = 5006
)

func main() {
	agent.Run(context.Background(), agent.Config{
		Version:  version + "+testguest",
		Services: startServices,
	})
}

func startServices(ctx context.Context, log *logrus.Entry) error {
	handlers := map[uint32]handler{
		EchoPort:              echo,
		SinkPort:              sink,
		SourcePort:            source,
		DialBackPort:          dialBack(dialHost),
		SlowSinkPort:          slowSink,
		SmallBufferSourcePort: smallBufferSource,
	}
	for port, h := range handlers {
		l, err := agent.ListenVsock(log, port, 0)
		if err != nil {
			return err
		}
		go serve(ctx, log.WithField("port", port), l, h)
	}
	log.Info("test services listening on vsock ports 5001-5006")
	return nil
}

// handler runs one connection; serve closes the connection afterwards.
type handler func(c net.Conn) error

func serve(ctx context.Context, log *logrus.Entry, l net.Listener, h handler) {
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.WithError(err).Error("accept failed; service stopped")
			}
			return
		}
		go func() {
			defer c.Close()
			if err := h(c); err != nil {
				log.WithError(fmt.Errorf("serve %s: %w", c.RemoteAddr(), err)).Warn("connection failed")
			}
		}()
	}
}

// dialHost opens a vsock connection to port on the host.
func dialHost(port uint32) (net.Conn, error) {
	c, err := vsock.Dial(agent.HostCID, port, nil)
	if err != nil {
		return nil, fmt.Errorf("dial host vsock port %d: %w", port, err)
	}
	return c, nil
}
