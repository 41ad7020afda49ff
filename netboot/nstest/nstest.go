// Package nstest builds throwaway network namespaces for tests: veth pairs
// and tap devices in them, and processes (dnsmasq, servers) running inside.
// It is test support only, shared by netboot's integration tests and the
// QEMU harness; it imports no boot code. Everything needs root.
package nstest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// RequireRoot returns an error saying why the caller cannot build
// namespaces.
func RequireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("nstest: network namespace tests need root (run `make test` as root, as CI does)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("nstest: iproute2's ip not found: run qemu-tests/setup/install-deps.sh: %w", err)
	}
	return nil
}

// NS is a named network namespace (ip netns), with its loopback up.
type NS struct {
	Name string
}

var seq atomic.Int64

// New creates a namespace named prefix-<pid>-<n>.
func New(prefix string) (*NS, error) {
	if err := RequireRoot(); err != nil {
		return nil, err
	}
	n := &NS{Name: fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq.Add(1))}
	if err := run("ip", "netns", "add", n.Name); err != nil {
		return nil, err
	}
	if err := n.IP("link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// Close deletes the namespace; its links go with it. Stop the processes
// running inside first.
func (n *NS) Close() error {
	return run("ip", "netns", "del", n.Name)
}

// IP runs `ip -n NAME args...`.
func (n *NS) IP(args ...string) error {
	return run("ip", append([]string{"-n", n.Name}, args...)...)
}

// Output runs `ip -n NAME args...` and returns its output.
func (n *NS) Output(args ...string) ([]byte, error) {
	cmd := exec.Command("ip", append([]string{"-n", n.Name}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("nstest: ip -n %s %s: %w: %s", n.Name, strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// Command is a command that runs inside the namespace.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Do runs f on an OS thread that has entered the namespace: sockets f
// opens and processes it starts belong to the namespace. Goroutines f
// starts do not. The thread is discarded afterwards, so no other
// goroutine ever runs in the namespace by accident.
func (n *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime ends the thread with the goroutine.
		runtime.LockOSThread()
		fd, err := unix.Open(filepath.Join("/run/netns", n.Name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("nstest: open namespace %s: %w", n.Name, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("nstest: enter namespace %s: %w", n.Name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// Tap creates a tap device inside the namespace and returns its queue: a
// VM attached to the file (QEMU's -netdev tap,fd=N) is on the namespace's
// link. The device lives as long as a descriptor of it is open, and has
// carrier meanwhile.
func (n *NS) Tap(name string) (*os.File, error) {
	var f *os.File
	err := n.Do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("nstest: open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("nstest: tap %s: %w", name, err)
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("nstest: create tap %s in %s: %w", name, n.Name, err)
		}
		f = os.NewFile(uintptr(fd), "tap-"+name)
		return nil
	})
	return f, err
}

// Veth creates a veth pair: aName in a, bName in b. Each side's MAC is set
// when the matching argument is non-empty.
func Veth(a *NS, aName, aMAC string, b *NS, bName, bMAC string) error {
	args := []string{"link", "add", aName}
	if aMAC != "" {
		args = append(args, "address", aMAC)
	}
	args = append(args, "type", "veth", "peer", "name", bName, "netns", b.Name)
	if bMAC != "" {
		args = append(args, "address", bMAC)
	}
	return a.IP(args...)
}

func run(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nstest: %s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// Dnsmasq is a dnsmasq running in the foreground inside a namespace.
type Dnsmasq struct {
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	logs bytes.Buffer
}

// StartDnsmasq runs dnsmasq in the namespace with the given options (on
// top of defaults the options may override: foreground, no configuration
// file, no DNS, no lease file, log to stderr with DHCP details) and waits
// until it has started.
func (n *NS) StartDnsmasq(args ...string) (*Dnsmasq, error) {
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		return nil, fmt.Errorf("nstest: dnsmasq not found: run qemu-tests/setup/install-deps.sh: %w", err)
	}
	var all []string
	for _, b := range []string{"--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--leasefile-ro",
		"--log-facility=-", "--log-dhcp", "--bind-interfaces", "--user=root", "--group=root", "--pid-file="} {
		// dnsmasq refuses a repeated option: the caller's wins.
		name, _, _ := strings.Cut(b, "=")
		if !slices.ContainsFunc(args, func(a string) bool { return a == name || strings.HasPrefix(a, name+"=") }) {
			all = append(all, b)
		}
	}
	d := &Dnsmasq{done: make(chan struct{})}
	d.cmd = n.Command(context.Background(), "dnsmasq", append(all, args...)...)
	pr, pw := io.Pipe()
	d.cmd.Stdout = pw
	d.cmd.Stderr = pw
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("nstest: start dnsmasq: %w", err)
	}
	started := make(chan struct{}, 1)
	go func() {
		_ = d.cmd.Wait()
		pw.Close()
		close(d.done)
	}()
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.mu.Lock()
			d.logs.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			if strings.Contains(sc.Text(), "started, version") {
				select {
				case started <- struct{}{}:
				default:
				}
			}
		}
	}()
	select {
	case <-started:
		// The listening sockets are open once it reports; give it a
		// moment to finish reading its options.
		time.Sleep(100 * time.Millisecond)
		return d, nil
	case <-d.done:
		return nil, fmt.Errorf("nstest: dnsmasq exited at start:\n%s", d.Logs())
	case <-time.After(30 * time.Second):
		d.Stop()
		return nil, fmt.Errorf("nstest: dnsmasq did not start within 30s:\n%s", d.Logs())
	}
}

// Logs returns what dnsmasq printed so far.
func (d *Dnsmasq) Logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logs.String()
}

// Stop ends dnsmasq.
func (d *Dnsmasq) Stop() {
	if d == nil || d.cmd.Process == nil {
		return
	}
	_ = d.cmd.Process.Signal(unix.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}
