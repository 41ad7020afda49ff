// Package boot runs the unlockrd pipeline as PID 1 (DESIGN §2): it calls
// the stage packages in order, gives each a deadline, prints one line per
// stage with its duration, and decides what happens on failure.
package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/blockdev"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/initramfs/sysroot"
	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/netboot/netup"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/volumes"
	"golang.org/x/sys/unix"
)

// Timeouts bound the stages that can wait on hardware.
type Timeouts struct {
	Modules time.Duration
	Devices time.Duration
	Link    time.Duration
	Network time.Duration
	Mount   time.Duration
}

// DefaultTimeouts are generous: a loaded emulated host is slow, and a
// timeout here means a host that does not boot.
var DefaultTimeouts = Timeouts{
	Modules: 2 * time.Minute,
	Devices: 2 * time.Minute,
	Link:    time.Minute,
	Network: 2 * time.Minute,
	Mount:   time.Minute,
}

// Options configure Run.
type Options struct {
	// ImageRoot is the initramfs root ("/").
	ImageRoot string
	// NewRoot is where the real root is mounted ("/sysroot").
	NewRoot string
	// Cmdline is the kernel command line.
	Cmdline  string
	Console  *Console
	Timeouts Timeouts
	// Stages are the entry points; the zero value means DefaultStages.
	Stages *Stages
}

// Fatal is an error after which the host stops.
type Fatal struct {
	Err    error
	Reboot bool // reboot rather than halt (give_up_after)
}

func (f *Fatal) Error() string { return f.Err.Error() }
func (f *Fatal) Unwrap() error { return f.Err }

