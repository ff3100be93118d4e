package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/lograte"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// Queue indexes as the frontend numbers them; the event queue (2) stays in QEMU.
const (
	rxQueue = 0
	txQueue = 1
)

// notifyBatch bounds how many chains are consumed before the driver is notified, so a busy queue does not
// starve the guest of interrupts.
const notifyBatch = 64

// The driver is told of used tx chains in batches of txNotifyBatch, and of a smaller remainder after
// txNotifyDelay. Linux's driver only frees sent packets when told; nothing waits for that but a full tx ring,
// which txNotifyBatch chains are far from (QEMU's vhost-user-vsock queues have 128 entries). Telling it of every
// packet cost the guest an interrupt and a pass through its tx-done work per 64 KiB sent, and under TCG the
// guest's one vCPU is what bounds a container's stdout.
const (
	txNotifyBatch = 16
	txNotifyDelay = time.Millisecond
)

// Warnings about the guest's rings (malformed or too small chains) are logged at most ringWarnBurst per
// ringWarnInterval; the rest are counted (Metrics) and summed up in one line. A guest can produce them as fast
// as it can write its rings, so one line each would let it flood the host's logs.
const (
	ringWarnBurst    = 10
	ringWarnInterval = time.Minute
)

// Config configures a Device.
type Config struct {
	GuestCID uint64 // >= 3
	// UDSPath is the hybrid-vsock Unix socket the device listens on: a host client connects, writes
	// "CONNECT <port>\n", gets "OK <hostport>\n", then the stream is the guest port. A guest connection to
	// host port P is forwarded to the Unix socket "<UDSPath>_<P>" (RST if nothing listens there).
	UDSPath string
}

// Device is a vhost-user vsock device backend; implements vhostuser.Device.
// Connections live in the device, not in the queues: they survive Stop and Start (the frontend stops the
// rings when the VM pauses) and end only on RST, shutdown, timeout or Close.
type Device struct {
	cid      uint64
	log      *logrus.Entry
	mux      *muxer
	ringWarn *lograte.Limiter

	mu  sync.Mutex // serialises Start, Stop and Close
	run *run       // non-nil while started
}

// run is one Start..Stop period.
type run struct {
	stop chan struct{}
	wg   sync.WaitGroup
}

// vq is the part of *virtqueue.Queue the device uses; tests drive the loops with fakes.
type vq interface {
	Pop() (*virtqueue.Chain, error)
	Push(head uint16, written uint32) error
	Notify() error
	Kicks() <-chan struct{}
}

// New creates the device and listens on cfg.UDSPath for host clients.
func New(cfg Config, log *logrus.Entry) (*Device, error) {
	return newDevice(defaultMuxerConfig(cfg.GuestCID, cfg.UDSPath), log)
}

func newDevice(mc muxerConfig, log *logrus.Entry) (*Device, error) {
	if mc.guestCID < 3 || mc.guestCID > 0xffffffff-1 {
		return nil, fmt.Errorf("create vsock device: guest CID %d is reserved or out of range", mc.guestCID)
	}
	if mc.udsPath == "" {
		return nil, errors.New("create vsock device: no hybrid socket path")
	}
	log = log.WithField("guest_cid", mc.guestCID)
	m, err := newMuxer(mc, log)
	if err != nil {
		return nil, fmt.Errorf("create vsock device for guest CID %d: %w", mc.guestCID, err)
	}
	return &Device{cid: mc.guestCID, log: log, mux: m, ringWarn: lograte.New(ringWarnBurst, ringWarnInterval)}, nil
}

// NumQueues is 2: rx and tx. The event queue is served by QEMU itself.
func (d *Device) NumQueues() int { return 2 }

// Features offers no device-specific bit. Stream sockets are implied when VIRTIO_VSOCK_F_NO_IMPLIED_STREAM is
// not negotiated, and Linux 6.1 knows only VIRTIO_VSOCK_F_SEQPACKET (bit 1), which this device does not serve.
func (d *Device) Features() uint64 { return 0 }

// Config is struct virtio_vsock_config: the guest CID as le64.
func (d *Device) Config() []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, d.cid)
	return b
}

// Start serves the rx and tx queues until Stop.
func (d *Device) Start(queues []*virtqueue.Queue) error {
	if len(queues) != 2 || queues[rxQueue] == nil || queues[txQueue] == nil {
		return fmt.Errorf("start vsock device: want rx and tx queues, got %d", len(queues))
	}
	return d.start(queues[rxQueue], queues[txQueue])
}

func (d *Device) start(rx, tx vq) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.run != nil {
		return errors.New("start vsock device: already started")
	}
	r := &run{stop: make(chan struct{})}
	r.wg.Go(func() { d.txLoop(r.stop, tx) })
	r.wg.Go(func() { d.rxLoop(r.stop, rx) })
	d.run = r
	return nil
}

// Stop stops both queue goroutines and returns once they no longer touch the queues or guest memory.
// A packet is either wholly handled or left on its ring, so connection state stays consistent.
func (d *Device) Stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.run == nil {
		return
	}
	close(d.run.stop)
	d.run.wg.Wait()
	d.run = nil
	if n := d.ringWarn.Flush(); n > 0 {
		d.log.WithField("suppressed", n).Warn("more warnings about the guest's vsock rings were not logged")
	}
}

