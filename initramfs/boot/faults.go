package boot

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/initramfs/layout"
	"golang.org/x/sys/unix"
)

// FaultParam is the kernel parameter of fault-injection tests:
// rd.unlockrd.test-poweroff-at=FLOW:N powers the machine off, without
// syncing, right before write step N of FLOW (provision or rotate; the
// steps are every write to the device, mke2fs and the confirmation to
// the key server). Only an image built with mkunlockrd build
// --test-faults (which carries layout.TestFaultsPath) honours it; any
// other image ignores it, so a production host cannot be told to cut
// its own power in the middle of a format.
const FaultParam = "rd.unlockrd.test-poweroff-at"

// faults counts the write steps of each flow and cuts the power at the
// one the command line names.
type faults struct {
	con   *Console
	flow  string
	at    int
	count map[string]int
	off   func()
}

// newFaults returns nil unless the image is a test image and the command
// line asks for a fault.
func newFaults(imageRoot, cmdline string, con *Console) *faults {
	if _, err := os.Stat(filepath.Join(imageRoot, layout.TestFaultsPath)); err != nil {
		return nil
	}
	for _, f := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(f, FaultParam+"=")
		if !ok {
			continue
		}
		flow, n, _ := strings.Cut(v, ":")
		at, err := strconv.Atoi(n)
		if err != nil || at < 1 {
			con.Printf("test: %s=%s: want FLOW:N, N from 1; ignored", FaultParam, v)
			return nil
		}
		con.Printf("test: fault injection: power off before %s step %d", flow, at)
		return &faults{con: con, flow: flow, at: at, count: map[string]int{}, off: func() {
			_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		}}
	}
	return nil
}

// Step is volumes.Faults.
func (f *faults) Step(flow, what string) {
	if f == nil {
		return
	}
	f.count[flow]++
	n := f.count[flow]
	f.con.Printf("test: %s step %d: %s", flow, n, what)
	if flow == f.flow && n == f.at {
		f.con.Printf("test: powering off before %s step %d (%s)", flow, n, what)
		f.off()
		select {} // the power is going
	}
}

func (f *faults) String() string { return fmt.Sprintf("%s:%d", f.flow, f.at) }
