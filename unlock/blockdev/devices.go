// Package blockdev finds block devices: it scans /sys/class/block, reads
// GPT names and ids, recognises what each device holds, and waits for the
// device a reference (UUID=, PARTLABEL=, ...) names.
package blockdev

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/u-root/u-root/pkg/mount/gpt"
	"golang.org/x/sys/unix"

	"github.com/unlockrd/unlockrd/unlock/luks2"
)

// BlockDev is one block device seen in /sys/class/block, with what was
// found on it.
type BlockDev struct {
	Name      string // vda1
	Path      string // /dev/vda1
	Parent    string // vda for a partition
	PartN     int
	PartLabel string
	PartUUID  string
	// Content is what the device holds.
	Content Content
	UUID    string // LUKS or file-system UUID
	Label   string // LUKS or file-system label
	Size    int64  // bytes
}

func (b BlockDev) String() string {
	var parts []string
	if b.PartLabel != "" {
		parts = append(parts, "PARTLABEL="+b.PartLabel)
	}
	if b.PartUUID != "" {
		parts = append(parts, "PARTUUID="+b.PartUUID)
	}
	parts = append(parts, b.Content.String())
	if b.Size > 0 {
		parts = append(parts, fmt.Sprintf("%d MiB", b.Size>>20))
	}
	if b.UUID != "" {
		parts = append(parts, "UUID="+b.UUID)
	}
	if b.Label != "" {
		parts = append(parts, "LABEL="+b.Label)
	}
	return b.Path + " (" + strings.Join(parts, " ") + ")"
}

// Scanner finds block devices. The zero value scans the real system.
type Scanner struct {
	SysRoot string // prefix of /sys (default "/")
	DevRoot string // prefix of /dev (default "/")
}

// Scan lists the block devices the kernel knows now, reading each one's
// signatures. Device-mapper devices are skipped: they are ours.
func (s Scanner) Scan() ([]BlockDev, error) {
	sys := filepath.Join(s.root(s.SysRoot), "sys/class/block")
	ents, err := os.ReadDir(sys)
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var out []BlockDev
	gpts := map[string]map[int]gptEntry{}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, "dm-") || strings.HasPrefix(name, "loop") || strings.HasPrefix(name, "ram") {
			continue
		}
		d := BlockDev{Name: name, Path: filepath.Join(s.root(s.DevRoot), "dev", name)}
		ue, _ := os.ReadFile(filepath.Join(sys, name, "uevent"))
		for _, line := range strings.Split(string(ue), "\n") {
			k, v, _ := strings.Cut(line, "=")
			switch k {
			case "PARTNAME":
				d.PartLabel = v
			case "PARTN":
				fmt.Sscan(v, &d.PartN)
			case "DEVNAME":
				d.Path = filepath.Join(s.root(s.DevRoot), "dev", v)
			}
		}
		if d.PartN > 0 {
			// /sys/class/block/vda1 -> ../../devices/.../vda/vda1
			if link, err := os.Readlink(filepath.Join(sys, name)); err == nil {
				d.Parent = filepath.Base(filepath.Dir(link))
			}
			if d.Parent != "" {
				tab, ok := gpts[d.Parent]
				if !ok {
					tab, _ = readGPT(filepath.Join(s.root(s.DevRoot), "dev", d.Parent))
					gpts[d.Parent] = tab
				}
				if pe, ok := tab[d.PartN]; ok {
					d.PartUUID = pe.uuid
					if d.PartLabel == "" {
						d.PartLabel = pe.name
					}
				}
			}
		}
		if sz, err := os.ReadFile(filepath.Join(sys, name, "size")); err == nil {
			var sectors int64
			fmt.Sscan(strings.TrimSpace(string(sz)), &sectors)
			d.Size = sectors * 512
		}
		d.Content, d.UUID, d.Label = probe(d.Path)
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (s Scanner) root(r string) string {
	if r == "" {
		return "/"
	}
	return r
}

// Match reports whether d is what ref names.
func Match(d BlockDev, ref string) bool {
	k, v, ok := strings.Cut(ref, "=")
	if !ok {
		return d.Path == ref || "/dev/"+d.Name == ref
	}
	switch k {
	case "UUID":
		return d.UUID != "" && strings.EqualFold(d.UUID, v)
	case "PARTUUID":
		return d.PartUUID != "" && strings.EqualFold(d.PartUUID, v)
	case "PARTLABEL":
		return d.PartLabel == v
	case "LABEL":
		return d.Label == v
	}
	return false
}

