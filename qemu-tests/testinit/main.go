// Command testinit is the /sbin/init of the QEMU test root. unlockrd's
// initramfs switches root into it; it reports what the booted system looks
// like on the console, one `TESTINIT: ` line per fact, then powers the VM
// off so the test sees QEMU exit.
//
// The harness builds it statically (CGO_ENABLED=0) and installs it with its
// configuration at /etc/testinit.json (see package initcfg). It takes no
// flags: the kernel hands init any command-line word it doesn't know, and
// an init that exits on an unknown flag would panic the kernel. The
// configuration path can be overridden with TESTINIT_CONFIG.
//
// Run as anything but PID 1 it only reports (to stdout) and exits, so it
// is safe to run on a development machine.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
	"golang.org/x/sys/unix"
)

func main() {
	// Read first: the benchmark takes this as the moment the real init
	// started (the kernel's clock, comparable to its log timestamps).
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	started = time.Duration(ts.Nano())
	asInit := os.Getpid() == 1
	if asInit {
		mountEarly()
	}
	out := io.Writer(os.Stdout)
	if asInit {
		// After switch_root stdout usually is the console already, but an
		// init started by a broken initramfs may have none: open it.
		if f, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); err == nil {
			out = f
		}
	}
	r := &reporter{w: out}
	if asInit {
		// PID 1 must never exit: the kernel would panic and the test would
		// see a crash instead of the reason.
		defer func() {
			if v := recover(); v != nil {
				r.printf("panic %v", v)
				for _, l := range strings.Split(string(debug.Stack()), "\n") {
					r.printf("panic %s", l)
				}
			}
			shutdown(r)
		}()
	}
	run(r, asInit)
}

// started is CLOCK_BOOTTIME when main began.
var started time.Duration

// run prints the whole report; setup steps only run as PID 1.
func run(r *reporter, asInit bool) {
	r.printf("pid=%d", os.Getpid())
	r.printf("uptime=%.3f", started.Seconds())
	if t, ok := runInitTime(); ok {
		r.printf("run-init=%.3f", t.Seconds())
	}
	path := initcfg.Path
	if p := os.Getenv("TESTINIT_CONFIG"); p != "" {
		path = p
	}
	cfg, err := loadConfig(path)
	if err != nil {
		r.printf("config error=%v", err)
	}
	if asInit {
		setup(r, cfg)
	}
	report(r, cfg)
	r.printf("done")
}

func loadConfig(path string) (initcfg.Config, error) {
	var cfg initcfg.Config
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return cfg, nil
	}
	if err != nil {
		return cfg, err
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// reporter writes whole lines with one write each, so kernel messages on
// the same console can only land between lines, not inside them (mostly).
type reporter struct {
	w io.Writer
}

func (r *reporter) printf(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	s = strings.NewReplacer("\r", `\r`, "\n", `\n`).Replace(s)
	_, _ = io.WriteString(r.w, initcfg.Prefix+s+"\n")
}

// mountEarly mounts the API file systems an init needs when whoever ran it
// didn't (unlockrd moves them into the new root; a bare initramfs has none).
func mountEarly() {
	if _, err := os.Stat("/proc/self/mounts"); err != nil {
		_ = os.MkdirAll("/proc", 0o555)
		_ = unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	}
	mounted := map[string]bool{}
	for _, m := range readMounts() {
		mounted[m.target] = true
	}
	if !mounted["/sys"] {
		_ = os.MkdirAll("/sys", 0o555)
		_ = unix.Mount("sysfs", "/sys", "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	}
	if !mounted["/dev"] {
		_ = os.MkdirAll("/dev", 0o755)
		_ = unix.Mount("devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755")
	}
}

// shutdown leaves the disks clean and powers off. Failures to unmount the
// API file systems are expected and not reported; a block-device mount
// that stays mounted is worth a line, since a later test may fsck it.
func shutdown(r *reporter) {
	unix.Sync()
	ms := readMounts()
	for i := len(ms) - 1; i >= 0; i-- {
		m := ms[i]
		if m.target == "/" {
			continue
		}
		if err := unix.Unmount(m.target, 0); err != nil && strings.HasPrefix(m.source, "/dev/") {
			r.printf("umount %s error=%v", m.target, err)
		}
	}
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	r.printf("poweroff error=%v", err)
	for {
		time.Sleep(time.Hour)
	}
}

// runInitTime finds when the kernel started the initramfs's /init, from
// the kernel log ("Run /init as init process"); the benchmark measures
// the initramfs as the time from there to started. The record is in the
// ring buffer even when "quiet" kept it off the console.
func runInitTime() (time.Duration, bool) {
	// Raw syscalls: an os.File on a non-blocking fd would park in Go's
	// poller at the end of the buffer instead of returning EAGAIN.
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false
	}
	defer unix.Close(fd)
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EPIPE {
			continue // a record was overwritten while we read
		}
		if err != nil || n <= 0 {
			return 0, false // EAGAIN: end of the buffer
		}
		rec := string(buf[:n])
		prefix, msg, ok := strings.Cut(rec, ";")
		if !ok || !strings.HasPrefix(msg, "Run /init as init process") {
			continue
		}
		fields := strings.Split(prefix, ",")
		if len(fields) < 3 {
			return 0, false
		}
		us, err := strconv.ParseInt(fields[2], 10, 64)
		if err != nil {
			return 0, false
		}
		return time.Duration(us) * time.Microsecond, true
	}
}
