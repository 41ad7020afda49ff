package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hugelgupf/vmtest/qemu"
)

// VMOptions configure a VM. The zero value (plus an Initramfs) boots the
// cached kernel with one user-networking NIC and no disk.
type VMOptions struct {
	// Name prefixes log lines; default "vm".
	Name string
	// Kernel defaults to the cached kernel (see Kernel).
	Kernel string
	// Initramfs is the image to boot.
	Initramfs string
	// Append is added to the kernel command line after
	// "console=ttyS0 panic=-1".
	Append []string
	// Disks are attached as virtio disks: vda, vdb, ...
	Disks []Drive
	// Network is the first NIC; the zero value is user networking, where
	// the guest is 10.0.2.15 and reaches the host's 127.0.0.1 as 10.0.2.2.
	Network NIC
	// NoNetwork leaves the VM without any NIC.
	NoNetwork bool
	// ExtraNICs are added after Network.
	ExtraNICs []NIC
	// SMBIOS are -smbios arguments, e.g.
	// "type=11,value=io.systemd.credential:unlockrd.token=abc".
	SMBIOS []string
	// UUID is the machine UUID (-uuid), i.e. the SMBIOS system UUID.
	UUID string
	// MemoryMB defaults to 1024, CPUs to 2.
	MemoryMB, CPUs int
	// CPU is QEMU's -cpu model, default "max" (AES-NI, RDRAND). A model
	// without RDRAND makes getrandom block for minutes under TCG: to take
	// a feature away, use e.g. "max,-aes" (CPUNoAES).
	CPU string
	// Timeout bounds the VM's whole life; QEMU is killed after it.
	// Default 15 minutes: TCG on a loaded machine is slow.
	Timeout time.Duration
	// QEMUArgs are appended to QEMU's command line.
	QEMUArgs []string
	// SerialLog, when set, receives every console line with its time.
	SerialLog string
	// Concurrent skips the machine-wide lock that makes harness VMs run
	// one at a time; set it on VMs a test runs side by side.
	Concurrent bool
	// NetBoot boots from the first NIC's option ROM (QEMU's iPXE, -boot n)
	// instead of -kernel/-initrd: Kernel, Initramfs and Append are unused,
	// and the first NIC's DHCP server must say what to boot (e.g. Netdev
	// "user,tftp=DIR,bootfile=boot.ipxe" or bootfile=http://...).
	NetBoot bool
}

// CPUNoAES is QEMU's most capable CPU model without AES-NI (and so
// without VAES), keeping RDRAND: the boot must then use generic AES.
const CPUNoAES = "max,-aes,-vaes"

// Drive is a raw disk image attached with if=virtio.
type Drive struct {
	Path     string
	ReadOnly bool
	// Serial is the drive's serial number (/dev/disk/by-id), optional.
	Serial string
}

// NIC is a network card and its QEMU backend.
type NIC struct {
	// Netdev is the -netdev backend with options but without id, e.g.
	// "user" (default) or "user,restrict=on".
	Netdev string
	// Device is the -device model; default virtio-net-pci.
	Device string
	// MAC is the card's address; empty lets QEMU choose.
	MAC string
	// Tap, when set, is an open tap device queue (e.g. nstest's NS.Tap,
	// a tap inside a network namespace) handed to QEMU as -netdev
	// tap,fd=N; Netdev is then ignored.
	Tap *os.File
}

// Line is one console line and when it arrived, relative to VM start.
type Line struct {
	At   time.Duration
	Text string
}

// VM is a running QEMU guest whose serial console is read line by line.
// Expectations consume lines in order: each ExpectLine searches from just
// after the line the previous one matched.
type VM struct {
	name    string
	start   time.Time
	cmdline string
	qvm     *qemu.VM
	cancel  context.CancelFunc
	release func() // the machine-wide VM lock
	logPath string

	mu      sync.Mutex
	lines   []Line
	cursor  int
	changed chan struct{} // closed and replaced on every new line and at exit
	exited  bool
	exitErr error
	done    chan struct{} // closed when QEMU has exited and output is drained
}

