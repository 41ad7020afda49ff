// Package blank decides whether a device holds nothing, by positive
// evidence: every place where a known format keeps a superblock, magic or
// label is read and must be all zeroes. It is used before anything is
// mapped with a throwaway key (`swap: random`) and before any first-boot
// formatting, where a wrong answer destroys data, so in doubt (a read
// error, a device too small to judge, any non-zero byte where a format
// could live) the answer is "not blank".
//
// The rule, kept simple so that it can be checked against blkid:
//
//   - the first 1 MiB and the last 1 MiB are all zero. That covers the
//     boot sectors and superblocks of (at least) LUKS1, LUKS2 primaries
//     and the secondaries of metadata sizes up to 512 KiB, ext2/3/4, xfs,
//     btrfs' primary, swap (any page size up to 64 KiB), minix, cramfs,
//     squashfs, erofs, f2fs, vfat, exfat, ntfs, jfs, reiserfs, hfs/hfs+,
//     nilfs2 (both superblocks), bcache, mdraid 0.90/1.0 (at the end) and
//     1.1/1.2 (at the start), LVM2 PV labels, dm-integrity, iso9660, udf
//     (volume recognition, anchors at 256 and at the end), GPT (both
//     tables), MBR, BitLocker and ZFS labels (two at the front, two at
//     the back);
//   - 4 KiB at each further LUKS2 secondary offset (1, 2 and 4 MiB), at
//     the btrfs superblock mirrors (64 MiB, 256 GiB, 1 PiB) and at the
//     ext2/3/4 backup superblocks of block group 1 (8 MiB with 1 KiB
//     blocks... up to 128 MiB with 4 KiB blocks) as far as the size
//     allows, so a format whose primary copy was wiped still counts;
//   - the device is at least MinSize bytes.
//
// Users of a blank device (random-key swap) keep the first and last MiB
// out of what they write, so that the device stays blank by this rule on
// the next boot.
package blank

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Reserved is how much at each end of a device must stay zero.
const Reserved = 1 << 20

// MinSize is the smallest device judged: both reserved ends and some room.
const MinSize = 4 * Reserved

// ErrNotBlank is wrapped by every "not blank" answer.
var ErrNotBlank = errors.New("device is not blank")

// probes are further windows (offset, length) that must be zero when the
// device reaches them: copies of superblocks a format keeps elsewhere.
var probes = []struct {
	name string
	off  int64
	n    int64
}{
	{"LUKS2 secondary header (1 MiB metadata)", 1 << 20, 4096},
	{"LUKS2 secondary header (2 MiB metadata)", 2 << 20, 4096},
	{"LUKS2 secondary header (4 MiB metadata)", 4 << 20, 4096},
	{"ext2/3/4 backup superblock (2 KiB blocks)", 16384 * 2048, 1024},
	{"ext2/3/4 backup superblock (1 KiB blocks)", 8193 * 1024, 1024},
	{"ext2/3/4 backup superblock (4 KiB blocks)", 32768 * 4096, 1024},
	{"btrfs superblock mirror 1", 64 << 20, 4096},
	{"btrfs superblock mirror 2", 256 << 30, 4096},
	{"btrfs superblock mirror 3", 1 << 50, 4096},
}

// magics name what a non-zero region most likely is, for the reason.
var magics = []struct {
	name string
	off  int64
	sig  string
}{
	{"LUKS", 0, "LUKS\xba\xbe"},
	{"LUKS2 secondary header", -1, string(secondaryMagic)},
	{"xfs", 0, "XFSB"},
	{"squashfs", 0, "hsqs"},
	{"cramfs", 0, "E=\xcd\x28"},
	{"cramfs", 512, "E=\xcd\x28"},
	{"dm-integrity", 0, "integrt"},
	{"bitlocker", 3, "-FVE-FS-"},
	{"ntfs", 3, "NTFS    "},
	{"exfat", 3, "EXFAT   "},
	{"vfat", 0x52, "FAT32   "},
	{"vfat", 0x36, "FAT1"},
	{"LVM2 PV", 0x218, "LVM2 001"},
	{"LVM2 PV", 0x418, "LVM2 001"},
	{"GPT", 512, "EFI PART"},
	{"GPT", 4096, "EFI PART"},
	{"ext2/3/4", 1024 + 0x38, "\x53\xef"},
	{"erofs", 1024, "\xe2\xe1\xf5\xe0"},
	{"f2fs", 1024, "\x10\x20\xf5\xf2"},
	{"minix", 1024 + 0x10, "\x7f\x13"},
	{"minix", 1024 + 0x10, "\x8f\x13"},
	{"minix", 1024 + 0x10, "\x68\x24"},
	{"minix", 1024 + 0x10, "\x78\x24"},
	{"minix3", 1024 + 0x18, "\x5a\x4d"},
	{"hfs+", 1024, "H+"},
	{"hfsx", 1024, "HX"},
	{"hfs", 1024, "BD"},
	{"nilfs2", 1024 + 6, "\x34\x34"},
	{"bcache", 4096 + 24, "\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81"},
	{"mdraid 1.2", 4096, "\xfc\x4e\x2b\xa9"},
	{"mdraid 1.1", 0, "\xfc\x4e\x2b\xa9"},
	{"iso9660", 32769, "CD001"},
	{"udf", 32769, "BEA01"},
	{"jfs", 32768, "JFS1"},
	{"btrfs", 65536 + 64, "_BHRfS_M"},
	{"reiserfs", 65536 + 52, "ReIsEr"},
	{"reiserfs", 8192 + 52, "ReIsEr"},
	{"swap", 4096 - 10, "SWAPSPACE2"},
	{"swap", 4096 - 10, "SWAP-SPACE"},
	{"swap", 65536 - 10, "SWAPSPACE2"},
	{"swap", 16384 - 10, "SWAPSPACE2"},
	{"zfs label", 0x2000, "\x0c\xb1\xba\x00\x00\x00\x00\x00"},
	{"MBR", 510, "\x55\xaa"},
}