// ErrNotFound is wrapped when a device does not appear in time.
var ErrNotFound = errors.New("device not found")

// Wait polls until a device matching ref appears or ctx ends. The timeout
// error lists every block device seen and what is on it, because "device
// not found" alone sends an operator hunting.
func (s Scanner) Wait(ctx context.Context, ref string) (BlockDev, error) {
	var seen []BlockDev
	for {
		devs, err := s.Scan()
		if err == nil {
			seen = devs
			var hits []BlockDev
			for _, d := range devs {
				if Match(d, ref) {
					hits = append(hits, d)
				}
			}
			switch len(hits) {
			case 1:
				return hits[0], nil
			case 0:
			default:
				var names []string
				for _, h := range hits {
					names = append(names, h.Path)
				}
				return BlockDev{}, fmt.Errorf("%s is ambiguous: it matches %s", ref, strings.Join(names, ", "))
			}
		}
		t := time.NewTimer(25 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			var list []string
			for _, d := range seen {
				list = append(list, d.String())
			}
			if len(list) == 0 {
				list = []string{"none"}
			}
			return BlockDev{}, fmt.Errorf("%w: %s; block devices seen: %s", ErrNotFound, ref, strings.Join(list, "; "))
		case <-t.C:
		}
	}
}

type gptEntry struct {
	uuid string
	name string
}

// readGPT reads the partition entries of a GPT disk with u-root's parser,
// which checks the header and table CRCs (512-byte logical sectors, as on
// virtio and most cloud disks).
func readGPT(path string) (map[int]gptEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	g, err := gpt.Table(f, gpt.BlockSize)
	if err != nil {
		return nil, err
	}
	out := map[int]gptEntry{}
	for i, p := range g.Parts {
		if p.PartGUID == (gpt.GUID{}) {
			continue
		}
		out[i+1] = gptEntry{uuid: p.UniqueGUID.String(), name: utf16z(p.Name[:])}
	}
	return out, nil
}

// probe recognises what a device holds: LUKS (either header copy), file
// systems, swap, RAID and volume-manager members, partition tables. It is
// what keeps `swap: random` off a partition holding anything, so it errs
// towards recognising: the secondary LUKS2 header and RAID superblocks at
// the end of the device count too.
func probe(path string) (c Content, uuid, label string) {
	f, err := os.Open(path)
	if err != nil {
		return Content{Kind: Unreadable, Err: err}, "", ""
	}
	defer f.Close()
	b := make([]byte, 0x11000)
	n, err := f.ReadAt(b, 0)
	if n == 0 && err != nil {
		return Content{Kind: Unreadable, Err: err}, "", ""
	}
	b = b[:n]
	size, _ := f.Seek(0, io.SeekEnd)
	var tail []byte
	if size >= 128<<10 {
		tail = make([]byte, 128<<10)
		if _, err := f.ReadAt(tail, size-int64(len(tail))); err != nil {
			tail = nil
		}
	}
	return probeBytes(b, tail, size)
}

// Probe reports what the device at path holds, with its UUID and label;
// the mount stage uses it for fstype detection.
func Probe(path string) (c Content, uuid, label string) { return probe(path) }

func at(b []byte, off int, sig string) bool {
	return off >= 0 && off+len(sig) <= len(b) && string(b[off:off+len(sig)]) == sig
}

