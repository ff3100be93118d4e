package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/task"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// runSpare is the shim binary's life as a spare (runtime/spare): it takes the slot its spawner claimed for it,
// waits for the shim that started it to be done starting, boots and warms a pod, and waits for a task. It returns
// the pod once `start` has handed it a task, with the process set up as that task's shim server (its command
// line, environment, directory and socket); the caller then runs the shim as any server. A spare that has no task
// after config.SpareIdle, is told to stop (SIGTERM), or fails, stops its VM and exits.
func runSpare(args []string) (*task.Spare, error) {
	fs := flag.NewFlagSet(spare.SpareArg, flag.ContinueOnError)
	address := fs.String("address", "", "containerd's address")
	slotIndex := fs.Int(spare.SlotFlag, 0, "the spare's slot in its containerd's pool")
	configPath := fs.String("config", "", "Kiln configuration")
	shape := fs.String(task.SpareShapeFlag, "", "the VM's shape (JSON), that of its spawner's task")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if *address == "" {
		return nil, errors.New("-address is required")
	}
	log := logrus.WithFields(logrus.Fields{"spare": *address, "slot": *slotIndex})
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer stop()
	slot, err := spare.Claimed(*address, *slotIndex)
	if err != nil {
		return nil, err
	}
	// Told to stop before a task came is no failure: such a spare leaves as an idle one does, removing its slot's
	// files. A spare that failed keeps its log.
	leave := func(err error) error {
		if ctx.Err() == nil {
			return err
		}
		log.WithError(err).Info("spare shim stopped before it was ready")
		slot.Close()
		os.Exit(0)
		return nil
	}
	if err := spare.WaitGate(ctx); err != nil {
		return nil, leave(err)
	}
	// The spare is the leader of a process group of its own (spare.Spawn's session): every thread of it, and
	// whatever it starts, gets the priority.
	if err := unix.Setpriority(unix.PRIO_PGRP, 0, task.SpareNice); err != nil {
		log.WithError(err).Warn("spare shim runs at the usual priority")
	}
	if err := pod.ForSpare(); err != nil {
		log.WithError(err).Warn("spare shim keeps its standing with the host's OOM killer")
	}
	// A task's `start` that finds no spare ready holds this one while it boots (spare.Hold): its VM's programs
	// stand still until that task has started. Without the holder the spare just boots.
	var hold func(qemu.Holdable)
	holder, err := slot.Holder(log)
	if err != nil {
		log.WithError(err).Warn("tasks starting beside the spare cannot hold it")
	} else {
		hold = holder.Add
	}
	start := time.Now()
	// A host boots its spares in turns (spare.WaitTurn): the first of a burst's refills is ready after one boot.
	turn := func(ctx context.Context, vcpus int) (func(), error) {
		t, err := spare.WaitTurn(ctx, vcpus)
		if err != nil {
			return nil, err
		}
		return t.Release, nil
	}
	sp, err := task.BootSpare(ctx, task.SpareBoot{ConfigPath: *configPath, Shape: *shape, Version: version, Log: log, Hold: hold, Turn: turn})
	var stoodStill time.Duration
	if holder != nil {
		holder.Close()
		stoodStill = holder.StoodStill()
	}
	if err != nil {
		return nil, leave(err)
	}
	log.WithFields(logrus.Fields{"took": time.Since(start), "held": stoodStill.Round(time.Millisecond)}).Info("spare shim ready")
	fits := func(req spare.Request) error {
		err := sp.Fits(req)
		if err != nil {
			log.WithError(err).WithField("task", req.Task.ID).Info("declined a task the spare's VM does not fit")
		}
		return err
	}
	req, socket, err := slot.Wait(ctx, config.SpareIdle, os.Getpid(), spare.Build(version), sp.Lost(), fits)
	if err != nil {
		lost := errors.Is(err, spare.ErrLost)
		if lost {
			log.WithError(err).Error("the spare shim's VM ended; leaving")
		} else {
			log.WithError(err).Info("spare shim leaving")
		}
		if cerr := sp.Close(context.WithoutCancel(ctx)); cerr != nil {
			log.WithError(cerr).Warn("stop the spare's VM")
		}
		if lost {
			os.Exit(1)
		}
		os.Exit(0)
	}
	if err := become(req, socket); err != nil {
		_ = sp.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	return sp, nil
}

// become makes this process the shim server `start` would have started for req.
func become(req spare.Request, socket *os.File) error {
	if err := spare.Take(socket); err != nil {
		return err
	}
	if err := os.Chdir(req.Dir); err != nil {
		return fmt.Errorf("spare shim: %w", err)
	}
	os.Clearenv()
	for _, kv := range req.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			_ = os.Setenv(k, v)
		}
	}
	os.Args = req.Args
	return nil
}
