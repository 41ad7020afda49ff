package volumes

// The volume lifecycle: first-boot provisioning (a blank device formatted
// with the host's new key) and key rotation that completes itself (a
// volume moved from the old key to the next one). Both write to the
// device, so both follow one rule: nothing is written before the checks
// that allow it passed, immediately before the write, and every write is
// a step after which a power cut leaves a device the next boot finishes.
//
// Provisioning, in this order (DESIGN §6, "First-boot provisioning"):
//
//  1. luks2.BeginFormat: the format marker where the secondary header's
//     binary header goes. From here the device is no longer blank, but
//     luks2.Unfinished recognises it as ours and unfinished, so the next
//     boot starts over.
//  2. a fresh random volume key, a dm-crypt mapping over the data segment
//     luks2.Layout gives (the last MiB stays outside it: TailReserve), and
//     mke2fs through the mapping (data volumes; swap gets its signature
//     later, as every boot does).
//  3. luks2.Format commits the header: keyslot area, secondary, primary.
//     Before the secondary's binary header lands the device is still
//     Unfinished; after it, a complete volume that opens with the key.
//  4. the boot tells the key server (keys.Confirm); a cut before that
//     leaves a volume that opens while the server still says "new", and
//     the next boot only confirms.
//
// The file system is made before the header is committed, so a volume
// that opens always holds a file system: a cut between the two leaves
// the device Unfinished, never a LUKS2 volume with nothing inside.
//
// Rotation: the volume opens only with an older key → luks2.AddKeyslot
// for the current key → FindKey checks the current key opens it →
// luks2.RemoveKeyslot of the older key's slot. A cut anywhere leaves a
// volume that opens with the old key, the new one or both; the next boot
// picks up from what it finds.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/unlockrd/unlockrd/unlock/blank"
	"github.com/unlockrd/unlockrd/unlock/dm"
	"github.com/unlockrd/unlockrd/unlock/luks2"
	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/sys/unix"
)

// Flows that write, as fault injection names them.
const (
	FlowProvision = "provision"
	FlowRotate    = "rotate"
)

// Faults is the fault-injection hook of test images (mkunlockrd build
// --test-faults): Step is called before every write step of a flow with
// the step's number (from 1, counted per flow) and what it writes. The
// init powers the machine off at the step the kernel command line names.
// nil in production.
type Faults interface {
	Step(flow, what string)
}

// Lifecycle is what the key server said, for the writing flows.
type Lifecycle struct {
	// New: the current key (keys[0]) was never used to format anything;
	// only then is a blank device with Spec.Provision formatted.
	New bool
	// Rotating: keys are [next, old...]; a volume that opens only with
	// an older key is moved to keys[0].
	Rotating bool
	Faults   Faults
}

func (l Lifecycle) step(flow, what string) {
	if l.Faults != nil {
		l.Faults.Step(flow, what)
	}
}

// ProvisionMkfs is the mke2fs the image carries (layout.Mke2fsPath).
const ProvisionMkfs = "/usr/sbin/mke2fs"

// formatOptions are the luks2 options a provisioned volume gets; the same
// on every boot for the same device, so that luks2.Unfinished judges an
// interrupted format with the layout it was begun with.
func formatOptions(size int64) luks2.FormatOptions {
	ss := 4096
	if size%4096 != 0 {
		ss = 512
	}
	return luks2.FormatOptions{SectorSize: ss, TailReserve: blank.Reserved}
}

// checkFresh is the positive evidence a provisioning write needs: the
// device is blank (unlock/blank), or holds our own unfinished format and
// nothing else (luks2.Unfinished). It says which, or why neither.
func checkFresh(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	size, err := deviceSize(f)
	if err != nil {
		return "", fmt.Errorf("size: %w", err)
	}
	errBlank := blank.Check(f, int64(size))
	what := "blank"
	if errBlank != nil {
		if int64(size) < blank.MinSize || luks2.Unfinished(f, int64(size), formatOptions(int64(size))) != nil {
			return "", errBlank // what is there, not what we would have done
		}
		what = "an unfinished format of ours"
	}
	if _, err := luks2.Layout(int64(size), formatOptions(int64(size))); err != nil {
		return "", err
	}
	return what, nil
}