// probeBytes recognises head (the first 68 KiB) and tail (the last 128
// KiB of a device of size bytes).
func probeBytes(b, tail []byte, size int64) (c Content, uuid, label string) {
	le32 := func(off int) uint32 {
		if off < 0 || off+4 > len(b) {
			return 0
		}
		return binary.LittleEndian.Uint32(b[off:])
	}
	if sig := luks2.Sniff(b); sig.Version != 0 && !sig.Secondary {
		return Content{Kind: LUKS, Format: fmt.Sprintf("LUKS%d", sig.Version)}, sig.UUID, sig.Label
	}
	switch {
	case len(b) >= 2048 && binary.LittleEndian.Uint16(b[1024+0x38:]) == 0xEF53:
		sb := b[1024:]
		fs := "ext2"
		if binary.LittleEndian.Uint32(sb[0x60:])&0x40 != 0 { // INCOMPAT_EXTENTS
			fs = "ext4"
		} else if binary.LittleEndian.Uint32(sb[0x5c:])&0x4 != 0 { // COMPAT_HAS_JOURNAL
			fs = "ext3"
		}
		return content(fs), rawUUID(sb[0x68:0x78]), cstr(sb[0x78:0x88])
	case at(b, 0, "XFSB") && len(b) >= 120:
		return content("xfs"), rawUUID(b[32:48]), cstr(b[108:120])
	case at(b, 0x10040, "_BHRfS_M") && len(b) >= 0x10000+0x12b+256:
		return content("btrfs"), rawUUID(b[0x10020:0x10030]), cstr(b[0x10000+0x12b : 0x10000+0x12b+256])
	case at(b, 0, "hsqs"):
		return content("squashfs"), "", ""
	case le32(1024) == 0xF2F52010:
		return content("f2fs"), "", ""
	case at(b, 3, "NTFS    "):
		return content("ntfs"), "", ""
	case at(b, 3, "-FVE-FS-"):
		return content("BitLocker"), "", ""
	case at(b, 0x8001, "CD001"):
		return content("iso9660"), "", ""
	case at(b, 0x52, "FAT32") && at(b, 0x1fe, "\x55\xaa"):
		return content("vfat"), fmt.Sprintf("%04X-%04X", binary.LittleEndian.Uint16(b[0x45:]), binary.LittleEndian.Uint16(b[0x43:])), strings.TrimSpace(cstr(b[0x47:0x52]))
	case at(b, 0x36, "FAT") && at(b, 0x1fe, "\x55\xaa"):
		return content("vfat"), fmt.Sprintf("%04X-%04X", binary.LittleEndian.Uint16(b[0x29:]), binary.LittleEndian.Uint16(b[0x27:])), strings.TrimSpace(cstr(b[0x2b:0x36]))
	case le32(0) == mdMagic || le32(4096) == mdMagic:
		return content("linux_raid_member"), "", ""
	case at(b, 4096+24, bcacheMagic):
		return content("bcache"), "", ""
	case at(b, 512, "EFI PART"):
		return content("gpt"), "", ""
	}
	for _, off := range []int{0, 512, 1024, 1536} {
		if at(b, off, "LABELONE") && at(b, off+24, "LVM2 001") {
			return content("LVM2_member"), "", ""
		}
	}
	for _, ps := range []int{4096, 8192, 16384, 65536} {
		if at(b, ps-10, "SWAPSPACE2") || at(b, ps-10, "SWAP-SPACE") {
			if len(b) >= 1024+44 {
				return content("swap"), rawUUID(b[1024+12 : 1024+28]), cstr(b[1024+28 : 1024+44])
			}
			return content("swap"), "", ""
		}
	}
	// A LUKS2 volume whose primary header was wiped still has its
	// secondary copy, and with it the keyslots: it is not empty space.
	if sig := luks2.Sniff(b); sig.Secondary {
		return Content{Kind: LUKS, Format: "LUKS2", SecondaryOnly: true}, sig.UUID, sig.Label
	}
	// RAID superblocks at the end: 1.0 at 8 KiB from the end (4 KiB
	// aligned), 0.90 in the last 64 KiB-aligned 64 KiB block.
	if len(tail) == 128<<10 && size >= 128<<10 {
		base := size - int64(len(tail))
		for _, off := range []int64{(size - 8192) &^ 4095, (size &^ (64<<10 - 1)) - 64<<10} {
			i := off - base
			if i >= 0 && i+4 <= int64(len(tail)) && binary.LittleEndian.Uint32(tail[i:]) == mdMagic {
				return content("linux_raid_member"), "", ""
			}
		}
	}
	if at(b, 0x1fe, "\x55\xaa") && mbrPlausible(b) {
		return content("dos"), "", ""
	}
	return Content{}, "", ""
}

// mbrPlausible asks more of an MBR than its 16-bit signature, which
// random bytes (such as last boot's random-key swap) carry once in 65536.
func mbrPlausible(b []byte) bool {
	used := false
	for i := 0; i < 4; i++ {
		e := b[0x1be+16*i:]
		if e[0] != 0 && e[0] != 0x80 {
			return false
		}
		used = used || e[4] != 0
	}
	return used
}

const (
	mdMagic     = 0xa92b4efc
	bcacheMagic = "\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81"
)

// cstr is a NUL-terminated string field.
func cstr(b []byte) string { return unix.ByteSliceToString(b) }

func rawUUID(b []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// utf16z decodes a NUL-terminated UTF-16LE GPT partition name.
func utf16z(b []byte) string {
	var r []rune
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		r = append(r, rune(c))
	}
	return string(r)
}
