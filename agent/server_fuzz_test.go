package agent

import (
	"context"
	"io"
	"testing"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// FuzzAgentRequests sends the Health and Agent services sequences of arbitrary requests, decoded as ttrpc
// decodes them. Each handler answers with a result or an error, never both and never a panic; Check answers
// SERVING until the first Shutdown and NOT_SERVING after; only the first Shutdown reaches the agent's owner,
// with its reason; GuestInfo reads the test's guest files and reports the agent's version.
func FuzzAgentRequests(f *testing.F) {
	enc := func(kind byte, m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil || len(b) > 255 {
			f.Fatalf("seed: %d bytes, %v", len(b), err)
		}
		return append([]byte{kind, byte(len(b))}, b...)
	}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	f.Add(cat(enc(0, &agentv1.CheckRequest{}), enc(1, &agentv1.GuestInfoRequest{}),
		enc(2, &agentv1.ShutdownRequest{Reason: "pod stopped"}), enc(0, &agentv1.CheckRequest{}),
		enc(2, &agentv1.ShutdownRequest{Reason: "again"})))
	f.Add([]byte{2, 3, 0x0a, 0x01, 0xff, 0, 2, 0x08, 0x01, 1, 1, 0x80})
	log := logrus.New()
	log.SetOutput(io.Discard)
	f.Fuzz(func(t *testing.T, data []byte) {
		var reasons []string
		srv, err := NewServer(logrus.NewEntry(log), ServerConfig{Version: "v-fuzz", Root: "testdata/guest",
			OnShutdown: func(reason string) { reasons = append(reasons, reason) }})
		if err != nil {
			t.Fatal(err)
		}
		health, api := healthService{srv}, agentService{srv}
		ctx := context.Background()
		var firstReason *string
		for len(data) >= 2 {
			kind, n := data[0]%3, min(int(data[1]), len(data)-2)
			msg := data[2 : 2+n]
			data = data[2+n:]
			switch kind {
			case 0:
				var req agentv1.CheckRequest
				if proto.Unmarshal(msg, &req) != nil {
					continue
				}
				resp, err := health.Check(ctx, &req)
				want := agentv1.CheckResponse_SERVING
				if firstReason != nil {
					want = agentv1.CheckResponse_NOT_SERVING
				}
				if err != nil || resp.GetStatus() != want || resp.GetAgentVersion() != "v-fuzz" {
					t.Fatalf("Check = %v, %v; want %v v-fuzz", resp, err, want)
				}
			case 1:
				var req agentv1.GuestInfoRequest
				if proto.Unmarshal(msg, &req) != nil {
					continue
				}
				info, err := api.GuestInfo(ctx, &req)
				if err != nil || info.GetAgentVersion() != "v-fuzz" || info.GetKernelRelease() == "" {
					t.Fatalf("GuestInfo = %v, %v", info, err)
				}
			case 2:
				var req agentv1.ShutdownRequest
				if proto.Unmarshal(msg, &req) != nil {
					continue
				}
				resp, err := api.Shutdown(ctx, &req)
				if err != nil || resp == nil {
					t.Fatalf("Shutdown = %v, %v", resp, err)
				}
				if firstReason == nil {
					r := req.GetReason()
					firstReason = &r
				}
			}
		}
		switch {
		case firstReason == nil && len(reasons) != 0:
			t.Fatalf("shutdown reached the owner %d times without a Shutdown request", len(reasons))
		case firstReason != nil && (len(reasons) != 1 || reasons[0] != *firstReason):
			t.Fatalf("owner saw shutdowns %q, want once with %q", reasons, *firstReason)
		}
	})
}
