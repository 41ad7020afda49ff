// Package boot runs the unlockrd pipeline as PID 1 (DESIGN §2): it calls
// the stage packages in order, gives each a deadline, prints one line per
// stage with its duration, and decides what happens on failure.
package boot

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/initramfs/modload"
	"github.com/unlockrd/unlockrd/initramfs/sysroot"
	"github.com/unlockrd/unlockrd/netboot/netup"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/pin"
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
	con *Console
	cfg *config.Config
}

// stage runs f with a deadline and prints "name: summary (1.23s)".
func (r *runner) stage(ctx context.Context, name string, timeout time.Duration, f func(context.Context) (string, error)) error {
	start := time.Now()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	summary, err := f(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	r.con.Printf("%s: %s (%.2fs)", name, summary, time.Since(start).Seconds())
	return nil
}

// Run executes stages 2–9. It returns only on failure.
func Run(ctx context.Context, o Options, kernelUptime time.Duration) error {
	initStart := time.Now()
	r := &runner{o: o, con: o.Console}

	// Stage 2: configuration.
	cfgBytes, err := os.ReadFile(filepath.Join(o.ImageRoot, layout.ConfigPath))
	if err != nil {
		return &Fatal{Err: fmt.Errorf("config: %w", err)}
	}
	cfg, err := config.LoadEmbedded(cfgBytes)
	if err != nil {
		return &Fatal{Err: fmt.Errorf("config: %w", err)}
	}
	if err := cfg.ApplyCmdline(o.Cmdline); err != nil {
		// A bad override is reported and the configured value kept: the
		// image was validated, the command line was not.
		for _, e := range strings.Split(err.Error(), "\n") {
			r.con.Printf("config: %s; keeping the configured value", e)
		}
	}
	for _, w := range cfg.Boot.Warnings {
		r.con.Printf("warning: %s", w)
	}
	r.con.SetDebug(cfg.Boot.Debug)
	r.cfg = cfg
	if err := modload.CheckRelease(o.ImageRoot); err != nil {
		r.con.Printf("modules: %v", err)
	}

	// Stages 3, 4 and the device half of 6 overlap: the network driver and
	// the disk driver load in parallel, DHCP starts as soon as a link
	// exists, and headers are checked while the key is fetched.
	modsDone := make(chan error, 1)
	// Closed once the modules stage ends: a link missing by then is not
	// coming, so a misspelt ip= link name falls back to DHCP at once.
	driversLoaded := make(chan struct{})
	go func() {
		defer close(driversLoaded)
		modsDone <- r.stage(ctx, "modules", o.Timeouts.Modules, func(ctx context.Context) (string, error) {
			mods, err := modload.ReadList(o.ImageRoot)
			if err != nil {
				return "", err
			}
			res, err := modload.Load(ctx, o.ImageRoot, mods, nil, prefixed{r.con, "modules"})
			for _, t := range res.Times {
				r.con.Debugf("modules: %-22s %6.3fs .. %6.3fs", t.Name, t.Start.Seconds(), t.End.Seconds())
			}
			return res.String(), err
		})
	}()
	type prepResult struct {
		vols []volumes.Prepared
		root volumes.BlockDev
		err  error
	}
	prepDone := make(chan prepResult, 1)
	go func() {
		var pr prepResult
		// rd.unlockrd.device-timeout= shortens the wait (a test with a
		// missing disk need not wait two minutes).
		devTimeout := o.Timeouts.Devices
		if cfg.Boot.DeviceTimeout > 0 {
			devTimeout = cfg.Boot.DeviceTimeout
		}
		pr.err = r.stage(ctx, "devices", devTimeout, func(ctx context.Context) (string, error) {
			var err error
			pr.root, pr.vols, err = r.prepare(ctx)
			if err != nil {
				return "", err
			}
			return describePrepared(pr.root, pr.vols), nil
		})
		prepDone <- pr
	}()

	var net *netup.Result
	err = r.stage(ctx, "network", o.Timeouts.Network, func(ctx context.Context) (string, error) {
		n, err := netup.Up(ctx, netup.Config{
			IP:            cfg.Network.IP,
			Nameservers:   cfg.Boot.Nameservers,
			LinkTimeout:   o.Timeouts.Link,
			DriversLoaded: driversLoaded,
			Debug:         cfg.Boot.Debug,
		}, prefixed{r.con, "network"})
		if err != nil {
			return "", err
		}
		net = n
		return net.String(), nil
	})
	if err != nil {
		// Up has retried every link until the deadline; a reboot starts
		// over from the drivers up, where halting would strand the host.
		return &Fatal{Err: err, Reboot: true}
	}

	// Stages 5 and 6: fetch, unlock; fetch again if no key fits (the
	// operator may be fixing the server).
	src := keys.Sources{CmdlineHost: cfg.Boot.Host, CmdlineToken: cfg.Boot.Token}
	// Each source tried and found wanting is reported by name (notes)
	// before the next is tried; see keys.Sources for the order.
	host, hostFrom, notes, err := src.HostID(cfg.Key.Host)
	for _, n := range notes {
		r.con.Printf("key: %s", n)
	}
	if err != nil {
		return &Fatal{Err: fmt.Errorf("key: %w", err)}
	}
	token, tokenFrom, notes, err := src.Token(cfg.Key.Token)
	for _, n := range notes {
		r.con.Printf("key: %s", n)
	}
	if err != nil {
		return &Fatal{Err: fmt.Errorf("key: %w", err)}
	}
	defer clear(token)
	pins, err := pin.ParseAll(cfg.Key.Pins)
	if err != nil {
		return &Fatal{Err: fmt.Errorf("key: pins%w", err)}
	}
	r.con.Debugf("key: host id %s from %s, token from %s", host, hostFrom, tokenFrom)

	if err := <-modsDone; err != nil {
		return &Fatal{Err: err}
	}
	pr := <-prepDone
	if pr.err != nil {
		return &Fatal{Err: pr.err}
	}

	var opened []volumes.Opened
	pending := pr.vols
	for {
		var ks *keys.Keys
		// No stage deadline: Fetch enforces give_up_after itself, so that
		// it can say so (and the host reboots on keys.ErrGaveUp).
		err := r.stage(ctx, "key", 0, func(ctx context.Context) (string, error) {
			var err error
			ks, err = keys.Fetch(ctx, keys.Config{
				URLs:           cfg.Key.URLs,
				Pins:           pins,
				Host:           host,
				Token:          token,
				AttemptTimeout: cfg.Key.AttemptTimeout.D(),
				GiveUpAfter:    cfg.Key.GiveUpAfter.D(),
			}, prefixed{r.con, "key"})
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("%d key(s) for host %s from %s", len(ks.Keys), host, ks.Server), nil
		})
		if err != nil {
			return &Fatal{Err: err, Reboot: errors.Is(err, keys.ErrGaveUp)}
		}
		var got []volumes.Opened
		err = r.stage(ctx, "volumes", 0, func(ctx context.Context) (string, error) {
			var err error
			got, err = volumes.Unlock(ctx, pending, ks.Keys, volumes.Options{}, prefixed{r.con, "volumes"})
			if err != nil {
				return "", err
			}
			var names []string
			for _, g := range got {
				names = append(names, g.Spec.Name)
			}
			return strings.Join(names, ", ") + " unlocked", nil
		})
		ks.Wipe()
		opened = append(opened, got...)
		pending = pending[len(got):]
		if err == nil {
			break
		}
		if !errors.Is(err, volumes.ErrNoKey) {
			return &Fatal{Err: err}
		}
		wait := time.Duration(rand.Int64N(int64(30*time.Second))) + 30*time.Second
		r.con.Printf("%v; fetching the key again in %.1fs", err, wait.Seconds())
		time.Sleep(wait)
	}
	// Wiped here, not only by the deferred clear: on success this function
	// ends in exec, and deferred calls never run.
	clear(token)

	for _, v := range opened {
		if !v.Spec.Swap {
			continue
		}
		err := r.stage(ctx, "swap", 30*time.Second, func(ctx context.Context) (string, error) {
			if err := volumes.EnsureSwap(v.Path, prefixed{r.con, "swap"}); err != nil {
				return "", err
			}
			return v.Path + " enabled", nil
		})
		if err != nil {
			return &Fatal{Err: err}
		}
	}

	// Stage 7.
	err = r.stage(ctx, "mount", o.Timeouts.Mount, func(ctx context.Context) (string, error) {
		root, data := r.mounts(pr.root, opened)
		if err := sysroot.MountAll(ctx, o.NewRoot, root, data); err != nil {
			return "", err
		}
		parts := []string{fmt.Sprintf("/ (%s)", strings.TrimSpace(root.Source+" "+strings.Join(root.Options, ",")))}
		for _, d := range data {
			parts = append(parts, fmt.Sprintf("%s (%s)", d.Target, d.Source))
		}
		return strings.Join(parts, ", "), nil
	})
	if err != nil {
		return &Fatal{Err: err}
	}

	// Stage 8.
	if !cfg.Network.Keep {
		if err := net.Teardown(); err != nil {
			r.con.Printf("network: teardown: %v", err)
		}
	}
	r.con.Printf("cleanup: keys wiped, network %s", map[bool]string{true: "kept", false: "removed"}[cfg.Network.Keep])

	// Stage 9.
	r.con.Printf("switch root: exec %s (initramfs %.2fs, since kernel start %.2fs)",
		cfg.Boot.Init, time.Since(initStart).Seconds(), (kernelUptime + time.Since(initStart)).Seconds())
	err = sysroot.SwitchRoot(o.NewRoot, cfg.Boot.Init, []string{
		"HOME=/", "TERM=linux", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	})
	return &Fatal{Err: err}
}

// prepare finds the root device and the volumes and validates headers. An
// encrypted root becomes a volume named "root".
func (r *runner) prepare(ctx context.Context) (volumes.BlockDev, []volumes.Prepared, error) {
	cfg := r.cfg
	var sc volumes.Scanner
	root, rootErr := sc.Wait(ctx, cfg.Root.Device)
	if rootErr != nil {
		rootErr = fmt.Errorf("root: %w", rootErr)
	}
	var specs []volumes.Spec
	if root.Content == "LUKS2" {
		specs = append(specs, volumes.Spec{Name: "root", Device: cfg.Root.Device, NoWorkqueue: true})
	}
	for _, v := range cfg.Volumes {
		specs = append(specs, volumes.Spec{Name: v.Name, Device: v.Device, Swap: v.Swap.On(),
			RandomSwap: v.Swap == config.SwapRandom, AllowDiscards: v.AllowDiscards, NoWorkqueue: v.WorkqueueBypass()})
	}
	// Volumes are checked even when root is missing: one boot reports
	// every problem.
	vols, err := volumes.Prepare(ctx, specs, volumes.Options{Scanner: sc}, prefixed{r.con, "devices"})
	return root, vols, errors.Join(rootErr, err)
}

func describePrepared(root volumes.BlockDev, vols []volumes.Prepared) string {
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
func (r *runner) mounts(rootDev volumes.BlockDev, opened []volumes.Opened) (sysroot.Mount, []sysroot.Mount) {
	cfg := r.cfg
	byName := map[string]volumes.Opened{}
	for _, o := range opened {
		byName[o.Spec.Name] = o
	}
	root := sysroot.Mount{Source: rootDev.Path, Target: "/", FSType: cfg.Root.FSType, Options: cfg.Root.Options}
	if o, ok := byName["root"]; ok {
		root.Source = o.Path
	}
	if root.FSType == "" && rootDev.Content != "LUKS2" && rootDev.Content != "" {
		root.FSType = rootDev.Content
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
