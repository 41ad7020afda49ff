package qemutests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// volSetup is a key server with one enrolled host and a disk of the
// test's own layout, formatted with the host's key.
type volSetup struct {
	bins   *harness.Bins
	dir    string
	data   string
	uuid   string
	token  string
	key    []byte // the key the disk was formatted with
	disk   *harness.BuiltDisk
	hello  []byte
	server *harness.KeyServer
	kernel harness.KernelFiles
}

// newVolSetup sets up the default kernel's test.
func newVolSetup(t *testing.T, ctx context.Context, layout func(key, hello []byte) harness.Disk) *volSetup {
	t.Helper()
	return newVolSetupOn(t, ctx, kernelcache.ForTest(t), layout)
}

// newVolSetupOn sets up a test that boots kernel k.
func newVolSetupOn(t *testing.T, ctx context.Context, k harness.KernelFiles, layout func(key, hello []byte) harness.Disk) *volSetup {
	t.Helper()
	s := &volSetup{dir: t.TempDir(), uuid: harness.RandomUUID(), kernel: k}
	e, err := harness.Enroll(ctx, s.dir, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	s.bins, s.data, s.token, s.key = e.Bins, e.Data, e.Token, e.Key
	s.hello = []byte("hello from the volumes test " + s.uuid + "\n")
	if s.disk, err = layout(s.key, s.hello).Build(ctx, s.dir); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *volSetup) start(t *testing.T, ctx context.Context) {
	t.Helper()
	srv, err := harness.StartKeyServer(ctx, s.bins.KeyServer, s.data, "", testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	s.server = srv
}

// image builds an initramfs from the key section plus rest (root:,
// volumes:), YAML the test writes itself.
func (s *volSetup) image(t *testing.T, ctx context.Context, rest string) string {
	t.Helper()
	return s.imageWith(t, ctx, rest)
}

// imageWith is image with extra mkunlockrd build arguments.
func (s *volSetup) imageWith(t *testing.T, ctx context.Context, rest string, extra ...string) string {
	t.Helper()
	k := s.kernel
	yml := fmt.Sprintf(`key:
  urls:
    - %s
  pins:
    - %s
  host: smbios-uuid
  token: credential
  attempt_timeout: 5s
modules: [%s]
%s`, s.server.GuestURL(), s.server.Pin, strings.Join(harness.DefaultModules, ", "), rest)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "unlockrd.yaml")
	if err := os.WriteFile(cfg, []byte(yml), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("unlockrd.yaml:\n%s", yml)
	img := filepath.Join(dir, "initramfs.img")
	if _, err := harness.RunTool(ctx, s.bins.Mkunlockrd, append([]string{"build", "-c", cfg, "-m", k.Modules, "-o", img}, extra...)...); err != nil {
		t.Fatal(err)
	}
	return img
}

func (s *volSetup) vm(t *testing.T, img string, disks []harness.Drive, appendArgs ...string) *harness.TestVM {
	return harness.StartVM(t, harness.VMOptions{
		Kernel:    s.kernel.Vmlinuz,
		Initramfs: img,
		Disks:     disks,
		UUID:      s.uuid,
		SMBIOS:    []string{harness.TokenCredential(s.token)},
		Append:    appendArgs,
	})
}

func part(t *testing.T, d *harness.BuiltDisk, name string) *harness.BuiltPartition {
	t.Helper()
	p, err := d.Partition(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// flagsOf returns the optional parameters of a crypt table line
// ("0 N crypt cipher <key> iv dev off [n opt...]").
func flagsOf(table string) string {
	f := strings.Fields(table)
	if len(f) <= 8 {
		return ""
	}
	return strings.Join(f[9:], " ")
}

// TestVolumesEncryptedRootRotationFlags boots a host whose root is LUKS2
// too, named by UUID= (no fstype: detected), with data by UUID= (LUKS
// UUID, allow_discards configured) and LUKS2 swap by PARTLABEL=, while the
// key server is mid-rotation: it answers [new, old] and the volumes know
// only old. "rw" on the command line makes the ro root read-write. The
// guest's dm tables must carry exactly the flags configured.
func TestVolumesEncryptedRootRotationFlags(t *testing.T) {
	kernelcache.Each(t, testEncryptedRoot)
}

func testEncryptedRoot(t *testing.T, k harness.KernelFiles) {
	ctx := t.Context()
	s := newVolSetupOn(t, ctx, k, func(key, hello []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 48 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "root"},
				FS: harness.TestRoot("rootfs", harness.TestInitConfig{Files: []string{harness.HelloPath}}, harness.DataMountPoint)},
			{Name: "data", Size: 24 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "data", SectorSize: 4096},
				FS: &harness.Ext4{Label: "data", Files: []harness.File{{Path: harness.HelloFile, Data: hello}}}},
			{Name: "swap", Size: 16 << 20, Swap: true, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "swap"}},
		}}
	})
	if _, err := harness.RunTool(ctx, s.bins.KeyServer, "host", "rotate", "--data", s.data, s.uuid); err != nil {
		t.Fatal(err)
	}
	if k, err := harness.HostKey(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || bytes.Equal(k, s.key) {
		t.Fatalf("rotation did not make a new current key (err %v)", err)
	}
	s.start(t, ctx)
	root, data := part(t, s.disk, "root"), part(t, s.disk, "data")
	img := s.image(t, ctx, fmt.Sprintf(`root:
  device: UUID=%s
  options: [ro]
volumes:
  - name: data
    device: UUID=%s
    mount: %s
    options: [noatime]
    allow_discards: true
  - name: swap
    device: PARTLABEL=swap
    swap: true
`, root.LUKS.UUID, data.LUKS.UUID, harness.DataMountPoint))
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}}, "rw")

	vm.ExpectLine(`^unlockrd: devices: root=/dev/vda1 \(LUKS2\) data=/dev/vda2 swap=/dev/vda3, LUKS2 headers valid`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: 2 key\(s\) for host `+s.uuid, stageTimeout)
	for i, name := range []string{"root", "data", "swap"} {
		// The current (new) key fails, the old one (key 2) opens slot 0;
		// the boot moves the volume to the new key (issue 11).
		vm.ExpectLine(fmt.Sprintf(`^unlockrd: volumes: volume %s: /dev/vda%d opened with key 2 of 2, keyslot 0 -> /dev/mapper/%s `, name, i+1, name), stageTimeout)
		vm.ExpectLine(fmt.Sprintf(`^unlockrd: volumes: volume %s: /dev/vda%d: added keyslot 1 for key 1, removed keyslot 0 of the older key$`, name, i+1), stageTimeout)
	}
	vm.ExpectLine(`^unlockrd: key: confirmed rotated with key [0-9.-]+ to `, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if rep.Root != "/dev/mapper/root ext4" {
		t.Errorf("root = %q, want /dev/mapper/root ext4 (type detected)", rep.Root)
	}
	if m, ok := rep.Mount("/"); !ok || !strings.HasPrefix(m.Options, "rw") {
		t.Errorf("root mount %+v: want rw from the command line over options [ro]", m)
	}
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" || m.FSType != "ext4" || !strings.Contains(m.Options, "noatime") {
		t.Errorf("data mount = %+v", m)
	}
	if f := rep.Files[harness.HelloPath]; f.SHA256 != fmt.Sprintf("%x", sha256.Sum256(s.hello)) {
		t.Errorf("hello file = %+v", f)
	}
	if !swapOnDM(rep.Swaps) {
		t.Errorf("/proc/swaps = %q, want the dm swap", rep.Swaps)
	}
	for name, want := range map[string]string{
		"root": "no_read_workqueue no_write_workqueue",
		"data": "allow_discards no_read_workqueue no_write_workqueue sector_size:4096",
		"swap": "no_read_workqueue no_write_workqueue",
	} {
		tbl, ok := rep.DMTable(name)
		if !ok {
			t.Errorf("no dm table for %s in the guest: %v", name, rep.DM)
			continue
		}
		if !strings.Contains(tbl, " crypt aes-xts-plain64 <key> ") {
			t.Errorf("%s table %q: not aes-xts-plain64", name, tbl)
		}
		// The kernel reports its own count and spelling of the options.
		if got := flagsOf(tbl); got != want {
			t.Errorf("%s: kernel table options %q, want %q (table %q)", name, got, want, tbl)
		}
	}
	vm.Wait(bootTimeout)
	checkRotated(t, ctx, s, []string{"root", "data", "swap"})
	// The swap signature was written inside the mapping, so the disk
	// holds it only encrypted.
	plain, err := s.disk.Decrypt("swap")
	if err != nil {
		t.Fatal(err)
	}
	if string(plain[4086:4096]) != "SWAPSPACE2" {
		t.Errorf("no swap signature inside the swap volume")
	}
}

// TestVolumesRandomSwapAndSecondaryHeader: swap: random on a blank
// partition named by PARTUUID= gets a fresh plain dm-crypt mapping, and a
// data volume whose primary LUKS2 header is destroyed opens from its
// intact secondary copy.
func TestVolumesRandomSwapAndSecondaryHeader(t *testing.T) {
	kernelcache.Each(t, testRandomSwap)
}

func testRandomSwap(t *testing.T, k harness.KernelFiles) {
	ctx := t.Context()
	s := newVolSetupOn(t, ctx, k, func(key, hello []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{Files: []string{harness.HelloPath}}, harness.DataMountPoint)},
			{Name: "data", Size: 24 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "data"},
				FS: &harness.Ext4{Label: "data", Files: []harness.File{{Path: harness.HelloFile, Data: hello}}}},
			{Name: "swap", Size: 16 << 20, Swap: true}, // raw: nothing on it
		}}
	})
	data, swap := part(t, s.disk, "data"), part(t, s.disk, "swap")
	// Destroy the primary header (magic included).
	garbage := bytes.Repeat([]byte{0x5a}, 4096)
	writeDisk(t, s.disk.Path, data.Offset, garbage)
	s.start(t, ctx)
	img := s.image(t, ctx, fmt.Sprintf(`root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: %s
  - name: swap
    device: PARTUUID=%s
    swap: random
`, harness.DataMountPoint, swap.PartUUID))
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	vm.ExpectLine(`^unlockrd: devices: volume data on /dev/vda2: primary LUKS header damaged \(.*no LUKS magic.*\), using the intact secondary copy$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume data: /dev/vda2 opened with key 1 of 1, keyslot 0 -> /dev/mapper/data`, stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume swap: /dev/vda3 mapped with a fresh random key -> /dev/mapper/swap`, stageTimeout)
	vm.ExpectLine(`^unlockrd: swap: /dev/mapper/swap: no signature inside the unlocked mapping, wrote one`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if rep.Root != "/dev/vda1 ext4" {
		t.Errorf("root = %q (fstype detected on a plain root)", rep.Root)
	}
	if f := rep.Files[harness.HelloPath]; f.SHA256 != fmt.Sprintf("%x", sha256.Sum256(s.hello)) {
		t.Errorf("hello file = %+v: data did not open from the secondary header", f)
	}
	if !swapOnDM(rep.Swaps) {
		t.Errorf("/proc/swaps = %q, want the random-key dm swap", rep.Swaps)
	}
	tbl, _ := rep.DMTable("swap")
	// The first and last MiB stay out of the mapping (and zero), so the
	// partition is still blank by unlock/blank on the next boot.
	if !regexp.MustCompile(`^0 28672 crypt aes-xts-plain64 <key> 0 [0-9]+:3 2048 3 no_read_workqueue no_write_workqueue sector_size:4096$`).MatchString(tbl) {
		t.Errorf("swap table = %q, want plain aes-xts over vda3 without its first and last MiB", tbl)
	}
	vm.Wait(bootTimeout)
	raw, err := s.disk.ReadPartition("swap")
	if err != nil {
		t.Fatal(err)
	}
	if m := raw[1<<20 : 1<<20+4096]; bytes.Contains(m, []byte("SWAPSPACE2")) || bytes.Equal(m, make([]byte, 4096)) {
		t.Errorf("swap mapping start is plaintext or untouched: the signature must be there only encrypted")
	}
	if !bytes.Equal(raw[:1<<20], make([]byte, 1<<20)) || !bytes.Equal(raw[len(raw)-1<<20:], make([]byte, 1<<20)) {
		t.Errorf("the swap partition's first or last MiB was written")
	}
}