// Main is PID 1's whole life: it never returns. On success it has exec'd
// the real init; on failure it prints the cause and what happens next,
// then halts or reboots.
func Main() {
	start := bootTime()
	mountErr := earlyMounts()
	con := OpenConsole()
	if mountErr != nil {
		con.Printf("early mounts: %v", mountErr)
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	err := Run(context.Background(), Options{
		ImageRoot: "/",
		NewRoot:   "/sysroot",
		Cmdline:   strings.TrimSpace(string(cmdline)),
		Console:   con,
		Timeouts:  DefaultTimeouts,
	}, start)
	var f *Fatal
	reboot := errors.As(err, &f) && f.Reboot
	if reboot {
		con.Printf("%v; rebooting in 5s", err)
	} else {
		con.Printf("%v; halting", err)
	}
	unix.Sync()
	time.Sleep(5 * time.Second)
	if reboot {
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	}
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// bootTime is the time since the kernel started, so that the last line can
// say how long the initramfs took and how long the whole boot took.
func bootTime() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// runner carries what the stages share.
type runner struct {
	o   Options
	st  Stages
	con *Console
	cfg *config.Config
	bg  *group
	// faults is the fault-injection hook of test images (nil otherwise).
	faults *faults
}

// stage runs f with a deadline and prints "name: summary (1.23s)".
func (r *runner) stage(ctx context.Context, name string, timeout time.Duration, f func(context.Context) (string, error)) error {
	line, err := timed(ctx, name, timeout, f)
	if err == nil {
		r.con.Printf("%s", line)
	}
	return err
}

// timed runs f with a deadline and returns its stage line, or its error
// naming the stage.
func timed(ctx context.Context, name string, timeout time.Duration, f func(context.Context) (string, error)) (string, error) {
	start := time.Now()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	summary, err := f(ctx)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	return fmt.Sprintf("%s: %s (%.2fs)", name, summary, time.Since(start).Seconds()), nil
}

// Run executes stages 2–9. It returns only on failure.
//
// Stages 3, 4 and the device half of 6 overlap: the network driver and
// the disk driver load in parallel, DHCP starts as soon as a link exists,
// and devices are found and headers checked while the network comes up.
// The key is fetched only once every header has been accepted (DESIGN §6):
// a host whose disk was tampered with never asks for its key, so the key
// never sits in the memory of a boot that will not use it. That costs
// almost nothing: the header checks take milliseconds once the disk is
// there and overlap the network bring-up, which is nearly always longer.
// Unlocking also waits for the modules (dm-crypt). A background stage that
// fails stops the boot at once, and the fatal error names every stage
// that failed.
func Run(ctx context.Context, o Options, kernelUptime time.Duration) error {
	initStart := time.Now()
	r := &runner{o: o, con: o.Console, st: DefaultStages()}
	if o.Stages != nil {
		r.st = *o.Stages
	}
	cfg, err := r.config()
	if err != nil {
		return &Fatal{Err: err}
	}
	r.cfg = cfg
	r.faults = newFaults(o.ImageRoot, o.Cmdline, o.Console)
	r.bg = newGroup(ctx)
	ctx = r.bg.ctx
	defer r.bg.stop(nil)

	mods, driversLoaded := r.modules()
	devs := r.devices()
	net, err := r.network(ctx, driversLoaded)
	if err != nil {
		// Up has retried every link until the deadline; a reboot starts
		// over from the drivers up, where halting would strand the host.
		return r.bg.fatal(err, true)
	}
	id, err := r.identity()
	if err != nil {
		return r.bg.fatal(err, false)
	}
	defer id.wipe()
	root, opened, err := r.keysAndUnlock(ctx, id, mods, devs)
	if err != nil {
		return err
	}
	// Wiped here, not only by the deferred wipe: on success this function
	// ends in exec, and deferred calls never run.
	id.wipe()
	if err := r.swap(ctx, opened); err != nil {
		return r.bg.fatal(err, false)
	}
	if err := r.mount(ctx, root, opened); err != nil {
		return r.bg.fatal(err, false)
	}
	r.teardown(net)
	return r.switchRoot(initStart, kernelUptime)
}

// config is stage 2: the embedded configuration, validated, then the
// kernel command line's overrides.
func (r *runner) config() (*config.Config, error) {
	b, err := os.ReadFile(filepath.Join(r.o.ImageRoot, layout.ConfigPath))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg, err := config.LoadEmbedded(b)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	warnings, err := cfg.ApplyCmdline(r.o.Cmdline)
	if err != nil {
		// A bad override is reported and the configured value kept: the
		// image was validated, the command line was not.
		for _, e := range strings.Split(err.Error(), "\n") {
			r.con.Printf("config: %s; keeping the configured value", e)
		}
	}
	for _, w := range warnings {
		r.con.Printf("warning: %s", w)
	}
	r.con.SetDebug(cfg.Boot.Debug)
	return cfg, nil
}

// modules starts stage 3 in the background. The channel closes once it
// ends: a link missing by then is not coming, so a misspelt ip= link name
// falls back to DHCP at once.
func (r *runner) modules() (*background, <-chan struct{}) {
	loaded := make(chan struct{})
	b := r.bg.start(func(ctx context.Context) error {
		defer close(loaded)
		return r.stage(ctx, "modules", r.o.Timeouts.Modules, func(ctx context.Context) (string, error) {
			return r.st.Modules(ctx, r.o.ImageRoot, r.con)
		})
	})
	return b, loaded
}

// prepared is what the devices stage found.
type prepared struct {
	root blockdev.BlockDev
	vols []volumes.Prepared
}

// devices starts the device half of stage 6 in the background; its result
// is read once the background stage is done.
func (r *runner) devices() *deviceStage {
	d := &deviceStage{}
	// rd.unlockrd.device-timeout= shortens the wait (a test with a
	// missing disk need not wait two minutes).
	timeout := r.o.Timeouts.Devices
	if r.cfg.Boot.DeviceTimeout > 0 {
		timeout = r.cfg.Boot.DeviceTimeout
	}
	d.bg = r.bg.start(func(ctx context.Context) error {
		return r.stage(ctx, "devices", timeout, func(ctx context.Context) (string, error) {
			root, vols, err := r.st.Devices(ctx, r.cfg, ulog.Prefixed(r.con, "devices"))
			if err != nil {
				return "", err
			}
			d.res = prepared{root, vols}
			return describePrepared(root, vols), nil
		})
	})
	return d
}

// deviceStage is the running devices stage.
type deviceStage struct {
	bg  *background
	res prepared // valid once bg is done without error
}

// Wait returns the devices found once the stage is done.
func (d *deviceStage) Wait() (prepared, error) {
	if err := d.bg.Wait(); err != nil {
		return prepared{}, err
	}
	return d.res, nil
}

// network is stage 4.
func (r *runner) network(ctx context.Context, driversLoaded <-chan struct{}) (Network, error) {
	var net Network
	err := r.stage(ctx, "network", r.o.Timeouts.Network, func(ctx context.Context) (string, error) {
		n, err := r.st.Network(ctx, netup.Config{
			Plan:          r.cfg.Network.IP.Plan,
			Nameservers:   r.cfg.Boot.Nameservers,
			LinkTimeout:   r.o.Timeouts.Link,
			DriversLoaded: driversLoaded,
			Debug:         r.cfg.Boot.Debug,
		}, ulog.Prefixed(r.con, "network"))
		if err != nil {
			return "", err
		}
		net = n
		return n.String(), nil
	})
	return net, err
}

// identity is what the key request says about the host.
type identity struct {
	host  string // empty when no URL names the host
	token []byte // secret; wiped by wipe
}

func (id *identity) wipe() { clear(id.token) }

// identity resolves the host id and the token (stage 5's inputs). The
// host id is needed only when a URL names the host ({host}): one image
// per host, or a static endpoint, boots without one and says nothing.
func (r *runner) identity() (*identity, error) {
	src := r.st.Identity
	src.CmdlineHost, src.CmdlineToken = r.cfg.Boot.Host, r.cfg.Boot.Token
	id := &identity{}
	hostFrom := "nowhere (no URL names the host)"
	if r.cfg.Key.NeedsHost() {
		// Each source tried and found wanting is reported by name (notes)
		// before the next is tried; see keys.Sources for the order.
		host, from, notes, err := src.HostID(r.cfg.Key.Host)
		r.notes(notes)
		if err != nil {
			return nil, fmt.Errorf("key: %w", err)
		}
		id.host, hostFrom = host, from
	}
	token, tokenFrom, notes, err := src.Token(r.cfg.Key.Token)
	r.notes(notes)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	id.token = token
	r.con.Debugf("key: host id %s from %s, token from %s", id.host, hostFrom, tokenFrom)
	return id, nil
}

func (r *runner) notes(notes []string) {
	for _, n := range notes {
		r.con.Printf("key: %s", n)
	}
}

// keysAndUnlock is stages 5 and 6: fetch, unlock; fetch again if no key
// fits (the operator may be fixing the server), with one backoff policy
// and one give_up_after deadline counted from the first fetch, after
// which the host reboots. Every fetched key is wiped before it returns.
func (r *runner) keysAndUnlock(ctx context.Context, id *identity, mods *background, devs *deviceStage) (blockdev.BlockDev, []volumes.Opened, error) {
	giveUp := r.cfg.Key.GiveUpAfter.D()
	start := r.st.Now()
	// Headers first: no key is asked for on behalf of a refused header.
	dev, err := devs.Wait()
	if err != nil {
		return dev.root, nil, r.bg.fatal(err, false)
	}
	var opened []volumes.Opened
	pending := dev.vols
	for round := 0; ; round++ {
		ks, line, err := r.fetch(ctx, id, start)
		if err != nil {
			return dev.root, nil, r.bg.fatal(err, errors.Is(err, keys.ErrGaveUp))
		}
		if round == 0 {
			// The key is here; unlocking needs dm-crypt.
			if err := mods.Wait(); err != nil {
				ks.Wipe()
				return dev.root, nil, r.bg.fatal(err, false)
			}
		}
		// Printed once the keys can be used, so that the console reads in
		// the order the stages depend on each other (devices, key,
		// volumes) even when the modules stage ends last.
		r.con.Printf("%s", line)
		got, err := r.unlock(ctx, pending, ks)
		ks.Wipe()
		opened = append(opened, got...)
		pending = pending[len(got):]
		if err == nil {
			r.confirm(ctx, id, start, ks, opened)
			return dev.root, opened, nil
		}
		if !errors.Is(err, volumes.ErrNoKey) && !errors.Is(err, volumes.ErrNotNew) {
			return dev.root, nil, r.bg.fatal(err, false)
		}
		wait := r.st.Refetch.Delay(round)
		if giveUp > 0 && r.st.Now().Add(wait).Sub(start) > giveUp {
			r.con.Printf("%v; giving up", err)
			return dev.root, nil, r.bg.fatal(fmt.Errorf("key: %w after %s", keys.ErrGaveUp, giveUp), true)
		}
		r.con.Printf("%v; fetching the key again in %.1fs", err, wait.Seconds())
		if err := r.st.Sleep(ctx, wait); err != nil {
			return dev.root, nil, r.bg.fatal(fmt.Errorf("key: %w", err), false)
		}
	}
}

// fetch is stage 5; it returns the keys and the stage line. It has no
// stage deadline: Fetch enforces give_up_after itself (from start), so
// that it can say so.
func (r *runner) fetch(ctx context.Context, id *identity, start time.Time) (*keys.Keys, string, error) {
	var ks *keys.Keys
	line, err := timed(ctx, "key", 0, func(ctx context.Context) (string, error) {
		var err error
		ks, err = r.st.Fetch(ctx, r.keyConfig(id, start), ulog.Prefixed(r.con, "key"))
		if err != nil {
			return "", err
		}
		if ks.State == keyproto.StateNew || ks.State == keyproto.StateRotating {
			r.con.Printf("key: the key server says host %s is %s", id.host, ks.State)
		}
		if id.host == "" {
			return fmt.Sprintf("%d key(s) from %s", len(ks.Keys), ks.Server), nil
		}
		return fmt.Sprintf("%d key(s) for host %s from %s", len(ks.Keys), id.host, ks.Server), nil
	})
	return ks, line, err
}

func (r *runner) keyConfig(id *identity, start time.Time) keys.Config {
	return keys.Config{
		URLs:           r.cfg.Key.URLs,
		Pins:           r.cfg.Key.Pins,
		CAs:            r.cfg.Key.CA.Certs(),
		Host:           id.host,
		Token:          id.token,
		AttemptTimeout: r.cfg.Key.AttemptTimeout.D(),
		GiveUpAfter:    r.cfg.Key.GiveUpAfter.D(),
		Since:          start,
	}
}

// confirm tells the key server what this boot's volumes show (DESIGN
// §5): while the host is new, that they open with the current key
// (provisioned now or by an earlier boot that was cut before it could
// say so); while it is rotating, that every one of them opens with the
// current key only. A failure is printed and the boot goes on: the next
// boot confirms again.
func (r *runner) confirm(ctx context.Context, id *identity, start time.Time, ks *keys.Keys, opened []volumes.Opened) {
	if r.st.Confirm == nil || len(ks.IDs) == 0 || ks.IDs[0] == "" {
		return
	}
	var event string
	switch ks.State {
	case keyproto.StateNew:
		event = keyproto.EventProvisioned
	case keyproto.StateRotating:
		event = keyproto.EventRotated
	default:
		return
	}
	keyed := 0
	for _, o := range opened {
		if o.Key < 0 {
			continue // random-key swap: no key of the server's
		}
		keyed++
		if !o.Current {
			r.con.Printf("key: volume %s does not open with key 1 (%s) alone yet: not confirming %s", o.Spec.Name, ks.IDs[0], event)
			return
		}
	}
	if keyed == 0 {
		return
	}
	if r.faults != nil {
		flow := volumes.FlowProvision
		if event == keyproto.EventRotated {
			flow = volumes.FlowRotate
		}
		r.faults.Step(flow, "confirm "+event+" to the key server")
	}
	c := keyproto.Confirmation{Event: event, Key: ks.IDs[0]}
	line, err := timed(ctx, "key", 0, func(ctx context.Context) (string, error) {
		if err := r.st.Confirm(ctx, r.keyConfig(id, start), ks, c); err != nil {
			return "", fmt.Errorf("%w; the next boot confirms again", err)
		}
		return fmt.Sprintf("confirmed %s with key %s to %s", event, c.Key, ks.Server), nil
	})
	if err != nil {
		line = err.Error()
	}
	r.con.Printf("%s", line)
}

// unlock is the key half of stage 6.
func (r *runner) unlock(ctx context.Context, pending []volumes.Prepared, ks *keys.Keys) ([]volumes.Opened, error) {
	var got []volumes.Opened
	err := r.stage(ctx, "volumes", 0, func(ctx context.Context) (string, error) {
		var err error
		lc := volumes.Lifecycle{New: ks.State == keyproto.StateNew, Rotating: ks.State == keyproto.StateRotating}
		if r.faults != nil {
			lc.Faults = r.faults
		}
		got, err = r.st.Unlock(ctx, pending, ks.Keys, lc, ulog.Prefixed(r.con, "volumes"))
		if err != nil {
			return "", err
		}
		var names []string
		for _, g := range got {
			names = append(names, g.Spec.Name)
		}
		return strings.Join(names, ", ") + " unlocked", nil
	})
	return got, err
}

// swap enables the swap volumes (end of stage 6).
func (r *runner) swap(ctx context.Context, opened []volumes.Opened) error {
	for _, v := range opened {
		if !v.Spec.Swap {
			continue
		}
		err := r.stage(ctx, "swap", 30*time.Second, func(ctx context.Context) (string, error) {
			if err := r.st.Swap(v.Path, ulog.Prefixed(r.con, "swap")); err != nil {
				return "", err
			}
			return v.Path + " enabled", nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// mount is stage 7.
func (r *runner) mount(ctx context.Context, rootDev blockdev.BlockDev, opened []volumes.Opened) error {
	return r.stage(ctx, "mount", r.o.Timeouts.Mount, func(ctx context.Context) (string, error) {
		root, data := r.mounts(rootDev, opened)
		if err := r.st.Mount(ctx, r.o.NewRoot, root, data); err != nil {
			return "", err
		}
		parts := []string{fmt.Sprintf("/ (%s)", strings.TrimSpace(root.Source+" "+strings.Join(root.Options, ",")))}
		for _, d := range data {
			parts = append(parts, fmt.Sprintf("%s (%s)", d.Target, d.Source))
		}
		return strings.Join(parts, ", "), nil
	})
}

// teardown is stage 8. The keys were wiped as each unlock ended and the
// token when the key stage ended (tests hold the buffers and check).
func (r *runner) teardown(net Network) {
	if !r.cfg.Network.Keep {
		if err := net.Teardown(); err != nil {
			r.con.Printf("network: teardown: %v", err)
		}
	}
	r.con.Printf("cleanup: keys wiped, network %s", map[bool]string{true: "kept", false: "removed"}[r.cfg.Network.Keep])
}

// switchRoot is stage 9; it returns only on failure.
func (r *runner) switchRoot(initStart time.Time, kernelUptime time.Duration) error {
	r.con.Printf("switch root: exec %s (initramfs %.2fs, since kernel start %.2fs)",
		r.cfg.Boot.Init, time.Since(initStart).Seconds(), (kernelUptime + time.Since(initStart)).Seconds())
	return &Fatal{Err: r.st.SwitchRoot(r.o.NewRoot, r.cfg.Boot.Init, sysroot.Env())}
}

func describePrepared(root blockdev.BlockDev, vols []volumes.Prepared) string {
	parts := []string{"root=" + root.Path}
	for _, v := range vols {
		if v.Spec.Name == "root" && v.Dev.Path == root.Path {
			parts[0] += " (LUKS2)"
			continue
		}
		parts = append(parts, v.Spec.Name+"="+v.Dev.Path)
	}
	return strings.Join(parts, " ") + ", LUKS2 headers valid"
}

// mounts turns the configuration and the opened volumes into mounts.
func (r *runner) mounts(rootDev blockdev.BlockDev, opened []volumes.Opened) (sysroot.Mount, []sysroot.Mount) {
	cfg := r.cfg
	byName := map[string]volumes.Opened{}
	for _, o := range opened {
		byName[o.Spec.Name] = o
	}
	root := sysroot.Mount{Source: rootDev.Path, Target: "/", FSType: cfg.Root.FSType, Options: cfg.Root.Options}
	if o, ok := byName["root"]; ok {
		root.Source = o.Path
	}
	if root.FSType == "" && rootDev.Content.Kind == blockdev.FileSystem {
		root.FSType = rootDev.Content.Format
	}
	var data []sysroot.Mount
	for _, v := range cfg.Volumes {
		if v.Swap.On() {
			continue
		}
		data = append(data, sysroot.Mount{Source: byName[v.Name].Path, Target: v.Mount, FSType: v.FSType, Options: v.Options})
	}
	return root, data
}
