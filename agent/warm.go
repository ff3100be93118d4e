package agent

import (
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// warmForClones runs in a template guest before its save. It builds what libraries build at first use and then
// keep: protobuf's tables of every message (warmProtobuf), and those of the program's own libraries (extra,
// Config.Warm). A clone inherits them with the template's memory. Built in each clone instead, on its first
// pod's start path, that is reflection code translated and run anew in every clone under TCG: `kiln run` of
// `busybox true` from a template took 60-90 ms longer (medians of interleaved runs, docs/fast-start-log.md, session
// 13). Each template, and each clone's copy of it, holds about 0.9 MB more.
func warmForClones(log *logrus.Entry, extra func() error) {
	start := time.Now()
	n := warmProtobuf(protoregistry.GlobalTypes)
	if extra != nil {
		if err := extra(); err != nil {
			// Not a fault: the clones build what is missing themselves, as a cold guest does.
			log.WithError(err).Warn("warming libraries for the template's clones")
		}
	}
	log.WithFields(logrus.Fields{"messages": n, "took": time.Since(start)}).Debug("libraries warmed for the template's clones")
}

// warmProtobuf builds the marshal and unmarshal tables of every message type in types, which protobuf otherwise
// builds at a type's first use. In the agent's binary those are the agent API's requests and replies, ttrpc's
// envelope and an error's status. It returns how many types it warmed.
func warmProtobuf(types *protoregistry.Types) int {
	n := 0
	types.RangeMessages(func(mt protoreflect.MessageType) bool {
		m := mt.New().Interface()
		if b, err := proto.Marshal(m); err == nil {
			_ = proto.Unmarshal(b, m)
		}
		n++
		return true
	})
	return n
}