// TestVolumesUnboundKeyslot: the data volume has, besides its key, an
// unbound keyslot (`luksAddKey --unbound`, priority prefer). The header is
// accepted, the unbound slot is never tried, and data opens and is handed
// over (issue 14: the whole header used to be refused).
func TestVolumesUnboundKeyslot(t *testing.T) {
	ctx := t.Context()
	s := newVolSetup(t, ctx, func(key, hello []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{Files: []string{harness.HelloPath}}, harness.DataMountPoint)},
			{Name: "data", Size: 24 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "data", UnboundSlot: true},
				FS: &harness.Ext4{Label: "data", Files: []harness.File{{Path: harness.HelloFile, Data: hello}}}},
		}}
	})
	s.start(t, ctx)
	img := s.image(t, ctx, fmt.Sprintf(`root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: %s
`, harness.DataMountPoint))
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	vm.ExpectLine(`^unlockrd: volumes: volume data: /dev/vda2 opened with key 1 of 1, keyslot 0 -> /dev/mapper/data`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if f := rep.Files[harness.HelloPath]; f.SHA256 != fmt.Sprintf("%x", sha256.Sum256(s.hello)) {
		t.Errorf("hello file = %+v: data with an unbound keyslot was not handed over", f)
	}
	vm.Wait(bootTimeout)
}

