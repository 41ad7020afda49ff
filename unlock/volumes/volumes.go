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
	// Provision formats the device when it is blank and the key server
	// says the key is new (see lifecycle.go).
	Provision bool
}

// Prepared is a device found and a header validated, ready for keys.
type Prepared struct {
	Spec   Spec
	Dev    blockdev.BlockDev
	Header *luks2.Header // nil for a random-key swap or a fresh device
	// Fresh says why a device without a LUKS2 header may be provisioned
	// ("blank", or our own unfinished format); empty otherwise.
	Fresh string
}

// Opened is an unlocked volume.
type Opened struct {
	Spec Spec
	Path string // /dev/mapper/<name>
	Slot int    // keyslot that opened it (-1 for a random-key swap)
	Key  int    // index of the key that opened it (-1 for a random-key swap)
	// Table is the dm table loaded, key hidden.
	Table string
	// Did says what was written to the device this boot (provisioned,
	// rotated, header repaired), empty when it was only opened.
	Did string
	// Stale: a rotation was due but an older key still opens it.
	Stale bool
	// Current: it opens with key 1 now (after a rotation: only with key
	// 1), what the key server is told.
	Current bool
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
	if err != nil && s.Provision {
		what, ferr := checkFresh(dev.Path)
		if ferr != nil {
			return Prepared{}, fmt.Errorf("volume %s on %s: %w; and it is not blank, so provision never formats it: %w", s.Name, dev.Path, err, ferr)
		}
		log.Printf("volume %s on %s: no LUKS2 header, %s: formatted if the key server says the key is new", s.Name, dev.Path, what)
		return Prepared{Spec: s, Dev: dev, Fresh: what}, nil
	}
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

// ErrNotNew is wrapped when a fresh device would be provisioned but the
// key server did not say the key is new: it is left alone, and the
// caller may ask again (the operator may fix the host's state).
var ErrNotNew = errors.New("the key server did not say the key is new")

// Unlock opens every prepared volume with the first key that fits, in
// order, and stops at the first that fails: the opened ones are returned
// so a retry can skip them. The keys stay the caller's to wipe; every
// volume key is wiped here once its mapping is loaded (or has failed).
//
// lc says what the key server said: a fresh device (Prepared.Fresh) is
// provisioned only when lc.New; with lc.Rotating a volume that opens with
// an older key is moved to the current one. Each such write is said on
// the console, one line per volume.
func Unlock(ctx context.Context, vols []Prepared, keys []*secret.Buf, lc Lifecycle, opt Options, log ulog.Logger) ([]Opened, error) {
	var out []Opened
	for _, p := range vols {
		o, err := unlockOne(ctx, p, keys, lc, opt, log)
		if err != nil {
			return out, err
		}
		if p.Fresh != "" {
			log.Printf("volume %s: %s provisioned: %s -> %s (%s)", p.Spec.Name, p.Dev.Path, o.Did, o.Path, o.Table)
		} else if o.Key < 0 {
			log.Printf("volume %s: %s mapped with a fresh random key -> %s (%s)", p.Spec.Name, p.Dev.Path, o.Path, o.Table)
		} else {
			log.Printf("volume %s: %s opened with key %d of %d, keyslot %d -> %s (%s)", p.Spec.Name, p.Dev.Path, o.Key+1, len(keys), o.Slot, o.Path, o.Table)
			if o.Did != "" {
				log.Printf("volume %s: %s: %s", p.Spec.Name, p.Dev.Path, o.Did)
			}
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

func unlockOne(ctx context.Context, p Prepared, keys []*secret.Buf, lc Lifecycle, opt Options, log ulog.Logger) (Opened, error) {
	if p.Spec.RandomSwap {
		return randomSwap(p, opt)
	}
	name := p.Spec.Name
	if p.Fresh != "" {
		if !lc.New || len(keys) == 0 {
			return Opened{}, fmt.Errorf("volume %s on %s: %s, provision is set, but %w; not formatting it", name, p.Dev.Path, p.Fresh, ErrNotNew)
		}
		o, did, err := provision(ctx, p, keys[0], lc, opt)
		o.Did, o.Current = did, err == nil
		return o, err
	}
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
	var did string
	stale := false
	switch {
	case lc.Rotating && len(keys) > 1:
		f.Close()
		did, err = rotate(ctx, p, keys, key, ki, lc, opt)
		if err != nil {
			// It still opens with what it has; the next boot tries again.
			log.Printf("volume %s on %s: rotation to key 1 not completed (%v); opening it as it is", name, p.Dev.Path, err)
			stale = true
		}
		if f, err = os.Open(p.Dev.Path); err != nil {
			return Opened{}, fmt.Errorf("volume %s: %w", name, err)
		}
		defer f.Close()
	case p.Spec.Provision && ki == 0 && (p.Header.Secondary || p.Header.PrimaryErr != nil):
		// A format cut after the secondary copy: finish it.
		f.Close()
		if err := repairPrimary(ctx, p, keys[0], key, lc, opt); err != nil {
			log.Printf("volume %s on %s: primary header not rewritten (%v)", name, p.Dev.Path, err)
		} else {
			did = "rewrote the primary header from the secondary"
		}
		if f, err = os.Open(p.Dev.Path); err != nil {
			return Opened{}, fmt.Errorf("volume %s: %w", name, err)
		}
		defer f.Close()
	}
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
	o, err := activate(t, p, opt, slot, ki)
	o.Did, o.Stale = did, stale
	o.Current = (ki == 0 || lc.Rotating) && !stale
	return o, err
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
