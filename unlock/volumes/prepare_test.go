package volumes

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/blockdev/blockdevtest"
	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
)

// TestRandomSwapOnlyOnBlankPartitions: `swap: random` overwrites, so it is
// refused on anything that holds a known signature and on loose names.
func TestRandomSwapOnlyOnBlankPartitions(t *testing.T) {
	luks1 := func(t *testing.T, p string) {
		kf := filepath.Join(t.TempDir(), "k")
		os.WriteFile(kf, []byte("k"), 0o600)
		blockdevtest.Run(t, "cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--key-file", kf, "--uuid", blockdevtest.LUKS1UUID,
			"--pbkdf-force-iterations", "1000", p)
	}
	secondaryOnly := func(t *testing.T, p string) {
		blockdevtest.MkLUKS2(t, p)
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
	parts := []blockdevtest.Part{
		{Name: "blank", Label: "blank", UUID: "B0000000-0000-4000-8000-000000000001"},
		{Name: "ext4", Label: "ext4", UUID: "B0000000-0000-4000-8000-000000000002", Make: blockdevtest.MkExt4("x")},
		{Name: "luks2", Label: "luks2", UUID: "B0000000-0000-4000-8000-000000000003", Make: blockdevtest.MkLUKS2},
		{Name: "luks1", Label: "luks1", UUID: "B0000000-0000-4000-8000-000000000004", Make: luks1},
		{Name: "secondary", Label: "secondary", UUID: "B0000000-0000-4000-8000-000000000005", Make: secondaryOnly},
		{Name: "swap", Label: "swap", UUID: "B0000000-0000-4000-8000-000000000006", Make: func(t *testing.T, p string) { blockdevtest.Run(t, "mkswap", "-q", p) }},
		{Name: "raid", Label: "raid", UUID: "B0000000-0000-4000-8000-000000000007", Make: raidEnd},
		{Name: "lvm", Label: "lvm", UUID: "B0000000-0000-4000-8000-000000000008", Make: lvm},
		// Passed as blank before unlock/blank (issue 14).
		{Name: "minix", Label: "minix", UUID: "B0000000-0000-4000-8000-000000000009", Make: func(t *testing.T, p string) { blockdevtest.Run(t, "mkfs.minix", p) }},
		{Name: "secondary256k", Label: "secondary256k", UUID: "B0000000-0000-4000-8000-00000000000a", Make: func(t *testing.T, p string) {
			blockdevtest.Run(t, "sh", "-c", "printf k | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 256k --key-file - "+p)
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt(make([]byte, 256<<10), 0) // primary wiped, secondary at 256 KiB
			f.Close()
		}},
	}
	fs := blockdevtest.New(t, parts)
	scanner := blockdev.Scanner{SysRoot: fs.Root, DevRoot: fs.Root}
	find := func(ref string) blockdev.BlockDev {
		d, err := scanner.Wait(context.Background(), ref)
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
		Options{Scanner: scanner}, ulogtest.New(t))
	if err == nil || !strings.Contains(err.Error(), "volume swap on") || !strings.Contains(err.Error(), "holds ext4; not touching it") {
		t.Fatalf("Prepare: %v", err)
	}
}

// TestPrepareReportsEveryProblem: one boot shows every bad volume.
func TestPrepareReportsEveryProblem(t *testing.T) {
	parts := blockdevtest.StandardParts()
	fs := blockdevtest.New(t, parts)
	scanner := blockdev.Scanner{SysRoot: fs.Root, DevRoot: fs.Root}
	img := filepath.Join(fs.Root, "dev/vda2")
	luks2test.EditBoth(t, img, func(m map[string]any) { luks2test.Seg0(m)["encryption"] = "cipher_null-ecb" })
	before, _ := os.ReadFile(img)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	got, err := Prepare(ctx, []Spec{
		{Name: "data", Device: "UUID=" + luks2test.UUID},
		{Name: "logs", Device: "PARTLABEL=logs"},
		{Name: "wrong", Device: "UUID=" + blockdevtest.Ext4UUID}, // not LUKS at all
	}, Options{Scanner: scanner}, ulogtest.New(t))
	if len(got) != 0 || err == nil {
		t.Fatalf("prepared %v, err %v", got, err)
	}
	msg := err.Error()
	for _, want := range []string{
		"volume data on " + img + ": LUKS header refused: segment 0 cipher \"cipher_null-ecb\" is not on the allow-list; no key will be tried on it",
		"volume logs: device not found: PARTLABEL=logs; block devices seen:",
		"volume wrong on " + filepath.Join(fs.Root, "dev/vda1") + ": LUKS header refused: no LUKS magic",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if after, _ := os.ReadFile(img); string(after) != string(before) {
		t.Error("Prepare changed the device")
	}
}

// TestDamagedPrimaryRootPrepares: what the boot does with an encrypted
// root (a "root" volume on the root reference when the device is LUKS2)
// works when only the secondary header is intact.
func TestDamagedPrimaryRootPrepares(t *testing.T) {
	parts := blockdevtest.StandardParts()
	parts[1].Make = func(t *testing.T, p string) {
		blockdevtest.MkLUKS2(t, p)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
	}
	fs := blockdevtest.New(t, parts)
	sc := blockdev.Scanner{SysRoot: fs.Root, DevRoot: fs.Root}
	ref := "UUID=" + luks2test.UUID
	root, err := sc.Wait(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if !root.Content.IsLUKS2() {
		t.Fatalf("root %s is not LUKS2 to the boot", root)
	}
	got, err := Prepare(context.Background(), []Spec{{Name: "root", Device: ref}}, Options{Scanner: sc}, ulogtest.New(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !got[0].Header.Secondary {
		t.Fatalf("prepared %+v, want the root from its secondary header", got)
	}
}