// TestVolumesTamperedHeaderAndMissingDisk: the data header is rewritten
// the way an attacker would (cipher_null in both copies, checksums fixed)
// and a second volume's disk is not attached. One boot must report both
// (the tampered one before any key is even fetched, the missing one with
// the list of block devices after rd.unlockrd.device-timeout) and halt,
// leaving every partition's bytes as they were.
func TestVolumesTamperedHeaderAndMissingDisk(t *testing.T) {
	ctx := t.Context()
	s := newVolSetup(t, ctx, func(key, _ []byte) harness.Disk { return harness.DefaultDisk(key) })
	data := part(t, s.disk, "data")
	editLUKSJSON(t, s.disk.Path, data.Offset, func(m map[string]any) {
		m["segments"].(map[string]any)["0"].(map[string]any)["encryption"] = "cipher_null-ecb"
	})
	s.start(t, ctx)
	img := s.image(t, ctx, fmt.Sprintf(`root:
  device: PARTLABEL=root
  fstype: ext4
volumes:
  - name: data
    device: PARTLABEL=data
    mount: %s
  - name: swap
    device: PARTLABEL=swap
    swap: true
  - name: logs
    device: PARTLABEL=logs
    mount: /var/log/postgresql
`, harness.DataMountPoint))
	before := map[string][]byte{}
	for _, n := range []string{"root", "data", "swap"} {
		b, err := s.disk.ReadPartition(n)
		if err != nil {
			t.Fatal(err)
		}
		before[n] = b
	}
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}}, "rd.unlockrd.device-timeout=10s")
	vm.ExpectLine(`^unlockrd: devices: volume data on /dev/vda2: LUKS header refused: segment 0 cipher "cipher_null-ecb" is not on the allow-list; no key will be tried on it$`, stageTimeout)
	l := vm.ExpectLine(`^unlockrd: volume logs: device not found: PARTLABEL=logs; block devices seen: `, stageTimeout)
	for _, want := range []string{
		"/dev/vda (gpt",
		"/dev/vda1 (PARTLABEL=root PARTUUID=" + strings.ToLower(part(t, s.disk, "root").PartUUID) + " ext4",
		"/dev/vda2 (PARTLABEL=data", "LUKS2",
		"/dev/vda3 (PARTLABEL=swap",
	} {
		if !strings.Contains(l, want) {
			t.Errorf("device listing lacks %q: %s", want, l)
		}
	}
	if !strings.HasSuffix(l, "; halting") {
		t.Errorf("the last refusal does not say what happens next: %s", l)
	}
	if err := vm.VM.Wait(bootTimeout); err != nil {
		t.Fatal(err)
	}
	if l, ok := vm.Find(`^unlockrd: (key: [0-9]+ key|volumes:|swap:|mount:)`); ok {
		t.Errorf("boot went on past the refusal: %s", l.Text)
	}
	if strings.Contains(s.server.Logs(), s.uuid) {
		t.Errorf("a key was fetched although the header was refused:\n%s", s.server.Logs())
	}
	for n, b := range before {
		after, err := s.disk.ReadPartition(n)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, after) {
			t.Errorf("partition %s changed although nothing was unlocked", n)
		}
	}
}

