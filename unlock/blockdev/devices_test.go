package blockdev

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/blockdev/blockdevtest"
	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
)

// newFakeSystem is blockdevtest.New with a Scanner over it.
func newFakeSystem(t *testing.T, parts []blockdevtest.Part) *fakeSystem {
	t.Helper()
	fs := blockdevtest.New(t, parts)
	return &fakeSystem{FakeSystem: fs, scanner: Scanner{SysRoot: fs.Root, DevRoot: fs.Root}}
}

type fakeSystem struct {
	*blockdevtest.FakeSystem
	scanner Scanner
}

const (
	testUUID = luks2test.UUID
	ext4UUID = blockdevtest.Ext4UUID
	swapUUID = blockdevtest.SwapUUID
)

func TestDeviceReferences(t *testing.T) {
	fs := newFakeSystem(t, blockdevtest.StandardParts())
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
		if d.Content.Format != wantType || !strings.EqualFold(d.UUID, kv["UUID"]) || d.Label != kv["LABEL"] {
			t.Errorf("%s: we see %q UUID=%s LABEL=%s, blkid %v", d.Name, d.Content, d.UUID, d.Label, kv)
		}
	}
}

func TestWaitTimeoutListsEveryDevice(t *testing.T) {
	fs := newFakeSystem(t, blockdevtest.StandardParts())
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
	parts := blockdevtest.StandardParts()
	parts[3].Make = blockdevtest.MkExt4("rootfs") // same label and UUID as vda1
	fs := newFakeSystem(t, parts)
	_, err := fs.scanner.Wait(context.Background(), "LABEL=rootfs")
	if err == nil || !strings.Contains(err.Error(), "ambiguous") {
		t.Fatalf("err = %v", err)
	}
}

// TestDamagedPrimaryIsStillLUKS2: a LUKS2 volume whose primary header is
// gone is found by its UUID and is LUKS2 to its callers (the boot decides
// "encrypted root" by IsLUKS2), marked as secondary-only; blkid agrees.
func TestDamagedPrimaryIsStillLUKS2(t *testing.T) {
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
	fs := newFakeSystem(t, parts)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := fs.scanner.Wait(ctx, "UUID="+testUUID)
	if err != nil {
		t.Fatal(err)
	}
	if !d.Content.IsLUKS2() || !d.Content.SecondaryOnly || d.Content.Kind != LUKS {
		t.Fatalf("content = %+v, want LUKS2 from the secondary header", d.Content)
	}
	if got := d.Content.String(); got != "LUKS2 (secondary header only)" {
		t.Errorf("String = %q", got)
	}
	out, _ := exec.Command("blkid", "-p", "-o", "value", "-s", "TYPE", d.Path).Output()
	if strings.TrimSpace(string(out)) != "crypto_LUKS" {
		t.Errorf("blkid says %q", out)
	}
}
