// Package volumes is boot stage 6: it finds the configured devices,
// validates each LUKS2 header before any key is tried, unlocks the volumes
// with the first key that opens them, and brings swap up.
//
// Nothing here writes to a device it could not unlock: the only write is
// a swap signature inside an unlocked swap mapping, or inside a fresh
// random-key mapping of a partition that carries no known signature.
package volumes

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/dm"
	"github.com/unlockrd/unlockrd/unlock/luks2"
	"github.com/unlockrd/unlockrd/unlock/secret"

	"golang.org/x/sys/unix"
)

// Spec is one volume to open.
type Spec struct {
	Name   string // mapper name
	Device string // device reference (UUID=, PARTLABEL=, ... or /dev/...)
	Swap   bool
	// RandomSwap maps the partition with plain dm-crypt and a fresh random
	// key every boot (`swap: random`): nothing on it survives a reboot.
	RandomSwap bool
	// AllowDiscards passes discards through; off unless configured.
	AllowDiscards bool
	// NoWorkqueue sets no-read-workqueue and no-write-workqueue (kernels
	// ≥ 5.9): on virtual disks the extra queueing only adds latency.
	NoWorkqueue bool
}

// Prepared is a device found and a header validated, ready for keys.
type Prepared struct {
	Spec   Spec
	Dev    blockdev.BlockDev
	Header *luks2.Header // nil for a random-key swap
}

// Opened is an unlocked volume.
type Opened struct {
	Spec Spec
	Path string // /dev/mapper/<name>
	Slot int    // keyslot that opened it (-1 for a random-key swap)
	Key  int    // index of the key that opened it (-1 for a random-key swap)
	// Table is the dm table loaded, key hidden.
	Table string
}

// Options tune Prepare and Unlock.
type Options struct {
	Scanner blockdev.Scanner
	Policy  luks2.Policy
	// MapperDir is where /dev/mapper/<name> nodes are made (default
	// /dev/mapper): without udev nobody else makes them.
	MapperDir string
	// KernelRelease decides whether the workqueue flags are supported;
	// empty reads uname.
	KernelRelease string
}

// Prepare waits for every device and validates its header. It needs no key,
// so it can run while the network comes up. Every volume is checked even
// after one fails, so one boot reports every problem; the error joins them.
func Prepare(ctx context.Context, specs []Spec, opt Options, log ulog.Logger) ([]Prepared, error) {
	out := make([]Prepared, 0, len(specs))
	var errs []error
	seen := map[string]string{}
	for _, s := range specs {
		p, err := prepareOne(ctx, s, opt, log)
		if err == nil {
			if other, dup := seen[p.Dev.Path]; dup {
				err = fmt.Errorf("volume %s: %s is also volume %s", s.Name, p.Dev.Path, other)
			}
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		seen[p.Dev.Path] = s.Name
		out = append(out, p)
	}
	if len(errs) > 0 {
		return out, errors.Join(errs...)
	}
	return out, nil
}

func prepareOne(ctx context.Context, s Spec, opt Options, log ulog.Logger) (Prepared, error) {
	dev, err := opt.Scanner.Wait(ctx, s.Device)
	if err != nil {
		return Prepared{}, fmt.Errorf("volume %s: %w", s.Name, err)
	}
	if s.RandomSwap {
		if err := CheckRandomSwap(s.Device, dev); err != nil {
			return Prepared{}, fmt.Errorf("volume %s on %s: %w; not touching it", s.Name, dev.Path, err)
		}
		return Prepared{Spec: s, Dev: dev}, nil
	}
	f, err := os.Open(dev.Path)
	if err != nil {
		return Prepared{}, fmt.Errorf("volume %s: %w", s.Name, err)
	}
	h, err := luks2.ReadHeader(f)
	f.Close()
	if err != nil {
		return Prepared{}, fmt.Errorf("volume %s on %s: %w; no key will be tried on it", s.Name, dev.Path, err)
	}
	pol := opt.Policy
	if len(pol.Ciphers) == 0 {
		pol = luks2.DefaultPolicy()
	}
	if k, v, _ := strings.Cut(s.Device, "="); k == "UUID" {
		pol.UUID = v
	}
	if err := pol.Validate(h); err != nil {
		return Prepared{}, fmt.Errorf("volume %s on %s: %w; no key will be tried on it", s.Name, dev.Path, err)
	}
	if h.Secondary {
		log.Printf("volume %s on %s: primary LUKS header damaged (%v), using the intact secondary copy", s.Name, dev.Path, h.PrimaryErr)
	}
	return Prepared{Spec: s, Dev: dev, Header: h}, nil
}

// ErrNoKey is wrapped when no key opens a volume (luks2.ErrNoKey, named
// here for the stage's callers).
var ErrNoKey = luks2.ErrNoKey

// Unlock opens every prepared volume with the first key that fits, in
// order, and stops at the first that fails: the opened ones are returned
// so a retry can skip them. The keys stay the caller's to wipe; every
// volume key is wiped here once its mapping is loaded (or has failed).
func Unlock(ctx context.Context, vols []Prepared, keys []*secret.Buf, opt Options, log ulog.Logger) ([]Opened, error) {
	var out []Opened
	for _, p := range vols {
		o, err := unlockOne(ctx, p, keys, opt)
		if err != nil {
			return out, err
		}
		if o.Key < 0 {
			log.Printf("volume %s: %s mapped with a fresh random key -> %s (%s)", p.Spec.Name, p.Dev.Path, o.Path, o.Table)
		} else {
			log.Printf("volume %s: %s opened with key %d of %d, keyslot %d -> %s (%s)", p.Spec.Name, p.Dev.Path, o.Key+1, len(keys), o.Slot, o.Path, o.Table)
		}
		out = append(out, o)
	}
	return out, nil
}

// flags returns the dm-crypt options for s.
func (s Spec) flags(release string) []string {
	var f []string
	if s.AllowDiscards {
		f = append(f, "allow_discards")
	}
	if s.NoWorkqueue && kernelAtLeast(release, 5, 9) {
		f = append(f, "no_read_workqueue", "no_write_workqueue")
	}
	return f
}

func unlockOne(ctx context.Context, p Prepared, keys []*secret.Buf, opt Options) (Opened, error) {
	if p.Spec.RandomSwap {
		return randomSwap(p, opt)
	}
	name := p.Spec.Name
	f, err := os.Open(p.Dev.Path)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s: %w", name, err)
	}
	defer f.Close()
	key, slot, ki, err := luks2.FindKey(ctx, f, p.Header, keys)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: %w", name, p.Dev.Path, err)
	}
	defer key.Wipe()
	size, err := blockSize(f)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: size: %w", name, p.Dev.Path, err)
	}
	seg := p.Header.Segments[0]
	length, err := seg.SizeBytes(int64(size))
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: %w: %v", name, p.Dev.Path, luks2.ErrRefused, err)
	}
	t := dm.CryptTable{
		Name:       name,
		UUID:       fmt.Sprintf("CRYPT-LUKS2-%s-%s", strings.ReplaceAll(p.Header.UUID, "-", ""), name),
		Cipher:     seg.Encryption,
		Key:        key,
		IVOffset:   seg.IVTweak,
		Device:     p.Dev.Path,
		Offset:     seg.Offset,
		Length:     length,
		SectorSize: seg.SectorSize,
		Flags:      p.Spec.flags(opt.KernelRelease),
	}
	return activate(t, p, opt, slot, ki)
}