func writeDisk(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// editLUKSJSON rewrites the JSON of both header copies of the LUKS2
// volume at off in the image and fixes their checksums, as an attacker
// with write access would: the checksum authenticates nothing.
func editLUKSJSON(t *testing.T, path string, off int64, edit func(map[string]any)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	bin := make([]byte, 4096)
	if _, err := f.ReadAt(bin, off); err != nil {
		t.Fatal(err)
	}
	size := int64(binary.BigEndian.Uint64(bin[8:16]))
	for c := int64(0); c < 2; c++ {
		hdr := make([]byte, size)
		if _, err := f.ReadAt(hdr, off+c*size); err != nil {
			t.Fatal(err)
		}
		js := hdr[4096:]
		js = js[:bytes.IndexByte(js, 0)]
		var m map[string]any
		if err := json.Unmarshal(js, &m); err != nil {
			t.Fatalf("header copy %d: %v", c, err)
		}
		edit(m)
		nj, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		clear(hdr[4096:])
		copy(hdr[4096:], nj)
		clear(hdr[0x1c0 : 0x1c0+64])
		sum := sha256.Sum256(hdr)
		copy(hdr[0x1c0:], sum[:])
		if _, err := f.WriteAt(hdr, off+c*size); err != nil {
			t.Fatal(err)
		}
	}
}

// TestVolumesEncryptedRootFromSecondaryHeader: an encrypted root named by
// UUID= whose primary LUKS2 header is destroyed is still recognised as
// LUKS2 (by its secondary copy), opened from that copy and mounted. Before
// the probe result was typed, the boot compared its display string with
// "LUKS2", never made the root a volume, and tried to mount the raw
// partition.
func TestVolumesEncryptedRootFromSecondaryHeader(t *testing.T) {
	ctx := t.Context()
	s := newVolSetup(t, ctx, func(key, hello []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 48 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "root"},
				FS: harness.TestRoot("rootfs", harness.TestInitConfig{Files: []string{harness.HelloPath}})},
		}}
	})
	root := part(t, s.disk, "root")
	writeDisk(t, s.disk.Path, root.Offset, bytes.Repeat([]byte{0x5a}, 4096)) // magic and all
	s.start(t, ctx)
	img := s.image(t, ctx, fmt.Sprintf(`root:
  device: UUID=%s
`, root.LUKS.UUID))
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	vm.ExpectLine(`^unlockrd: devices: volume root on /dev/vda1: primary LUKS header damaged \(.*no LUKS magic.*\), using the intact secondary copy$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume root: /dev/vda1 opened with key 1 of 1, keyslot 0 -> /dev/mapper/root`, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if rep.Root != "/dev/mapper/root ext4" {
		t.Errorf("root = %q, want /dev/mapper/root ext4", rep.Root)
	}
	vm.Wait(bootTimeout)
}

