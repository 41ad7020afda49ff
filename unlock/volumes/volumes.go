// Package volumes is boot stage 6: it finds the configured devices,
// validates each LUKS2 header before any key is tried, unlocks the volumes
// with the first key that opens them, and brings swap up.
//
// Nothing here writes to a device it could not unlock: the only write is
// a swap signature inside an unlocked swap mapping.
package volumes

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/anatol/luks.go"
	"golang.org/x/sys/unix"
)

// Logger receives one line per volume.
type Logger interface {
	Printf(format string, v ...any)
}

// Spec is one volume to open.
type Spec struct {
	Name   string // mapper name
	Device string // device reference (UUID=, PARTLABEL=, ... or /dev/...)
	Swap   bool
	// AllowDiscards passes discards through; off unless configured.
	AllowDiscards bool
	// NoWorkqueue sets no-read-workqueue and no-write-workqueue (kernels
	// ≥ 5.9): on virtual disks the extra queueing only adds latency.
	NoWorkqueue bool
}

// Prepared is a device found and a header validated, ready for keys.
type Prepared struct {
	Spec   Spec
	Dev    BlockDev
	Header *Header
}

// Opened is an unlocked volume.
type Opened struct {
	Spec Spec
	Path string // /dev/mapper/<name>
	Slot int    // keyslot that opened it
	Key  int    // index of the key that opened it
}

// Options tune Prepare and Unlock.
type Options struct {
	Scanner Scanner
	Policy  Policy
	// MapperDir is where /dev/mapper/<name> nodes are made (default
	// /dev/mapper): without udev nobody else makes them.
	MapperDir string
	// KernelRelease decides whether the workqueue flags are supported;
	// empty reads uname.
	KernelRelease string
}

// Prepare waits for every device and validates its header. It needs no key,
// so it can run while the network comes up.
func Prepare(ctx context.Context, specs []Spec, opt Options, log Logger) ([]Prepared, error) {
	out := make([]Prepared, 0, len(specs))
	for _, s := range specs {
		dev, err := opt.Scanner.Wait(ctx, s.Device)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", s.Name, err)
		}
		f, err := os.Open(dev.Path)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", s.Name, err)
		}
		h, err := ReadHeader(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("volume %s on %s: %w", s.Name, dev.Path, err)
		}
		pol := opt.Policy
		if len(pol.Ciphers) == 0 {
			pol = DefaultPolicy()
		}
		if k, v, _ := strings.Cut(s.Device, "="); k == "UUID" {
			pol.UUID = v
		}
		if err := pol.Validate(h); err != nil {
			return nil, fmt.Errorf("volume %s on %s: %w", s.Name, dev.Path, err)
		}
		if h.Secondary {
			log.Printf("volume %s on %s: primary LUKS header damaged, using the intact secondary copy", s.Name, dev.Path)
		}
		out = append(out, Prepared{Spec: s, Dev: dev, Header: h})
	}
	return out, nil
}

// ErrNoKey is wrapped when no key opens a volume.
var ErrNoKey = errors.New("no key opens the volume")

// Unlock opens every prepared volume with the first key that fits.
func Unlock(ctx context.Context, vols []Prepared, keys [][]byte, opt Options, log Logger) ([]Opened, error) {
	var out []Opened
	for _, p := range vols {
		o, err := unlockOne(ctx, p, keys, opt)
		if err != nil {
			return out, err
		}
		log.Printf("volume %s: %s opened with key %d, keyslot %d -> %s", p.Spec.Name, p.Dev.Path, o.Key+1, o.Slot, o.Path)
		out = append(out, o)
	}
	return out, nil
}

func unlockOne(ctx context.Context, p Prepared, keys [][]byte, opt Options) (Opened, error) {
	name := p.Spec.Name
	dev, err := luks.Open(p.Dev.Path)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: %w", name, p.Dev.Path, err)
	}
	defer dev.Close()
	if dev.UUID() != p.Header.UUID {
		// luks.go parsed a different header than the one we validated.
		return Opened{}, fmt.Errorf("volume %s on %s: %w: header changed after validation", name, p.Dev.Path, ErrRefused)
	}
	dev.FlagsClear()
	var flags []string
	if p.Spec.NoWorkqueue && kernelAtLeast(opt.KernelRelease, 5, 9) {
		flags = append(flags, luks.FlagNoReadWorkqueue, luks.FlagNoWriteWorkqueue)
	}
	if p.Spec.AllowDiscards {
		flags = append(flags, luks.FlagAllowDiscards)
	}
	if err := dev.FlagsAdd(flags...); err != nil {
		return Opened{}, fmt.Errorf("volume %s: flags: %w", name, err)
	}
	v, slot, ki, err := findKey(ctx, dev, p.Header, keys)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: %w", name, p.Dev.Path, err)
	}
	err = checkVolume(v, p.Header)
	if err == nil {
		err = v.SetupMapper(name)
	}
	wipeVolumeKey(v)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s: device-mapper: %w", name, err)
	}
	path, err := mapperNode(opt.MapperDir, name)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s: %w", name, err)
	}
	return Opened{Spec: p.Spec, Path: path, Slot: slot, Key: ki}, nil
}

// findKey tries every key on every usable keyslot, keys in server order
// (current first) and slots by priority. It only reads the device.
func findKey(ctx context.Context, dev luks.Device, h *Header, keys [][]byte) (*luks.Volume, int, int, error) {
	slots := h.SlotOrder()
	for ki, key := range keys {
		for _, slot := range slots {
			if err := ctx.Err(); err != nil {
				return nil, 0, 0, err
			}
			v, err := dev.UnsealVolume(slot, key)
			if errors.Is(err, luks.ErrPassphraseDoesNotMatch) {
				continue
			}
			if err != nil {
				return nil, 0, 0, fmt.Errorf("keyslot %d: %w", slot, err)
			}
			return v, slot, ki, nil
		}
	}
	return nil, 0, 0, fmt.Errorf("%w (%d keys tried on %d keyslots); nothing was written to it", ErrNoKey, len(keys), len(slots))
}

// checkVolume compares what luks.go is about to map with the header we
// validated, so that a parser difference cannot smuggle in another cipher.
func checkVolume(v *luks.Volume, h *Header) error {
	if len(h.Segments) != 1 {
		return fmt.Errorf("%w: %d segments, want 1", ErrRefused, len(h.Segments))
	}
	s := h.Segments[0]
	if v.StorageEncryption != s.Encryption || int64(v.StorageOffset) != s.Offset || int(v.StorageSectorSize) != s.SectorSize {
		return fmt.Errorf("%w: mapping parameters differ from the validated header", ErrRefused)
	}
	if n := len(volumeKey(v)); n*8 < 256 {
		return fmt.Errorf("%w: %d-bit volume key", ErrRefused, n*8)
	}
	return nil
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
