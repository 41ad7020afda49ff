package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// bootTarget is the time from the kernel's "Run /init" to the real init,
// with network unlock of data and swap, under TCG.
const bootTarget = 2500 * time.Millisecond

// benchBoot boots the walking-skeleton VM several times and measures the
// time in the initramfs from the kernel's own clock: the "Run /init"
// record in the kernel log to the moment the real root's init starts.
func benchBoot(ctx context.Context, r *report) error {
	runs := 5
	if r.quick {
		runs = 2
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-boot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	host := "bench-host"
	e, err := harness.Enroll(ctx, dir, host)
	if err != nil {
		return err
	}
	token, key := e.Token, e.Key
	srv, err := e.Serve(ctx, nil)
	if err != nil {
		return err
	}
	defer srv.Stop()
	img, err := harness.BuildImage(ctx, e.Bins, harness.ImageConfig{
		URLs: []string{srv.GuestURL()}, Pins: []string{srv.Pin}, Host: "cmdline",
	}, dir)
	if err != nil {
		return err
	}
	st, err := os.Stat(img)
	if err != nil {
		return err
	}
	r.printf("image: %.2f MB (default compression), default modules %v", float64(st.Size())/1e6, harness.DefaultModules)

	var inInitramfs, toInit []time.Duration
	stages := map[string][]time.Duration{}
	stageRE := regexp.MustCompile(`^unlockrd: ([a-z ]+): .* \(([0-9.]+)s\)$`)
	for i := 0; i < runs; i++ {
		// A fresh disk each time: the first boot writes the swap signature.
		runDir := filepath.Join(dir, fmt.Sprint("run", i))
		if err := os.MkdirAll(runDir, 0o755); err != nil {
			return err
		}
		fx, err := harness.NewFixture(ctx, runDir, key)
		if err != nil {
			return err
		}
		vm, err := harness.Start(ctx, harness.VMOptions{
			Name:      "bench",
			Initramfs: img,
			Append:    []string{"quiet", "rd.unlockrd.host=" + host},
			Disks:     []harness.Drive{{Path: fx.Disk.Path}},
			SMBIOS:    []string{harness.TokenCredential(token)},
		}, nil)
		if err != nil {
			return err
		}
		rep, err := vm.ExpectReport(8 * time.Minute)
		if err == nil {
			err = vm.Wait(3 * time.Minute)
		}
		lines := vm.Lines()
		vm.Kill()
		if err != nil {
			return fmt.Errorf("boot %d: %w", i+1, err)
		}
		if rep.RunInit == 0 {
			return fmt.Errorf("boot %d: the kernel log had no \"Run /init\" record", i+1)
		}
		d := rep.Uptime - rep.RunInit
		inInitramfs = append(inInitramfs, d)
		toInit = append(toInit, rep.Uptime)
		for _, l := range lines {
			if m := stageRE.FindStringSubmatch(l.Text); m != nil {
				v, _ := strconv.ParseFloat(m[2], 64)
				stages[m[1]] = append(stages[m[1]], time.Duration(v*float64(time.Second)))
			}
		}
		r.printf("boot %d: Run /init at %.3fs, real init at %.3fs: %.3fs in the initramfs", i+1, rep.RunInit.Seconds(), rep.Uptime.Seconds(), d.Seconds())
	}
	s := summarize(inInitramfs)
	r.printf("time in the initramfs (Run /init -> real init, TCG, network unlock of data + swap): %s", s)
	r.printf("kernel start -> real init: %s", summarize(toInit))
	for _, name := range []string{"modules", "devices", "network", "key", "volumes", "swap", "mount"} {
		if ds := stages[name]; len(ds) > 0 {
			r.printf("  stage %-8s %s", name, summarize(ds))
		}
	}
	r.target("boot: time in the initramfs ≤ 2.5 s (TCG)", s.median <= bootTarget,
		fmt.Sprintf("median %.2fs over %d boots", s.median.Seconds(), runs))
	return nil
}