// faultDev counts every write to the device as a step of flow.
type faultDev struct {
	*os.File
	lc   Lifecycle
	flow string
}

func (d faultDev) WriteAt(b []byte, off int64) (int, error) {
	d.lc.step(d.flow, fmt.Sprintf("write %d bytes at %d", len(b), off))
	return d.File.WriteAt(b, off)
}

// provision formats a fresh device (see the top of this file) and leaves
// its mapping open. The key is keys[0]; the checks run again right here.
func provision(ctx context.Context, p Prepared, key *secret.Buf, lc Lifecycle, opt Options) (Opened, string, error) {
	name := p.Spec.Name
	fail := func(err error) (Opened, string, error) {
		return Opened{}, "", fmt.Errorf("volume %s on %s: provisioning: %w", name, p.Dev.Path, err)
	}
	what, err := checkFresh(p.Dev.Path)
	if err != nil {
		return fail(fmt.Errorf("%w: %w; not touching it", ErrNotBlank, err))
	}
	f, err := os.OpenFile(p.Dev.Path, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		return fail(err)
	}
	defer f.Close()
	dev := faultDev{File: f, lc: lc, flow: FlowProvision}
	n, err := blockSize(f)
	if err != nil {
		return fail(fmt.Errorf("size: %w", err))
	}
	size := int64(n)
	fo := formatOptions(size)
	if fo.UUID, err = newUUID(); err != nil {
		return fail(err)
	}
	fo.Label = name
	l, err := luks2.BeginFormat(ctx, dev, size, fo)
	if err != nil {
		return fail(err)
	}
	vk, err := luks2.NewVolumeKey(nil)
	if err != nil {
		return fail(err)
	}
	defer vk.Wipe()
	t := dm.CryptTable{
		Name:       name,
		UUID:       fmt.Sprintf("CRYPT-LUKS2-%s-%s", strings.ReplaceAll(fo.UUID, "-", ""), name),
		Cipher:     l.Cipher,
		Key:        vk,
		Device:     p.Dev.Path,
		Offset:     l.Offset,
		Length:     l.Size,
		SectorSize: l.SectorSize,
		Flags:      p.Spec.flags(opt.KernelRelease),
	}
	// The mapping needs the device free of our exclusive open.
	f.Close()
	o, err := activate(t, p, opt, 0, 0)
	if err != nil {
		return fail(err)
	}
	undo := func(err error) (Opened, string, error) {
		_ = dm.Remove(name)
		return fail(err)
	}
	fs := "swap (signature written when enabled)"
	if !p.Spec.Swap {
		lc.step(FlowProvision, "mke2fs")
		if err := mkfs(ctx, o.Path, name); err != nil {
			return undo(err)
		}
		fs = "ext4"
	}
	f, err = os.OpenFile(p.Dev.Path, os.O_RDWR, 0)
	if err != nil {
		return undo(err)
	}
	defer f.Close()
	dev.File = f
	if _, err := luks2.Format(ctx, dev, size, vk, key, fo); err != nil {
		return undo(err)
	}
	return o, fmt.Sprintf("was %s: formatted LUKS2 (UUID %s, %d-byte sectors, keyslot 0 for key 1) with %s", what, fo.UUID, l.SectorSize, fs), nil
}