// QEMUBinary returns the QEMU command: $VMTEST_QEMU if set, else
// qemu-system-x86_64 from PATH.
func QEMUBinary() (string, error) {
	if q := os.Getenv("VMTEST_QEMU"); q != "" {
		return q, nil
	}
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("harness: qemu-system-x86_64 not found in PATH: run `make deps` (qemu-tests/setup/install-deps.sh): %w", err)
	}
	return p, nil
}

// qemuArgs turns the options into QEMU arguments (without kernel, initrd
// and -append, which vmtest adds).
func (o *VMOptions) qemuArgs() []string {
	mem, cpus := o.MemoryMB, o.CPUs
	if mem == 0 {
		mem = 1024
	}
	if cpus == 0 {
		cpus = 2
	}
	// KVM is unavailable here and -cpu max is what gives the guest
	// RDRAND: without it getrandom blocks for minutes under TCG.
	cpu := o.CPU
	if cpu == "" {
		cpu = "max"
	}
	args := []string{"-accel", "tcg", "-cpu", cpu, "-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus), "-no-reboot"}
	for _, d := range o.Disks {
		spec := "file=" + qemuEscape(d.Path) + ",if=virtio,format=raw"
		if d.ReadOnly {
			spec += ",readonly=on"
		}
		if d.Serial != "" {
			spec += ",serial=" + qemuEscape(d.Serial)
		}
		args = append(args, "-drive", spec)
	}
	if o.NoNetwork {
		args = append(args, "-nic", "none")
	} else {
		taps := 0
		for i, n := range append([]NIC{o.Network}, o.ExtraNICs...) {
			id := fmt.Sprintf("n%d", i)
			backend := n.Netdev
			if backend == "" {
				backend = "user"
			}
			if n.Tap != nil {
				// QEMU gets the tap files as descriptors 3, 4, ... in
				// this order (see tapFiles).
				backend = fmt.Sprintf("tap,fd=%d", 3+taps)
				taps++
			}
			dev := n.Device
			if dev == "" {
				dev = "virtio-net-pci"
			}
			dev += ",netdev=" + id
			if n.MAC != "" {
				dev += ",mac=" + n.MAC
			}
			kind, opts, _ := strings.Cut(backend, ",")
			nd := kind + ",id=" + id
			if opts != "" {
				nd += "," + opts
			}
			args = append(args, "-netdev", nd, "-device", dev)
		}
	}
	for _, s := range o.SMBIOS {
		args = append(args, "-smbios", s)
	}
	if o.UUID != "" {
		args = append(args, "-uuid", o.UUID)
	}
	if o.NetBoot {
		args = append(args, "-boot", "n")
	}
	return append(args, o.QEMUArgs...)
}

// tapFiles are the NICs' tap files, in the order qemuArgs numbers them.
func (o *VMOptions) tapFiles() []*os.File {
	var fs []*os.File
	if o.NoNetwork {
		return nil
	}
	for _, n := range append([]NIC{o.Network}, o.ExtraNICs...) {
		if n.Tap != nil {
			fs = append(fs, n.Tap)
		}
	}
	return fs
}

// GuestHostIP is the host as the guest sees it on user networking:
// connections to it reach the host's 127.0.0.1.
const GuestHostIP = "10.0.2.2"

// GuestAddr turns the address of a service listening on the host's
// loopback ("127.0.0.1:8443") into the address the guest dials.
func GuestAddr(hostAddr string) (string, error) {
	host, port, err := net.SplitHostPort(hostAddr)
	if err != nil {
		return "", fmt.Errorf("harness: guest address of %q: %w", hostAddr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback() && !ip.IsUnspecified()) {
		return "", fmt.Errorf("harness: %s is not reachable from the guest: listen on 127.0.0.1", hostAddr)
	}
	return net.JoinHostPort(GuestHostIP, port), nil
}

// qemuEscape doubles commas, QEMU's escape inside option values.
func qemuEscape(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}

// Start boots a VM. Console lines go to log (with time offsets and the
// VM's name; nil discards them) and to opts.SerialLog. Cancelling ctx
// kills QEMU. Call Wait or Kill to release it.
//
// VMs run one at a time on the machine: Start waits (until ctx is done)
// while another harness VM, in any process, is running, unless
// opts.Concurrent is set. opts.Timeout starts once the VM is started.
func Start(ctx context.Context, opts VMOptions, log io.Writer) (*VM, error) {
	if opts.Name == "" {
		opts.Name = "vm"
	}
	qemuCmd, err := QEMUBinary()
	if err != nil {
		return nil, err
	}
	var boot []string // files QEMU loads itself
	if opts.NetBoot {
		opts.Kernel, opts.Initramfs, opts.Append = "", "", nil
	} else {
		if opts.Kernel == "" {
			k, err := Kernel()
			if err != nil {
				return nil, err
			}
			opts.Kernel = k.Vmlinuz
		}
		if opts.Initramfs == "" {
			return nil, errors.New("harness: VMOptions.Initramfs is empty")
		}
		boot = []string{opts.Kernel, opts.Initramfs}
	}
	for _, p := range append(boot, drivePaths(opts.Disks)...) {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("harness: VM %s: %w", opts.Name, err)
		}
	}
	timeout := opts.Timeout
	if timeout == 0 {
		timeout = 15 * time.Minute
	}

	v := &VM{
		name:    opts.Name,
		changed: make(chan struct{}),
		done:    make(chan struct{}),
		logPath: opts.SerialLog,
	}
	lw := &lineWriter{vm: v, log: log}
	if opts.SerialLog != "" {
		f, err := os.Create(opts.SerialLog)
		if err != nil {
			return nil, fmt.Errorf("harness: VM %s: serial log: %w", opts.Name, err)
		}
		lw.file = f
	}

	release := func() {}
	if !opts.Concurrent {
		if release, err = acquireVMLock(ctx, opts.Name, log); err != nil {
			lw.Close()
			return nil, err
		}
	}
	v.release = release
	qctx, cancel := context.WithTimeout(ctx, timeout)
	v.cancel = cancel
	kargs := append([]string{"console=ttyS0", "panic=-1"}, opts.Append...)
	if opts.NetBoot {
		kargs = nil // the boot script passes the command line
	}
	v.start = time.Now()
	qvm, err := qemu.StartContext(qctx, qemu.ArchAMD64,
		qemu.WithQEMUCommand(qemuCmd),
		qemu.WithKernel(opts.Kernel),
		qemu.WithInitramfs(opts.Initramfs),
		qemu.WithAppendKernel(kargs...),
		qemu.ArbitraryArgs(opts.qemuArgs()...),
		qemu.WithSerialOutput(lw),
		func(_ *qemu.IDAllocator, qo *qemu.Options) error {
			for i, f := range opts.tapFiles() {
				if fd := qo.AddFile(f); fd != 3+i {
					return fmt.Errorf("harness: tap %d would be descriptor %d, not %d", i, fd, 3+i)
				}
			}
			return nil
		},
	)
	if err != nil {
		cancel()
		release()
		lw.Close()
		return nil, fmt.Errorf("harness: VM %s: start %s: %w", opts.Name, qemuCmd, err)
	}
	v.qvm = qvm
	v.cmdline = qvm.CmdlineQuoted()
	go v.reap()
	return v, nil
}

func drivePaths(ds []Drive) []string {
	var ps []string
	for _, d := range ds {
		ps = append(ps, d.Path)
	}
	return ps
}

// reap drains the console pty (QEMU blocks writing once it is full) until
// QEMU exits, then collects its status. Draining and vmtest's Wait both
// read the console, so they must run one after the other.
func (v *VM) reap() {
	_, _ = v.qvm.Console.ExpectEOF()
	err := v.qvm.Wait()
	v.cancel()
	v.release()
	v.mu.Lock()
	v.exited = true
	v.exitErr = err
	close(v.changed)
	v.changed = make(chan struct{})
	v.mu.Unlock()
	close(v.done)
}

func (v *VM) addLine(text string) Line {
	v.mu.Lock()
	defer v.mu.Unlock()
	l := Line{At: time.Since(v.start), Text: text}
	v.lines = append(v.lines, l)
	close(v.changed)
	v.changed = make(chan struct{})
	return l
}

// Cmdline is QEMU's command line, quoted for a shell, to reproduce a run.
func (v *VM) Cmdline() string { return v.cmdline }

// SerialLog is the console log file, if any.
func (v *VM) SerialLog() string { return v.logPath }

// Elapsed is the time since QEMU started.
func (v *VM) Elapsed() time.Duration { return time.Since(v.start) }

// Lines returns a copy of every console line so far.
func (v *VM) Lines() []Line {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]Line(nil), v.lines...)
}