// Check returns nil when the size bytes of r hold no signature by the
// rule above, or an error wrapping ErrNotBlank that says what was seen
// and where (or why it could not tell).
func Check(r io.ReaderAt, size int64) error {
	if size < MinSize {
		return fmt.Errorf("%w: %d bytes is too small to judge (at least %d)", ErrNotBlank, size, MinSize)
	}
	head := make([]byte, Reserved)
	if err := readFull(r, head, 0); err != nil {
		return err
	}
	if i := nonZero(head); i >= 0 {
		return fmt.Errorf("%w: %s", ErrNotBlank, name(head, 0, i, size))
	}
	tailOff := size - Reserved
	tail := make([]byte, Reserved)
	if err := readFull(r, tail, tailOff); err != nil {
		return err
	}
	if i := nonZero(tail); i >= 0 {
		return fmt.Errorf("%w: %s", ErrNotBlank, name(tail, tailOff, i, size))
	}
	for _, p := range probes {
		if p.off+p.n > size {
			continue
		}
		b := make([]byte, p.n)
		if err := readFull(r, b, p.off); err != nil {
			return err
		}
		if i := nonZero(b); i >= 0 {
			what := p.name
			if bytes.HasPrefix(b, secondaryMagic) {
				what = "LUKS2 secondary header"
			}
			return fmt.Errorf("%w: non-zero data at %d, where a %s would be", ErrNotBlank, p.off+int64(i), what)
		}
	}
	return nil
}

// secondaryMagic starts a LUKS2 secondary header: non-zero data there is
// named as one.
var secondaryMagic = []byte("SKUL\xba\xbe")

func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%w: read %d bytes at %d: %v", ErrNotBlank, len(b), off, err)
}

func nonZero(b []byte) int {
	for i, c := range b {
		if c != 0 {
			return i
		}
	}
	return -1
}

// name says what the non-zero byte at buf[i] (buf starts at device offset
// base) most likely belongs to.
func name(buf []byte, base int64, i int, size int64) string {
	if base == 0 {
		for _, m := range magics {
			if m.off >= 0 && m.off+int64(len(m.sig)) <= int64(len(buf)) && string(buf[m.off:m.off+int64(len(m.sig))]) == m.sig {
				return fmt.Sprintf("%s signature at %d", m.name, m.off)
			}
		}
		for off := int64(16 << 10); off < int64(len(buf)); off *= 2 {
			if bytes.HasPrefix(buf[off:], secondaryMagic) {
				return fmt.Sprintf("LUKS2 secondary header at %d", off)
			}
		}
	} else {
		// The end of a device: md 0.90/1.0 superblocks, GPT backup.
		if size >= 128<<10 {
			if md := (size&^(64<<10-1) - 64<<10) - base; md >= 0 && md+4 <= int64(len(buf)) && binary.LittleEndian.Uint32(buf[md:]) == 0xa92b4efc {
				return fmt.Sprintf("mdraid 0.90 superblock at %d", base+md)
			}
		}
		if bytes.Equal(buf[len(buf)-512:len(buf)-504], []byte("EFI PART")) {
			return fmt.Sprintf("GPT backup header at %d", size-512)
		}
	}
	return fmt.Sprintf("non-zero data at %d", base+int64(i))
}