// Metrics returns the device's counters: what it dropped, refused or cut short because of the guest.
func (d *Device) Metrics() Metrics { return d.mux.stats.snapshot() }

// Traffic returns how many packets went each way since the device was created.
func (d *Device) Traffic() Traffic { return d.mux.stats.traffic() }

// warnRing logs a warning about the guest's rings, within the rate limit.
func (d *Device) warnRing(err error, format string, args ...any) {
	ok, summary := d.ringWarn.Allow()
	if summary > 0 {
		d.log.WithField("suppressed", summary).Warn("more warnings about the guest's vsock rings were not logged")
	}
	if !ok {
		d.mux.stats.warningsSuppressed.Add(1)
		return
	}
	d.log.WithError(err).Warnf(format, args...)
}

// Close stops the device, closes the hybrid socket, resets every connection and removes UDSPath.
func (d *Device) Close() error {
	d.Stop()
	return d.mux.close()
}

// txLoop hands the guest's packets to the muxer, and tells the driver of used chains in batches.
func (d *Device) txLoop(stop <-chan struct{}, q vq) {
	kicks := q.Kicks()
	untold := 0 // used chains the driver has not been notified of
	late := time.NewTimer(txNotifyDelay)
	late.Stop()
	armed := false
	tell := func() {
		d.notify(q, "tx")
		untold = 0
		if armed {
			late.Stop()
			armed = false
		}
	}
	for {
		select {
		case <-stop:
			tell()
			return
		case <-late.C:
			armed = false
			tell()
			continue
		case _, ok := <-kicks:
			if !ok {
				tell()
				return
			}
		}
		for {
			select {
			case <-stop:
				tell()
				return
			default:
			}
			ch, err := q.Pop()
			if err != nil {
				if !d.giveBack(q, err, "tx") {
					return
				}
				untold++
				continue
			}
			if ch == nil {
				break
			}
			d.mux.handleTx(ch.Readable)
			d.mux.stats.fromGuest.Add(1)
			if err := q.Push(ch.Head, 0); err != nil {
				d.log.WithError(err).Error("push used tx chain")
				return
			}
			if untold++; untold >= txNotifyBatch {
				tell()
			}
		}
		if untold > 0 && !armed {
			late.Reset(txNotifyDelay)
			armed = true
		}
	}
}

// rxLoop moves guest-bound packets into the guest's rx buffers. A chain is popped only when a packet may be
// waiting; if none was after all, the chain is held for the next packet rather than returned empty.
func (d *Device) rxLoop(stop <-chan struct{}, q vq) {
	var held *virtqueue.Chain
	defer func() {
		// The driver gave us this buffer; an empty used element returns it (Linux drops and refills it).
		if held != nil {
			if err := q.Push(held.Head, 0); err != nil {
				d.log.WithError(err).Error("return held rx chain")
			}
			d.notify(q, "rx")
		}
	}()
	kicks := q.Kicks()
	for {
		pushed := 0
		for d.mux.hasRx() {
			// A guest that keeps posting chains (malformed ones consume no packet) must not keep Stop waiting.
			select {
			case <-stop:
				if pushed > 0 {
					d.notify(q, "rx")
				}
				return
			default:
			}
			if pushed == notifyBatch {
				d.notify(q, "rx")
				pushed = 0
			}
			if held == nil {
				ch, err := q.Pop()
				if err != nil {
					if !d.giveBack(q, err, "rx") {
						return
					}
					continue
				}
				if ch == nil {
					break // wait for the driver to add buffers
				}
				held = ch
			}
			n, err := d.mux.fillRx(held.Writable)
			if err != nil {
				// Given back empty: Linux drops it and posts a new buffer.
				d.mux.stats.smallRxChains.Add(1)
				d.warnRing(err, "rx chain %d", held.Head)
			} else if n == 0 {
				break // nothing was deliverable after all: keep the chain
			}
			if err := q.Push(held.Head, n); err != nil {
				d.log.WithError(err).Error("push used rx chain")
				held = nil
				return
			}
			held = nil
			pushed++
			if n > 0 {
				d.mux.stats.toGuest.Add(1)
			}
		}
		if pushed > 0 {
			d.notify(q, "rx")
		}
		select {
		case <-stop:
			return
		case _, ok := <-kicks:
			if !ok {
				return
			}
		case <-d.mux.readyChan():
		}
	}
}

// giveBack returns a malformed chain to the driver; false means the queue is unusable.
func (d *Device) giveBack(q vq, err error, name string) bool {
	var ce *virtqueue.ChainError
	if !errors.As(err, &ce) {
		d.log.WithError(err).Errorf("pop %s chain", name)
		return false
	}
	if name == "tx" {
		d.mux.stats.malformedTxChains.Add(1)
	} else {
		d.mux.stats.malformedRxChains.Add(1)
	}
	d.warnRing(err, "malformed %s chain", name)
	// A head out of the ring's range cannot be given back; the guest chose it, so its refusal is rate-limited
	// like the chain's.
	if perr := q.Push(ce.Head, 0); perr != nil {
		d.warnRing(perr, "return malformed %s chain", name)
	}
	return true
}

func (d *Device) notify(q vq, name string) {
	if err := q.Notify(); err != nil {
		d.log.WithError(err).Warnf("notify %s queue", name)
	}
}
