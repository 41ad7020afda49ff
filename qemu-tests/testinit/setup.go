package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
	"golang.org/x/sys/unix"
)

// setup does what an initramfs would have done, for harness self-tests
// that boot this init directly. A real boot test leaves it all empty.
func setup(r *reporter, cfg initcfg.Config) {
	if len(cfg.Modules) > 0 {
		n := 0
		for _, m := range cfg.Modules {
			if err := loadModule(m); err != nil {
				r.printf("setup module %s error=%v", m, err)
				continue
			}
			n++
		}
		r.printf("setup modules loaded=%d", n)
	}
	if len(cfg.Wait) > 0 {
		waitFor(r, cfg.Wait, cfg.WaitSeconds)
	}
	for _, c := range cfg.Crypt {
		dev, err := dmCreateCrypt(c)
		if err != nil {
			r.printf("setup crypt %s error=%v", c.Name, err)
			continue
		}
		r.printf("setup crypt %s dev=%d:%d", c.Name, unix.Major(dev), unix.Minor(dev))
	}
	for _, m := range cfg.Mounts {
		if err := mount(m); err != nil {
			r.printf("setup mount %s error=%v", m.Target, err)
			continue
		}
		r.printf("setup mount %s ok", m.Target)
	}
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

func waitFor(r *reporter, paths []string, seconds int) {
	if seconds <= 0 {
		seconds = 60
	}
	start := time.Now()
	deadline := start.Add(time.Duration(seconds) * time.Second)
	for {
		var missing []string
		for _, p := range paths {
			if !exists(p) {
				missing = append(missing, p)
			}
		}
		if len(missing) == 0 {
			r.printf("setup wait ok (%.2fs)", time.Since(start).Seconds())
			return
		}
		if time.Now().After(deadline) {
			r.printf("setup wait timeout missing=%s", strings.Join(missing, ","))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func mount(m initcfg.Mount) error {
	if err := os.MkdirAll(m.Target, 0o755); err != nil {
		return err
	}
	var flags uintptr
	if m.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	return unix.Mount(m.Source, m.Target, m.FSType, flags, m.Data)
}

// mknodMapper creates /dev/mapper/<name>: without udev nobody else does.
func mknodMapper(name string, dev uint64) error {
	p := filepath.Join("/dev/mapper", name)
	_ = os.MkdirAll("/dev/mapper", 0o755)
	_ = os.Remove(p)
	return unix.Mknod(p, unix.S_IFBLK|0o600, int(dev))
}
