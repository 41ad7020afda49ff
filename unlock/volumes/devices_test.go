package volumes

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
)

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func sparse(t *testing.T, path string, size int64) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

// fakeSystem is a /sys/class/block and /dev made of files: the disk is a
// real GPT image (sfdisk), each partition a real image made by the real
// tools (mkfs.ext4, mkswap, cryptsetup), so Scan parses what the kernel and
// those tools produce without loop devices.
type fakeSystem struct {
	root     string
	scanner  Scanner
	partUUID map[string]string // by partition name
}

type fakePart struct {
	name  string
	make  func(t *testing.T, path string)
	uuid  string // GPT partition GUID
	label string // GPT name
}

const (
	ext4UUID = "3c6a2f0e-1b7d-4a53-9a2e-0d6f1c2b3a41"
	swapUUID = "6f1d2c3b-4a5e-4f60-8b7a-1c2d3e4f5a6b"
	luks1ID  = "22222222-3333-4444-5555-666666666666"
)

func newFakeSystem(t *testing.T, parts []fakePart) *fakeSystem {
	t.Helper()
	root := t.TempDir()
	fs := &fakeSystem{root: root, scanner: Scanner{SysRoot: root, DevRoot: root}, partUUID: map[string]string{}}
	dev := filepath.Join(root, "dev")
	devices := filepath.Join(root, "sys/devices/pci0000:00/virtio1/block/vda")
	for _, d := range []string{dev, devices, filepath.Join(root, "sys/class/block")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	disk := filepath.Join(dev, "vda")
	sparse(t, disk, int64(len(parts)+2)*8<<20)
	var table strings.Builder
	table.WriteString("label: gpt\n")
	for i, p := range parts {
		fmt.Fprintf(&table, "start=%d, size=%d, uuid=%s, name=%s\n", (1+i*8)*2048, 8*2048, p.uuid, p.label)
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
		sparse(t, path, 8<<20)
		if p.make != nil {
			p.make(t, path)
		}
		// The kernel puts PARTNAME in uevent; leave it out for one
		// partition so the GPT read is what supplies the label.
		ue := fmt.Sprintf("MAJOR=254\nMINOR=%d\nDEVNAME=%s\nDEVTYPE=partition\nPARTN=%d\n", i+1, name, i+1)
		if i != 1 {
			ue += "PARTNAME=" + p.label + "\n"
		}
		link(name, "vda/"+name, ue, 8<<20)
		fs.partUUID[p.name] = p.uuid
	}
	// Mapped devices and loops are never candidates.
	link("dm-0", "dm-0", "DEVNAME=dm-0\nDEVTYPE=disk\n", 1<<20)
	return fs
}

func mkExt4(label string) func(*testing.T, string) {
	return func(t *testing.T, p string) { run(t, "mkfs.ext4", "-q", "-F", "-L", label, "-U", ext4UUID, p) }
}

func mkLUKS2(t *testing.T, p string) {
	kf := filepath.Join(t.TempDir(), "k")
	os.WriteFile(kf, []byte("k"), 0o600)
	run(t, "cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf, "--uuid", testUUID, "--label", "secure",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", p)
}

func standardParts() []fakePart {
	return []fakePart{
		{name: "root", label: "root", uuid: "A1B2C3D4-0000-4000-8000-000000000001", make: mkExt4("rootfs")},
		{name: "data", label: "data", uuid: "A1B2C3D4-0000-4000-8000-000000000002", make: mkLUKS2},
		{name: "swap", label: "swap", uuid: "A1B2C3D4-0000-4000-8000-000000000003", make: func(t *testing.T, p string) {
			run(t, "mkswap", "-q", "-L", "oldswap", "-U", swapUUID, p)
		}},
		{name: "blank", label: "scratch", uuid: "A1B2C3D4-0000-4000-8000-000000000004"},
	}
}

func TestDeviceReferences(t *testing.T) {
	fs := newFakeSystem(t, standardParts())
	devs, err := fs.scanner.Scan()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 5 {
		t.Fatalf("scan found %d devices, want vda and 4 partitions (no dm-0): %v", len(devs), devs)
	}
	for _, tc := range []struct{ ref, want string }{
		{"UUID=" + testUUID, "vda2"},                  // LUKS2 header UUID
		{"UUID=" + strings.ToUpper(ext4UUID), "vda1"}, // file-system UUID, any case
		{"UUID=" + swapUUID, "vda3"},
		{"LABEL=secure", "vda2"}, // LUKS2 label
		{"LABEL=rootfs", "vda1"}, // ext4 label
		{"LABEL=oldswap", "vda3"},
		{"PARTUUID=a1b2c3d4-0000-4000-8000-000000000002", "vda2"},
		{"PARTUUID=A1B2C3D4-0000-4000-8000-000000000004", "vda4"},
		{"PARTLABEL=data", "vda2"}, // from the GPT itself (no PARTNAME in uevent)
		{"PARTLABEL=scratch", "vda4"},
		{"/dev/vda3", "vda3"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		d, err := fs.scanner.Wait(ctx, tc.ref)
		cancel()
		if err != nil || d.Name != tc.want {
			t.Errorf("%s: got %s (%v), want %s", tc.ref, d.Name, err, tc.want)
		}
	}
	// Oracle: blkid reads the same UUIDs and labels from the images.
	for _, d := range devs {
		if d.PartN == 0 {
			continue
		}
		out, _ := exec.Command("blkid", "-p", "-o", "export", d.Path).Output()
		kv := map[string]string{}
		for _, l := range strings.Split(string(out), "\n") {
			k, v, _ := strings.Cut(l, "=")
			kv[k] = v
		}
		wantType := map[string]string{"crypto_LUKS": "LUKS2", "": ""}[kv["TYPE"]]
		if wantType == "" && kv["TYPE"] != "" {
			wantType = kv["TYPE"]
		}
		if d.Content != wantType || !strings.EqualFold(d.UUID, kv["UUID"]) || d.Label != kv["LABEL"] {
			t.Errorf("%s: we see %q UUID=%s LABEL=%s, blkid %v", d.Name, d.Content, d.UUID, d.Label, kv)
		}
	}
}

func TestWaitTimeoutListsEveryDevice(t *testing.T) {
	fs := newFakeSystem(t, standardParts())
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := fs.scanner.Wait(ctx, "PARTLABEL=nowhere")
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v", err)
	}
	msg := err.Error()
	for _, want := range []string{
		"PARTLABEL=nowhere",
		"vda1 (PARTLABEL=root PARTUUID=a1b2c3d4-0000-4000-8000-000000000001 ext4 8 MiB UUID=" + ext4UUID + " LABEL=rootfs)",
		"vda2 (PARTLABEL=data PARTUUID=a1b2c3d4-0000-4000-8000-000000000002 LUKS2 8 MiB UUID=" + testUUID + " LABEL=secure)",
		"vda3 (PARTLABEL=swap", "swap 8 MiB UUID=" + swapUUID,
		"vda4 (PARTLABEL=scratch PARTUUID=a1b2c3d4-0000-4000-8000-000000000004 no known signature 8 MiB)",
		"/vda (gpt",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("timeout message lacks %q:\n%s", want, msg)
		}
	}
}