// Exited reports whether QEMU has exited.
func (v *VM) Exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// ExpectLine waits up to timeout for a console line matching the regular
// expression pattern, searching from after the last matched line, and
// returns it. It fails early when QEMU exits first.
func (v *VM) ExpectLine(pattern string, timeout time.Duration) (string, error) {
	l, err := v.ExpectLineAt(pattern, timeout)
	return l.Text, err
}

// ExpectLineAt is ExpectLine returning the line's arrival time too.
func (v *VM) ExpectLineAt(pattern string, timeout time.Duration) (Line, error) {
	re, err := regexp.Compile(pattern)
	if err != nil {
		return Line{}, fmt.Errorf("harness: VM %s: pattern: %w", v.name, err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	// A failed expectation consumes nothing: next scans from the cursor.
	v.mu.Lock()
	next := v.cursor
	v.mu.Unlock()
	for {
		v.mu.Lock()
		for ; next < len(v.lines); next++ {
			if re.MatchString(v.lines[next].Text) {
				v.cursor = next + 1
				l := v.lines[next]
				v.mu.Unlock()
				return l, nil
			}
			if j, ok := rejoined(v.lines, next); ok && re.MatchString(j) {
				v.cursor = next + 2
				l := Line{At: v.lines[next+1].At, Text: j}
				v.mu.Unlock()
				return l, nil
			}
			if _, ok := interleavedPrefix(v.lines[next].Text); ok && next+1 == len(v.lines) && !v.exited {
				break // wait for the rest of the line
			}
		}
		changed, exited, exitErr := v.changed, v.exited, v.exitErr
		v.mu.Unlock()
		if exited {
			return Line{}, fmt.Errorf("harness: VM %s: QEMU exited (%s) before a line matched %q%s", v.name, exitString(exitErr), pattern, v.logHint())
		}
		select {
		case <-changed:
		case <-timer.C:
			return Line{}, fmt.Errorf("harness: VM %s: no line matched %q within %s%s", v.name, pattern, timeout, v.logHint())
		}
	}
}

// ExpectNot waits for a line matching end (like ExpectLine) and then
// checks that no line since boot, up to and including it, matched bad.
// It returns the end line.
func (v *VM) ExpectNot(bad, end string, timeout time.Duration) (string, error) {
	re, err := regexp.Compile(bad)
	if err != nil {
		return "", fmt.Errorf("harness: VM %s: pattern: %w", v.name, err)
	}
	line, err := v.ExpectLine(end, timeout)
	if err != nil {
		return "", err
	}
	v.mu.Lock()
	seen := v.lines[:v.cursor]
	v.mu.Unlock()
	for i, l := range seen {
		text := l.Text
		if !re.MatchString(text) {
			j, ok := rejoined(seen, i)
			if !ok || !re.MatchString(j) {
				continue
			}
			text = j
		}
		return line, fmt.Errorf("harness: VM %s: line %q at %s matched %q, which must not appear", v.name, text, l.At.Round(time.Millisecond), bad)
	}
	return line, nil
}

// kernelRecord is the time stamp that starts a kernel log record on the
// console ("[    3.236634] ").
var kernelRecord = regexp.MustCompile(`\[\s*\d+\.\d{6}\] `)

// interleavedPrefix reports whether the kernel wrote a log record into the
// middle of a line a program was writing to the console, and returns the
// program's text before it: the console then shows "...value is no[
// 3.236634] ACPI: ..." with the program's line going on at the start of
// the next console line ("t base64); ..."). printk writes to the UART
// directly, past the tty a program's write goes through, so no write
// from the guest's userspace is atomic on the console. Expectations also
// try the program's line put back together (prefix + next line).
func interleavedPrefix(text string) (string, bool) {
	loc := kernelRecord.FindStringIndex(text)
	if loc == nil || loc[0] == 0 {
		return "", false
	}
	return text[:loc[0]], true
}

// rejoined is line i put back together when the kernel wrote a record
// into it (interleavedPrefix): its text before the record followed by
// line i+1; false when line i has no such record or line i+1 is not there.
func rejoined(lines []Line, i int) (string, bool) {
	pre, ok := interleavedPrefix(lines[i].Text)
	if !ok || i+1 >= len(lines) {
		return "", false
	}
	return pre + lines[i+1].Text, true
}

// Wait waits up to timeout for QEMU to exit: the guest powered off, or
// rebooted or panicked (-no-reboot and panic=-1 turn both into an exit).
// It kills QEMU at the deadline. It returns an error for the deadline, a
// QEMU failure, or a kernel panic.
func (v *VM) Wait(timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-v.done:
	case <-timer.C:
		_ = v.Kill()
		return fmt.Errorf("harness: VM %s still running after %s, killed it%s", v.name, timeout, v.logHint())
	}
	v.mu.Lock()
	err := v.exitErr
	v.mu.Unlock()
	if err != nil {
		return fmt.Errorf("harness: VM %s: QEMU failed: %w%s", v.name, err, v.logHint())
	}
	if l, ok := v.Find(`Kernel panic - not syncing`); ok {
		return fmt.Errorf("harness: VM %s: %s%s", v.name, l.Text, v.logHint())
	}
	return nil
}

// PoweredOff reports whether the kernel announced a power-off.
func (v *VM) PoweredOff() bool {
	_, ok := v.Find(`reboot: Power down`)
	return ok
}

// Find returns the first line so far, ignoring the expectation cursor,
// that matches pattern (an invalid pattern panics). After Wait it answers
// "did this ever appear".
func (v *VM) Find(pattern string) (Line, bool) {
	re := regexp.MustCompile(pattern)
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, l := range v.lines {
		if re.MatchString(l.Text) {
			return l, true
		}
	}
	return Line{}, false
}

// Kill stops QEMU and waits until its output is drained.
func (v *VM) Kill() error {
	if v.Exited() {
		return nil
	}
	err := v.qvm.Kill()
	<-v.done
	if errors.Is(err, os.ErrProcessDone) {
		err = nil
	}
	return err
}

func (v *VM) logHint() string {
	if v.logPath == "" {
		return ""
	}
	return " (console log: " + v.logPath + ")"
}

func exitString(err error) string {
	if err == nil {
		return "status 0"
	}
	return err.Error()
}

// lineWriter splits QEMU's serial output into lines. It strips carriage
// returns and the terminal escapes firmware prints.
type lineWriter struct {
	vm   *VM
	log  io.Writer
	file *os.File
	buf  []byte
	mu   sync.Mutex
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

func (w *lineWriter) emit(raw []byte) {
	text := cleanLine(raw)
	l := w.vm.addLine(text)
	msg := fmt.Sprintf("[%8.3fs] %s: %s\n", l.At.Seconds(), w.vm.name, text)
	if w.log != nil {
		_, _ = io.WriteString(w.log, msg)
	}
	if w.file != nil {
		_, _ = w.file.WriteString(msg)
	}
}

// Close flushes a last unterminated line; vmtest calls it once QEMU exits.
func (w *lineWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.emit(w.buf)
		w.buf = nil
	}
	if w.file != nil {
		err := w.file.Close()
		w.file = nil
		return err
	}
	return nil
}

var ansiEscape = regexp.MustCompile(`\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[@-~])`)

func cleanLine(raw []byte) string {
	s := ansiEscape.ReplaceAllString(string(raw), "")
	return strings.Map(func(r rune) rune {
		if r == '\t' {
			return r
		}
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, s)
}