// mkfs makes the ext4 file system of a provisioned data volume. Lazy
// inode-table initialisation: the kernel finishes it in the background
// after mount, so a large disk does not hold up the first boot.
func mkfs(ctx context.Context, path, label string) error {
	cmd := exec.CommandContext(ctx, ProvisionMkfs, "-q", "-t", "ext4", "-L", label,
		"-E", "lazy_itable_init=1,nodiscard", path)
	// No /etc/mke2fs.conf in the image: mke2fs takes its built-in
	// defaults, the same Debian ships in that file (ext4: has_journal,
	// extent, huge_file, flex_bg, metadata_csum, 64bit, dir_nlink,
	// extra_isize).
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("mke2fs %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newUUID() (string, error) {
	u := make([]byte, 16)
	if _, err := io.ReadFull(rand.Reader, u); err != nil {
		return "", err
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}

// rereadHeader reads and validates the header again right before a write:
// Prepare ran a while ago.
func rereadHeader(f *os.File, p Prepared, opt Options) (*luks2.Header, error) {
	h, err := luks2.ReadHeader(f)
	if err != nil {
		return nil, err
	}
	pol := opt.Policy
	if len(pol.Ciphers) == 0 {
		pol = luks2.DefaultPolicy()
	}
	if k, v, _ := strings.Cut(p.Spec.Device, "="); k == "UUID" {
		pol.UUID = v
	}
	if err := pol.Validate(h); err != nil {
		return nil, err
	}
	return h, nil
}

// rotate moves a volume that opens with an older key (vk found with
// keys[ki] at slot) to keys[0], or drops the older keys' slots when
// keys[0] opens it already. It returns what it did ("" for nothing).
func rotate(ctx context.Context, p Prepared, keys []*secret.Buf, vk *secret.Buf, ki int, lc Lifecycle, opt Options) (string, error) {
	f, err := os.OpenFile(p.Dev.Path, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	dev := faultDev{File: f, lc: lc, flow: FlowRotate}
	h, err := rereadHeader(f, p, opt)
	if err != nil {
		return "", fmt.Errorf("header changed since it was checked: %w; not writing", err)
	}
	var did []string
	if ki > 0 {
		id, nh, err := luks2.AddKeyslot(ctx, dev, h, vk, keys[0], nil)
		if err != nil {
			return "", err
		}
		h = nh
		did = append(did, fmt.Sprintf("added keyslot %d for key 1", id))
	}
	// The current key must open it before anything is removed.
	check, newSlot, _, err := luks2.FindKey(ctx, f, h, keys[:1])
	if err != nil {
		return strings.Join(did, ", "), fmt.Errorf("key 1 does not open it after adding its keyslot: %w; older keyslots kept", err)
	}
	check.Wipe()
	// Every keyslot an older key opens goes, one by one, each a complete
	// header update.
	for _, old := range keys[1:] {
		for {
			k, slot, _, err := luks2.FindKey(ctx, f, h, []*secret.Buf{old})
			if errors.Is(err, luks2.ErrNoKey) {
				break
			}
			if err != nil {
				return strings.Join(did, ", "), err
			}
			k.Wipe()
			if slot == newSlot {
				return strings.Join(did, ", "), fmt.Errorf("keyslot %d opens with key 1 and an older key; not removing it", slot)
			}
			if h, err = luks2.RemoveKeyslot(ctx, dev, h, slot, nil); err != nil {
				return strings.Join(did, ", "), err
			}
			did = append(did, fmt.Sprintf("removed keyslot %d of the older key", slot))
		}
	}
	if h.Secondary || h.PrimaryErr != nil {
		// Both copies agree again after any of the updates above; with
		// nothing to update, AddKeyslot's repair path rewrites them.
		if _, nh, err := luks2.AddKeyslot(ctx, dev, h, vk, keys[0], nil); err == nil {
			h = nh
			did = append(did, "rewrote both header copies")
		}
	}
	return strings.Join(did, ", "), nil
}

// repairPrimary rewrites both header copies of a provisioned volume whose
// format was cut after the secondary copy: it opens, the primary is
// missing. AddKeyslot with the key that opens it only makes the copies
// agree (luks2's repair path).
func repairPrimary(ctx context.Context, p Prepared, key, vk *secret.Buf, lc Lifecycle, opt Options) error {
	f, err := os.OpenFile(p.Dev.Path, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	h, err := rereadHeader(f, p, opt)
	if err != nil {
		return err
	}
	_, _, err = luks2.AddKeyslot(ctx, faultDev{File: f, lc: lc, flow: FlowProvision}, h, vk, key, nil)
	return err
}

// deviceSize is a block device's size, or an image file's.
func deviceSize(f *os.File) (uint64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return uint64(fi.Size()), nil
	}
	return blockSize(f)
}
