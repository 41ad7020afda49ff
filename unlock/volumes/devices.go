package volumes

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/u-root/u-root/pkg/mount/gpt"
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
	// Content is what the first sectors hold: "LUKS2", "ext4", "swap", ""
	// (nothing recognised) or "unreadable: ...".
	Content string
	UUID    string // LUKS or file-system UUID
	Label   string // LUKS or file-system label
}

func (b BlockDev) String() string {
	var parts []string
	if b.PartLabel != "" {
		parts = append(parts, "PARTLABEL="+b.PartLabel)
	}
	if b.PartUUID != "" {
		parts = append(parts, "PARTUUID="+b.PartUUID)
	}
	c := b.Content
	if c == "" {
		c = "no known signature"
	}
	parts = append(parts, c)
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

// probe recognises what a device holds from its first 64 KiB.
func probe(path string) (content, uuid, label string) {
	f, err := os.Open(path)
	if err != nil {
		return "unreadable: " + err.Error(), "", ""
	}
	defer f.Close()
	b := make([]byte, 64<<10)
	n, _ := f.ReadAt(b, 0)
	b = b[:n]
	switch {
	case len(b) >= 512 && bytes.Equal(b[:6], luksMagic):
		v := binary.BigEndian.Uint16(b[6:8])
		if v == 2 {
			return "LUKS2", cstr(b[0xa8 : 0xa8+40]), cstr(b[0x18 : 0x18+48])
		}
		return fmt.Sprintf("LUKS%d", v), cstr(b[0xa8 : 0xa8+40]), ""
	case len(b) >= 2048 && binary.LittleEndian.Uint16(b[1024+0x38:]) == 0xEF53:
		sb := b[1024:]
		fs := "ext2"
		if binary.LittleEndian.Uint32(sb[0x60:])&0x40 != 0 { // INCOMPAT_EXTENTS
			fs = "ext4"
		} else if binary.LittleEndian.Uint32(sb[0x5c:])&0x4 != 0 { // COMPAT_HAS_JOURNAL
			fs = "ext3"
		}
		return fs, rawUUID(sb[0x68:0x78]), cstr(sb[0x78:0x88])
	case len(b) >= 4096 && (string(b[4086:4096]) == "SWAPSPACE2" || string(b[4086:4096]) == "SWAP-SPACE"):
		return "swap", rawUUID(b[1024+12 : 1024+28]), cstr(b[1024+28 : 1024+44])
	}
	return "", "", ""
}

var luksMagic = []byte("LUKS\xba\xbe")

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

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
