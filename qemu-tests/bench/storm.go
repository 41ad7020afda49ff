package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/storm"
)

// benchStorm is the fleet storm's full form (issue 12): 4 VMs and 2,000
// synthetic hosts against 3 replicas on a 3-member etcd, one replica and
// the etcd leader killed mid-storm, the abuse suite's attacks running
// throughout (qemu-tests/storm). Console and server output go to a log
// file whose path is printed.
func benchStorm(ctx context.Context, r *report) error {
	vms, synthetic := 4, 2000
	if r.quick {
		synthetic = 500
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-storm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	logPath := filepath.Join(os.TempDir(), "unlockrd-bench-storm.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	ctx, cancel := context.WithTimeout(ctx, 40*time.Minute)
	defer cancel()
	res, err := storm.Run(ctx, storm.Config{Dir: dir, VMs: vms, Synthetic: synthetic, Log: logf, ServerLog: logf})
	if err != nil {
		return fmt.Errorf("storm (log %s): %w", logPath, err)
	}
	for _, l := range res.Report() {
		r.printf("%s", l)
	}
	problems := res.Problems()
	for _, p := range problems {
		r.printf("PROBLEM: %s", p)
	}
	r.printf("storm: console and server output in %s", logPath)
	r.target(fmt.Sprintf("fleet storm: %d VMs boot and %d synthetic hosts get their keys through a replica and etcd-leader kill under attack, nothing lost", vms, synthetic),
		len(problems) == 0, fmt.Sprintf("%d problems; VM time to key p50 %.2fs p99 %.2fs, synthetic p50 %.2fs p99 %.2fs",
			len(problems), vmKeyAt(res, 0.5).Seconds(), vmKeyAt(res, 0.99).Seconds(),
			storm.Percentile(res.SyntheticLat, 0.5).Seconds(), storm.Percentile(res.SyntheticLat, 0.99).Seconds()))
	return nil
}

func vmKeyAt(res *storm.Result, p float64) time.Duration {
	var ds []time.Duration
	for _, v := range res.VMs {
		if v.Err == nil {
			ds = append(ds, v.KeyAt)
		}
	}
	return storm.Percentile(ds, p)
}