func activate(t dm.CryptTable, p Prepared, opt Options, slot, ki int) (Opened, error) {
	if err := dm.Create(t); err != nil {
		return Opened{}, fmt.Errorf("volume %s: device-mapper: %w", t.Name, err)
	}
	path, err := mapperNode(opt.MapperDir, t.Name)
	if err != nil {
		_ = dm.Remove(t.Name)
		return Opened{}, fmt.Errorf("volume %s: %w", t.Name, err)
	}
	return Opened{Spec: p.Spec, Path: path, Slot: slot, Key: ki, Table: t.Describe()}, nil
}

// mapperNode makes /dev/mapper/<name> for the dm device with that name:
// without udev only /dev/dm-N exists.
func mapperNode(dir, name string) (string, error) {
	if dir == "" {
		dir = "/dev/mapper"
	}
	path := filepath.Join(dir, name)
	var dev string
	deadline := time.Now().Add(5 * time.Second)
	for dev == "" {
		ents, _ := filepath.Glob("/sys/block/dm-*/dm/name")
		for _, e := range ents {
			b, err := os.ReadFile(e)
			if err == nil && strings.TrimSpace(string(b)) == name {
				d, err := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(e)), "dev"))
				if err == nil {
					dev = strings.TrimSpace(string(d))
				}
			}
		}
		if dev == "" {
			if time.Now().After(deadline) {
				return "", fmt.Errorf("mapping %s does not appear in /sys/block", name)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	var maj, min uint32
	if _, err := fmt.Sscanf(dev, "%d:%d", &maj, &min); err != nil {
		return "", fmt.Errorf("mapping %s: bad dev %q", name, dev)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	_ = os.Remove(path)
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(unix.Mkdev(maj, min))); err != nil {
		return "", fmt.Errorf("mknod %s: %w", path, err)
	}
	return path, nil
}

// kernelAtLeast compares a release like "6.1.0-48-amd64".
func kernelAtLeast(release string, major, minor int) bool {
	if release == "" {
		var u unix.Utsname
		if unix.Uname(&u) != nil {
			return false
		}
		release = unix.ByteSliceToString(u.Release[:])
	}
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}