func TestAmbiguousReferenceRefused(t *testing.T) {
	parts := standardParts()
	parts[3].make = mkExt4("rootfs") // same label and UUID as vda1
	fs := newFakeSystem(t, parts)
	_, err := fs.scanner.Wait(context.Background(), "LABEL=rootfs")
	if err == nil || !strings.Contains(err.Error(), "ambiguous") {
		t.Fatalf("err = %v", err)
	}
}

// TestRandomSwapOnlyOnBlankPartitions: `swap: random` overwrites, so it is
// refused on anything that holds a known signature and on loose names.
func TestRandomSwapOnlyOnBlankPartitions(t *testing.T) {
	luks1 := func(t *testing.T, p string) {
		kf := filepath.Join(t.TempDir(), "k")
		os.WriteFile(kf, []byte("k"), 0o600)
		run(t, "cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--key-file", kf, "--uuid", luks1ID,
			"--pbkdf-force-iterations", "1000", p)
	}
	secondaryOnly := func(t *testing.T, p string) {
		mkLUKS2(t, p)
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		f.WriteAt(make([]byte, 4096), 0) // primary wiped: keyslots still there
		f.Close()
	}
	raidEnd := func(t *testing.T, p string) { // md 1.0 superblock near the end
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		f.WriteAt([]byte{0xfc, 0x4e, 0x2b, 0xa9}, (8<<20-8192)&^4095)
		f.Close()
	}
	lvm := func(t *testing.T, p string) {
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		f.WriteAt([]byte("LABELONE\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00LVM2 001"), 512)
		f.Close()
	}
	parts := []fakePart{
		{name: "blank", label: "blank", uuid: "B0000000-0000-4000-8000-000000000001"},
		{name: "ext4", label: "ext4", uuid: "B0000000-0000-4000-8000-000000000002", make: mkExt4("x")},
		{name: "luks2", label: "luks2", uuid: "B0000000-0000-4000-8000-000000000003", make: mkLUKS2},
		{name: "luks1", label: "luks1", uuid: "B0000000-0000-4000-8000-000000000004", make: luks1},
		{name: "secondary", label: "secondary", uuid: "B0000000-0000-4000-8000-000000000005", make: secondaryOnly},
		{name: "swap", label: "swap", uuid: "B0000000-0000-4000-8000-000000000006", make: func(t *testing.T, p string) { run(t, "mkswap", "-q", p) }},
		{name: "raid", label: "raid", uuid: "B0000000-0000-4000-8000-000000000007", make: raidEnd},
		{name: "lvm", label: "lvm", uuid: "B0000000-0000-4000-8000-000000000008", make: lvm},
		// Passed as blank before unlock/blank (issue 14).
		{name: "minix", label: "minix", uuid: "B0000000-0000-4000-8000-000000000009", make: func(t *testing.T, p string) { run(t, "mkfs.minix", p) }},
		{name: "secondary256k", label: "secondary256k", uuid: "B0000000-0000-4000-8000-00000000000a", make: func(t *testing.T, p string) {
			run(t, "sh", "-c", "printf k | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 256k --key-file - "+p)
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt(make([]byte, 256<<10), 0) // primary wiped, secondary at 256 KiB
			f.Close()
		}},
	}
	fs := newFakeSystem(t, parts)
	find := func(ref string) BlockDev {
		d, err := fs.scanner.Wait(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	if err := CheckRandomSwap("PARTLABEL=blank", find("PARTLABEL=blank")); err != nil {
		t.Errorf("blank partition by PARTLABEL refused: %v", err)
	}
	if err := CheckRandomSwap("PARTUUID=b0000000-0000-4000-8000-000000000001", find("PARTUUID=b0000000-0000-4000-8000-000000000001")); err != nil {
		t.Errorf("blank partition by PARTUUID refused: %v", err)
	}
	for _, ref := range []string{"/dev/vda1"} {
		if err := CheckRandomSwap(ref, find(ref)); !errors.Is(err, ErrNotBlank) {
			t.Errorf("%s accepted for random swap: %v", ref, err)
		}
	}
	for _, name := range []string{"ext4", "luks2", "luks1", "secondary", "swap", "raid", "lvm", "minix", "secondary256k"} {
		d := find("PARTLABEL=" + name)
		err := CheckRandomSwap("PARTLABEL="+name, d)
		if !errors.Is(err, ErrNotBlank) || !strings.Contains(err.Error(), "holds") {
			t.Errorf("%s (%q) accepted for random swap: %v", name, d.Content, err)
		}
	}
	// Prepare says which device, why, and that it is left alone.
	_, err := Prepare(context.Background(), []Spec{{Name: "swap", Device: "PARTLABEL=ext4", Swap: true, RandomSwap: true}},
		Options{Scanner: fs.scanner}, ulogtest.New(t))
	if err == nil || !strings.Contains(err.Error(), "volume swap on") || !strings.Contains(err.Error(), "holds ext4; not touching it") {
		t.Fatalf("Prepare: %v", err)
	}
}

// TestPrepareReportsEveryProblem: one boot shows every bad volume.
func TestPrepareReportsEveryProblem(t *testing.T) {
	parts := standardParts()
	fs := newFakeSystem(t, parts)
	img := filepath.Join(fs.root, "dev/vda2")
	editBoth(t, img, func(m map[string]any) { seg0(m)["encryption"] = "cipher_null-ecb" })
	before, _ := os.ReadFile(img)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	got, err := Prepare(ctx, []Spec{
		{Name: "data", Device: "UUID=" + testUUID},
		{Name: "logs", Device: "PARTLABEL=logs"},
		{Name: "wrong", Device: "UUID=" + ext4UUID}, // not LUKS at all
	}, Options{Scanner: fs.scanner}, ulogtest.New(t))
	if len(got) != 0 || err == nil {
		t.Fatalf("prepared %v, err %v", got, err)
	}
	msg := err.Error()
	for _, want := range []string{
		"volume data on " + img + ": LUKS header refused: segment 0 cipher \"cipher_null-ecb\" is not on the allow-list; no key will be tried on it",
		"volume logs: device not found: PARTLABEL=logs; block devices seen:",
		"volume wrong on " + filepath.Join(fs.root, "dev/vda1") + ": LUKS header refused: no LUKS magic",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if after, _ := os.ReadFile(img); string(after) != string(before) {
		t.Error("Prepare changed the device")
	}
}
