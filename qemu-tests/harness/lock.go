package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// vmLockPath is machine-wide, not per checkout: the constraint is the
// machine's cores, shared by everyone's test runs.
var vmLockPath = filepath.Join(os.TempDir(), "unlockrd-qemu.lock")

// acquireVMLock waits until no other harness VM runs on this machine.
// `go test ./...` runs packages in parallel, and two TCG guests on two
// cores each take twice as long, pushing boots past their deadlines. The
// lock is an flock, so a crashed holder releases it.
func acquireVMLock(ctx context.Context, name string, log io.Writer) (release func(), err error) {
	f, err := os.OpenFile(vmLockPath, os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		return nil, fmt.Errorf("harness: VM lock %s: %w", vmLockPath, err)
	}
	start := time.Now()
	told := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("harness: VM lock %s: %w", vmLockPath, err)
		}
		if !told && time.Since(start) > time.Second && log != nil {
			fmt.Fprintf(log, "harness: VM %s waits for another VM to finish (lock %s)\n", name, vmLockPath)
			told = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("harness: VM %s: waiting for the VM lock: %w", name, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	if told && log != nil {
		fmt.Fprintf(log, "harness: VM %s got the lock after %s\n", name, time.Since(start).Round(time.Millisecond))
	}
	return func() { f.Close() }, nil
}

// LockVMs takes the machine-wide VM lock for a group of VMs run side by
// side (each started with VMOptions.Concurrent): other harness VMs, in
// any process, wait until release is called.
func LockVMs(ctx context.Context, name string, log io.Writer) (release func(), err error) {
	return acquireVMLock(ctx, name, log)
}
