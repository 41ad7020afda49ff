package volumes

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/unlock/blank"
	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/dm"
	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/sys/unix"
)

// swapPage is the page size the swap header is laid out for (x86-64).
const swapPage = 4096

// EnsureSwap writes a swap signature into an unlocked swap mapping that
// lacks one, then enables it. It is only ever called on a mapping this
// stage opened with a key, so the write goes through dm-crypt into space
// reserved for swap.
func EnsureSwap(path string, log ulog.Logger) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		return fmt.Errorf("swap %s: %w", path, err)
	}
	defer f.Close()
	page := make([]byte, swapPage)
	if _, err := f.ReadAt(page, 0); err != nil {
		return fmt.Errorf("swap %s: read header: %w", path, err)
	}
	if string(page[swapPage-10:]) != "SWAPSPACE2" {
		size, err := blockSize(f)
		if err != nil {
			return fmt.Errorf("swap %s: size: %w", path, err)
		}
		hdr, err := swapHeader(size)
		if err != nil {
			return fmt.Errorf("swap %s: %w", path, err)
		}
		if _, err := f.WriteAt(hdr, 0); err != nil {
			return fmt.Errorf("swap %s: write signature: %w", path, err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("swap %s: sync: %w", path, err)
		}
		log.Printf("%s: no signature inside the unlocked mapping, wrote one (%d MiB)", path, size>>20)
	}
	f.Close()
	if err := swapon(path); err != nil {
		return fmt.Errorf("swapon %s: %w", path, err)
	}
	return nil
}

// swapHeader lays out a version-1 swap header (what mkswap writes): boot
// block, then version, last page, bad-page count, UUID and label, with the
// magic at the end of the first page.
func swapHeader(size uint64) ([]byte, error) {
	pages := size / swapPage
	if pages < 10 {
		return nil, fmt.Errorf("%d bytes is too small for swap", size)
	}
	// The header counts pages in 32 bits; the kernel ignores the rest.
	pages = min(pages, 1<<32)
	h := make([]byte, swapPage)
	binary.LittleEndian.PutUint32(h[1024:], 1)               // version
	binary.LittleEndian.PutUint32(h[1028:], uint32(pages-1)) // last_page
	binary.LittleEndian.PutUint32(h[1032:], 0)               // nr_badpages
	if _, err := rand.Read(h[1036:1052]); err != nil {       // uuid
		return nil, err
	}
	h[1036+6] = h[1036+6]&0x0f | 0x40
	h[1036+8] = h[1036+8]&0x3f | 0x80
	copy(h[swapPage-10:], "SWAPSPACE2")
	return h, nil
}

// blockSize asks the kernel for a block device's size in bytes.
func blockSize(f *os.File) (uint64, error) {
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, errno
	}
	return size, nil
}

func swapon(path string) error {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	if _, _, errno := unix.Syscall(unix.SYS_SWAPON, uintptr(unsafe.Pointer(p)), 0, 0); errno != 0 {
		return errno
	}
	return nil
}

// ErrNotBlank is wrapped when `swap: random` is configured on a device
// that is named loosely or holds something.
var ErrNotBlank = errors.New("refusing random-key swap")

// CheckRandomSwap decides whether ref/dev may be mapped with a throwaway
// key (and so overwritten). Only a partition named exactly (PARTUUID= or
// PARTLABEL=, which a file system inside cannot fake) that carries no
// known signature qualifies: a wrong reference must not destroy data.
func CheckRandomSwap(ref string, dev blockdev.BlockDev) error {
	k, _, _ := strings.Cut(ref, "=")
	if k != "PARTUUID" && k != "PARTLABEL" {
		return fmt.Errorf("%w: %s is not a PARTUUID= or PARTLABEL= reference", ErrNotBlank, ref)
	}
	if dev.PartN == 0 {
		return fmt.Errorf("%w: %s is not a partition", ErrNotBlank, dev.Path)
	}
	if dev.Content.Kind != blockdev.Blank {
		return fmt.Errorf("%w: %s holds %s", ErrNotBlank, dev.Path, dev.Content)
	}
	return checkBlank(dev.Path)
}

// checkBlank asks unlock/blank, which wants positive evidence that
// nothing is there (the probe only recognises what it knows).
func checkBlank(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrNotBlank, path, err)
	}
	defer f.Close()
	n, err := deviceSize(f)
	if err != nil {
		return fmt.Errorf("%w: %s: size: %v", ErrNotBlank, path, err)
	}
	size := int64(n)
	if err := blank.Check(f, size); err != nil {
		return fmt.Errorf("%w: %s holds something: %w", ErrNotBlank, path, err)
	}
	return nil
}

// randomSwap maps a blank partition with plain dm-crypt and a key that
// exists only in this boot's memory: swap contents die with the boot.
func randomSwap(p Prepared, opt Options) (Opened, error) {
	name := p.Spec.Name
	// Look again right before writing: Prepare ran a while ago.
	if c, _, _ := blockdev.Probe(p.Dev.Path); c.Kind != blockdev.Blank {
		return Opened{}, fmt.Errorf("volume %s on %s: %w: it now holds %s; not touching it", name, p.Dev.Path, ErrNotBlank, c)
	}
	if err := checkBlank(p.Dev.Path); err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: %w; not touching it", name, p.Dev.Path, err)
	}
	f, err := os.Open(p.Dev.Path)
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s: %w", name, err)
	}
	size, err := blockSize(f)
	f.Close()
	if err != nil {
		return Opened{}, fmt.Errorf("volume %s on %s: size: %w", name, p.Dev.Path, err)
	}
	ss := int64(4096)
	if size%4096 != 0 {
		ss = 512
	}
	key := secret.New(64)
	defer key.Wipe()
	if _, err := rand.Read(key.Bytes()); err != nil {
		return Opened{}, fmt.Errorf("volume %s: random key: %w", name, err)
	}
	t := dm.CryptTable{
		Name:   name,
		UUID:   "CRYPT-PLAIN-" + name,
		Cipher: "aes-xts-plain64",
		Key:    key,
		Device: p.Dev.Path,
		// The first and last MiB stay out of the mapping, so they stay
		// zero and the device is still blank by unlock/blank next boot.
		Offset:     blank.Reserved,
		Length:     (int64(size) - 2*blank.Reserved) / ss * ss,
		SectorSize: int(ss),
		Flags:      p.Spec.flags(opt.KernelRelease),
	}
	return activate(t, p, opt, -1, -1)
}