// checkRotated checks from outside that each named LUKS partition opens
// with the host's current key only (cryptsetup, on the image), with one
// keyslot left, and that the key server finished the rotation itself:
// state active, one key.
func checkRotated(t *testing.T, ctx context.Context, s *volSetup, names []string) {
	t.Helper()
	cur, err := harness.HostKey(ctx, s.bins.KeyServer, s.data, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, n := range names {
		file, err := s.disk.ExtractPartition(n, dir)
		if err != nil {
			t.Fatal(err)
		}
		dump, err := harness.LuksDump(ctx, file)
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		if c := strings.Count(dump, ": luks2\n"); c != 1 {
			t.Errorf("%s: %d keyslots after the rotation, want 1:\n%s", n, c, dump)
		}
		if slot, err := harness.CryptsetupOpens(ctx, file, cur); err != nil || slot < 0 {
			t.Errorf("%s: the current key does not open it (slot %d, %v)", n, slot, err)
		}
		if slot, err := harness.CryptsetupOpens(ctx, file, s.key); err != nil || slot >= 0 {
			t.Errorf("%s: the old key still opens it (slot %d, %v)", n, slot, err)
		}
	}
	if st, ids, err := harness.HostState(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || st != "active" || len(ids) != 1 {
		t.Errorf("key server after the rotation: state %q keys %v (%v), want active with one key", st, ids, err)
	}
}
