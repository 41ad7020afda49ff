// Package blockdevtest builds a fake /sys/class/block and /dev out of
// files for the tests of blockdev and its users: the disk is a real GPT
// image (sfdisk), each partition a real image made by the real tools
// (mkfs.ext4, mkswap, cryptsetup), so a scan parses what the kernel and
// those tools produce, without loop devices.
package blockdevtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
)

// Ids the standard images carry.
const (
	Ext4UUID  = "3c6a2f0e-1b7d-4a53-9a2e-0d6f1c2b3a41"
	SwapUUID  = "6f1d2c3b-4a5e-4f60-8b7a-1c2d3e4f5a6b"
	LUKS1UUID = "22222222-3333-4444-5555-666666666666"
)

// FakeSystem is a fake system root: Root/sys/class/block and Root/dev.
type FakeSystem struct {
	Root     string
	PartUUID map[string]string // by partition name
}

// Part is one partition of the fake disk vda; Make fills its image.
type Part struct {
	Name  string
	Make  func(t *testing.T, path string)
	UUID  string // GPT partition GUID
	Label string // GPT name
}

// Run runs a command and fails the test if it fails.
func Run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// New makes disk vda with parts as vda1.. (8 MiB each), plus a dm-0 that
// scans must skip.
func New(t *testing.T, parts []Part) *FakeSystem {
	t.Helper()
	root := t.TempDir()
	fs := &FakeSystem{Root: root, PartUUID: map[string]string{}}
	dev := filepath.Join(root, "dev")
	devices := filepath.Join(root, "sys/devices/pci0000:00/virtio1/block/vda")
	for _, d := range []string{dev, devices, filepath.Join(root, "sys/class/block")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	disk := filepath.Join(dev, "vda")
	luks2test.Sparse(t, disk, int64(len(parts)+2)*8<<20)
	var table strings.Builder
	table.WriteString("label: gpt\n")
	for i, p := range parts {
		fmt.Fprintf(&table, "start=%d, size=%d, uuid=%s, name=%s\n", (1+i*8)*2048, 8*2048, p.UUID, p.Label)
	}
	cmd := exec.Command("sfdisk", "--no-reread", "--no-tell-kernel", disk)
	cmd.Stdin = strings.NewReader(table.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	link := func(name, target string, uevent string, size int64) {
		d := filepath.Join(root, "sys/devices/pci0000:00/virtio1/block", target)
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "uevent"), []byte(uevent), 0o644)
		os.WriteFile(filepath.Join(d, "size"), []byte(fmt.Sprintf("%d\n", size/512)), 0o644)
		rel, _ := filepath.Rel(filepath.Join(root, "sys/class/block"), d)
		if err := os.Symlink(rel, filepath.Join(root, "sys/class/block", name)); err != nil {
			t.Fatal(err)
		}
	}
	link("vda", "vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n", int64(len(parts)+2)*8<<20)
	for i, p := range parts {
		name := fmt.Sprintf("vda%d", i+1)
		path := filepath.Join(dev, name)
		luks2test.Sparse(t, path, 8<<20)
		if p.Make != nil {
			p.Make(t, path)
		}
		// The kernel puts PARTNAME in uevent; leave it out for one
		// partition so the GPT read is what supplies the label.
		ue := fmt.Sprintf("MAJOR=254\nMINOR=%d\nDEVNAME=%s\nDEVTYPE=partition\nPARTN=%d\n", i+1, name, i+1)
		if i != 1 {
			ue += "PARTNAME=" + p.Label + "\n"
		}
		link(name, "vda/"+name, ue, 8<<20)
		fs.PartUUID[p.Name] = p.UUID
	}
	// Mapped devices and loops are never candidates.
	link("dm-0", "dm-0", "DEVNAME=dm-0\nDEVTYPE=disk\n", 1<<20)
	return fs
}

// MkExt4 makes an ext4 file system with label and UUID Ext4UUID.
func MkExt4(label string) func(*testing.T, string) {
	return func(t *testing.T, p string) { Run(t, "mkfs.ext4", "-q", "-F", "-L", label, "-U", Ext4UUID, p) }
}

// MkLUKS2 makes a LUKS2 volume (UUID luks2test.UUID, label "secure",
// passphrase "k").
func MkLUKS2(t *testing.T, p string) {
	kf := filepath.Join(t.TempDir(), "k")
	os.WriteFile(kf, []byte("k"), 0o600)
	Run(t, "cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf, "--uuid", luks2test.UUID, "--label", "secure",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", p)
}

// StandardParts are root (ext4 "rootfs"), data (LUKS2), swap ("oldswap")
// and a blank "scratch".
func StandardParts() []Part {
	return []Part{
		{Name: "root", Label: "root", UUID: "A1B2C3D4-0000-4000-8000-000000000001", Make: MkExt4("rootfs")},
		{Name: "data", Label: "data", UUID: "A1B2C3D4-0000-4000-8000-000000000002", Make: MkLUKS2},
		{Name: "swap", Label: "swap", UUID: "A1B2C3D4-0000-4000-8000-000000000003", Make: func(t *testing.T, p string) {
			Run(t, "mkswap", "-q", "-L", "oldswap", "-U", SwapUUID, p)
		}},
		{Name: "blank", Label: "scratch", UUID: "A1B2C3D4-0000-4000-8000-000000000004"},
	}
}
