package qemutests

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// provisionDisk is a root with the test init and two blank partitions a
// configuration marks provision: data (ext4) and swap (LUKS2 swap).
func provisionDisk(_, _ []byte) harness.Disk {
	return harness.Disk{Partitions: []harness.Partition{
		{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{}, harness.DataMountPoint)},
		{Name: "data", Size: 40 << 20},
		{Name: "swap", Size: 24 << 20, Swap: true},
	}}
}

const provisionYAML = `root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: ` + harness.DataMountPoint + `
    provision: true
  - name: swap
    device: PARTLABEL=swap
    swap: true
    provision: true
`

// checkProvisioned checks, from outside, that partition name of the disk
// is a LUKS2 volume cryptsetup accepts that opens with key (and only in
// one keyslot), aes-xts-plain64 with a 512-bit key and a PBKDF2 slot, and
// that its last MiB is outside the data segment.
func checkProvisioned(t *testing.T, ctx context.Context, s *volSetup, name string, key []byte) string {
	t.Helper()
	file, err := s.disk.ExtractPartition(name, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dump, err := harness.LuksDump(ctx, file)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, want := range []string{"Version:       \t2", "cipher: aes-xts-plain64", "PBKDF:      pbkdf2", "  0: luks2"} {
		if !strings.Contains(dump, want) {
			t.Errorf("%s: luksDump lacks %q:\n%s", name, want, dump)
		}
	}
	if !regexp.MustCompile(`(?m)^\s+Cipher key:\s+512 bits`).MatchString(dump) {
		t.Errorf("%s: not a 512-bit key:\n%s", name, dump)
	}
	if n := strings.Count(dump, ": luks2\n"); n != 1 {
		t.Errorf("%s: %d keyslots, want 1:\n%s", name, n, dump)
	}
	slot, err := harness.CryptsetupOpens(ctx, file, key)
	if err != nil || slot != 0 {
		t.Errorf("%s: cryptsetup open --test-passphrase with the host key: slot %d, %v", name, slot, err)
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[len(raw)-1<<20:], make([]byte, 1<<20)) {
		t.Errorf("%s: the last MiB was written (it is outside the data segment)", name)
	}
	return dump
}

// volumeKeyOf asks cryptsetup for the volume key of partition name, opened
// with key (test material, written to a private temporary file).
func volumeKeyOf(t *testing.T, ctx context.Context, s *volSetup, name string, key []byte) []byte {
	t.Helper()
	dir := t.TempDir()
	file, err := s.disk.ExtractPartition(name, dir)
	if err != nil {
		t.Fatal(err)
	}
	kf := filepath.Join(dir, "key")
	if err := os.WriteFile(kf, key, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, file).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: cryptsetup luksDump --dump-volume-key: %v: %s", name, err, out)
	}
	// "MK dump:\t11 22 ...", continued on indented lines of hex pairs.
	_, rest, ok := strings.Cut(string(out), "MK dump:")
	if !ok {
		t.Fatalf("%s: no MK dump in:\n%s", name, out)
	}
	var vk []byte
	for _, f := range strings.Fields(rest) {
		b, err := hex.DecodeString(f)
		if err != nil || len(b) != 1 {
			break
		}
		vk = append(vk, b[0])
	}
	if len(vk) != 64 {
		t.Fatalf("%s: volume key of %d bytes from:\n%s", name, len(vk), out)
	}
	return vk
}

// assertNoSecrets fails if any secret appears, in hex (either case) or
// base64 (standard or URL alphabet), on the VM's console or in logs.
func assertNoSecrets(t *testing.T, vm *harness.VM, logs string, secrets map[string][]byte) {
	t.Helper()
	var console strings.Builder
	for _, l := range vm.Lines() {
		console.WriteString(l.Text + "\n")
	}
	for what, b := range secrets {
		forms := []string{hex.EncodeToString(b), strings.ToUpper(hex.EncodeToString(b)),
			base64.StdEncoding.EncodeToString(b), base64.RawURLEncoding.EncodeToString(b)}
		for _, f := range forms {
			if strings.Contains(console.String(), f) {
				t.Errorf("%s on the console", what)
			}
			if strings.Contains(logs, f) {
				t.Errorf("%s in the key server's log", what)
			}
		}
	}
}

// TestLifecycleProvision: a new host with blank data and swap partitions
// marked provision formats both at first boot (data gets ext4), mounts
// data, tells the key server, which then says active; the second boot
// only unlocks. cryptsetup judges the result on the image file.
func TestLifecycleProvision(t *testing.T) {
	ctx := t.Context()
	s := newVolSetup(t, ctx, provisionDisk)
	s.start(t, ctx)
	if st, _, err := harness.HostState(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || st != "new" {
		t.Fatalf("enrolled host: state %q (%v), want new", st, err)
	}
	img := s.image(t, ctx, provisionYAML)

	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	vm.ExpectLine(`^unlockrd: devices: volume data on /dev/vda2: no LUKS2 header, blank: formatted if the key server says the key is new$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: the key server says host `+s.uuid+` is new$`, stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume data: /dev/vda2 provisioned: was blank: formatted LUKS2 \(UUID [0-9a-f-]{36}, 4096-byte sectors, keyslot 0 for key 1\) with ext4 -> /dev/mapper/data `, stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume swap: /dev/vda3 provisioned: was blank: formatted LUKS2 .* with swap`, stageTimeout)
	vm.ExpectLine(`^unlockrd: key: confirmed provisioned with key [0-9.-]+ to `, stageTimeout)
	rep := vm.ExpectReport(bootTimeout)
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" || m.FSType != "ext4" {
		t.Errorf("data mount = %+v, want the provisioned ext4", m)
	}
	if !swapOnDM(rep.Swaps) {
		t.Errorf("/proc/swaps = %q, want the provisioned dm swap", rep.Swaps)
	}
	vm.Wait(bootTimeout)

	checkProvisioned(t, ctx, s, "data", s.key)
	checkProvisioned(t, ctx, s, "swap", s.key)
	// The volume keys the initramfs made and the host key it formatted
	// with never reached the console or the key server's log.
	secrets := map[string][]byte{"host key": s.key}
	for _, name := range []string{"data", "swap"} {
		secrets[name+" volume key"] = volumeKeyOf(t, ctx, s, name, s.key)
	}
	assertNoSecrets(t, vm.VM, s.server.Logs(), secrets)
	if st, _, err := harness.HostState(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || st != "active" {
		t.Errorf("after provisioning: host state %q (%v), want active", st, err)
	}

	// Second boot: nothing to format, nothing to confirm.
	vm = s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	vm.ExpectLine(`^unlockrd: volumes: volume data: /dev/vda2 opened with key 1 of 1, keyslot 0 -> /dev/mapper/data`, stageTimeout)
	rep = vm.ExpectReport(bootTimeout)
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.FSType != "ext4" {
		t.Errorf("second boot: data mount = %+v", m)
	}
	vm.Wait(bootTimeout)
	if l, ok := vm.Find(`provisioned|confirmed|says host`); ok {
		t.Errorf("second boot provisioned or confirmed again: %s", l.Text)
	}
}

// mdMember is an md 1.2 superblock (4 KiB into the device) of a two-disk
// RAID1 member, checksummed as the kernel does.
func mdMember() []byte {
	b := make([]byte, 8192)
	sb := b[4096:]
	le := binary.LittleEndian
	le.PutUint32(sb[0:], 0xa92b4efc)
	le.PutUint32(sb[4:], 1)
	copy(sb[16:32], "unlockrd-md-test")
	copy(sb[32:], "host:0")
	le.PutUint32(sb[72:], 1)      // raid1
	le.PutUint64(sb[80:], 16384)  // size in sectors
	le.PutUint32(sb[92:], 2)      // raid disks
	le.PutUint64(sb[128:], 2048)  // data offset
	le.PutUint64(sb[136:], 16384) // data size
	le.PutUint64(sb[144:], 8)     // super offset: 1.2
	copy(sb[168:184], "unlockrd-md-dev0")
	le.PutUint32(sb[220:], 2) // max_dev
	var sum uint64
	for i := 0; i < 256+2*2; i += 4 {
		sum += uint64(le.Uint32(sb[i:]))
	}
	le.PutUint32(sb[216:], uint32(sum&0xffffffff+sum>>32))
	return b
}

// lvmPV is an LVM2 physical-volume label in sector 1, with LVM's CRC.
func lvmPV() []byte {
	b := make([]byte, 4096)
	l := b[512:1024]
	copy(l, "LABELONE")
	binary.LittleEndian.PutUint64(l[8:], 1)
	binary.LittleEndian.PutUint32(l[20:], 32)
	copy(l[24:], "LVM2 001")
	copy(l[32:], "UnlockrdTestPVuuid00000000000000")
	binary.LittleEndian.PutUint64(l[64:], 16<<20)
	crc := ^crc32.Update(^uint32(0xf597a6cf), crc32.IEEETable, l[20:])
	binary.LittleEndian.PutUint32(l[16:], crc)
	return b
}

// minixFS is the start of a minix file system made by mkfs.minix.
func minixFS(t *testing.T) []byte {
	f := filepath.Join(t.TempDir(), "minix.img")
	if err := os.WriteFile(f, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.minix", f).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.minix: %v: %s", err, out)
	}
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return b[:64<<10]
}

// TestLifecycleNeverFormatsSignatures: partitions marked provision that
// hold an ext4 file system, a LUKS2 volume whose primary header is
// destroyed, an md RAID member, an LVM PV or a minix file system (blkid
// names each) are never formatted, whatever the server says: the boot
// says why and halts, and not a byte of them changes.
func TestLifecycleNeverFormatsSignatures(t *testing.T) {
	ctx := t.Context()
	minix := minixFS(t)
	other := []byte("another host's passphrase")
	s := newVolSetup(t, ctx, func(_, _ []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{}, harness.DataMountPoint)},
			{Name: "ext4", Size: 24 << 20, FS: &harness.Ext4{Label: "old-data"}},
			{Name: "luks", Size: 24 << 20, LUKS: &harness.LUKS{Keys: [][]byte{other}, Label: "luks"}},
			{Name: "md", Size: 24 << 20, Raw: mdMember()},
			{Name: "lvm", Size: 24 << 20, Raw: lvmPV()},
			{Name: "minix", Size: 24 << 20, Raw: minix},
		}}
	})
	luks := part(t, s.disk, "luks")
	writeDisk(t, s.disk.Path, luks.Offset, bytes.Repeat([]byte{0x5a}, 4096))
	dir := t.TempDir()
	before := map[string][]byte{}
	for n, want := range map[string]string{"ext4": "TYPE=ext4", "luks": "TYPE=crypto_LUKS", "md": "TYPE=linux_raid_member", "lvm": "TYPE=LVM2_member", "minix": "TYPE=minix"} {
		b, err := s.disk.ReadPartition(n)
		if err != nil {
			t.Fatal(err)
		}
		before[n] = b
		f, err := s.disk.ExtractPartition(n, dir)
		if err != nil {
			t.Fatal(err)
		}
		// blkid may not see the LUKS2 secondary alone; the others it must.
		if got := harness.Blkid(ctx, f); n != "luks" && !strings.Contains(got, want) {
			t.Fatalf("fixture %s: blkid says %q, want %s", n, got, want)
		}
	}
	s.start(t, ctx)
	var vols strings.Builder
	for _, n := range []string{"ext4", "luks", "md", "lvm", "minix"} {
		fmt.Fprintf(&vols, "  - name: %s\n    device: PARTLABEL=%s\n    mount: /mnt/%s\n    provision: true\n", n, n, n)
	}
	img := s.image(t, ctx, "root:\n  device: PARTLABEL=root\nvolumes:\n"+vols.String())
	vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
	for _, n := range []string{"ext4", "md", "lvm", "minix"} {
		vm.ExpectLine(`^unlockrd: .*volume `+n+` on /dev/vda[0-9]: .*; and it is not blank, so provision never formats it: device is not blank`, stageTimeout)
	}
	vm.VM.Wait(bootTimeout)
	if l, ok := vm.Find(`provisioned|formatted LUKS2|mke2fs`); ok {
		t.Errorf("a device with a signature was formatted: %s", l.Text)
	}
	if l, ok := vm.Find(`^unlockrd: devices: volume luks on /dev/vda3: primary LUKS header damaged`); !ok {
		t.Errorf("the LUKS2 volume with a damaged primary was not recognised from its secondary (%v)", l)
	}
	for n, b := range before {
		after, err := s.disk.ReadPartition(n)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, after) {
			t.Errorf("partition %s changed", n)
		}
	}
}

// TestLifecycleProvisionFaults cuts the power before every write step of
// provisioning (each write to the device, mke2fs, the confirmation; the
// steps are found by counting until a boot runs through), each on a fresh
// blank disk, then boots normally: every point must end in a provisioned,
// mounted volume that cryptsetup opens with the host key, and a server
// that says active. Debian 12's kernel only: the flow is ours, not the
// kernel's.
func TestLifecycleProvisionFaults(t *testing.T) {
	ctx := t.Context()
	oneDisk := func(_, _ []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{}, harness.DataMountPoint)},
			{Name: "data", Size: 40 << 20},
		}}
	}
	yml := `root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: ` + harness.DataMountPoint + `
    provision: true
`
	for n := 1; n < 20; n++ {
		s := newVolSetup(t, ctx, oneDisk)
		s.start(t, ctx)
		img := s.imageWith(t, ctx, yml, "--test-faults")
		vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}}, fmt.Sprintf("rd.unlockrd.test-poweroff-at=provision:%d", n))
		l := vm.ExpectLine(`^unlockrd: (test: powering off before provision step|switch root: exec)`, bootTimeout)
		vm.Wait(bootTimeout)
		if !strings.Contains(l, "powering off") {
			if n < 6 {
				t.Fatalf("only %d write steps before the boot ran through", n-1)
			}
			t.Logf("provisioning has %d fault points; all covered", n-1)
			s.server.Stop()
			return
		}
		t.Logf("cut at provision step %d: %s", n, l)
		vm = s.vm(t, img, []harness.Drive{{Path: s.disk.Path}})
		rep := vm.ExpectReport(bootTimeout)
		if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" || m.FSType != "ext4" {
			t.Errorf("after a cut at step %d: data mount = %+v", n, m)
		}
		vm.Wait(bootTimeout)
		checkProvisioned(t, ctx, s, "data", s.key)
		if st, _, err := harness.HostState(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || st != "active" {
			t.Errorf("after a cut at step %d: host state %q (%v), want active", n, st, err)
		}
		s.server.Stop()
		if t.Failed() {
			return
		}
	}
	t.Fatal("more than 19 fault points: the steps are not counted right")
}

// TestLifecycleRotateFaults: the server rotates; boot k of a chain on one
// disk cuts the power before rotation step k of whatever the volume needs
// by then (a cut leaves a volume that opens with the old key, the new one
// or both, and the next boot picks up from there), until a boot runs
// through. The end: a volume cryptsetup opens with the new key only, one
// keyslot, and a server that says active. One boot per point on Debian
// 12's kernel; each write of luks2.AddKeyslot and RemoveKeyslot is cut in
// the luks2 unit tests as well.
func TestLifecycleRotateFaults(t *testing.T) {
	ctx := t.Context()
	s := newVolSetup(t, ctx, func(key, _ []byte) harness.Disk {
		return harness.Disk{Partitions: []harness.Partition{
			{Name: "root", Size: 32 << 20, FS: harness.TestRoot("root", harness.TestInitConfig{}, harness.DataMountPoint)},
			{Name: "data", Size: 24 << 20, LUKS: &harness.LUKS{Keys: [][]byte{key}, Label: "data"}, FS: &harness.Ext4{Label: "data"}},
		}}
	})
	if _, err := harness.RunTool(ctx, s.bins.KeyServer, "host", "rotate", "--data", s.data, s.uuid); err != nil {
		t.Fatal(err)
	}
	s.start(t, ctx)
	img := s.imageWith(t, ctx, `root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: `+harness.DataMountPoint+`
`, "--test-faults")
	for n := 1; n < 20; n++ {
		vm := s.vm(t, img, []harness.Drive{{Path: s.disk.Path}}, fmt.Sprintf("rd.unlockrd.test-poweroff-at=rotate:%d", n))
		l := vm.ExpectLine(`^unlockrd: (test: powering off before rotate step|switch root: exec)`, bootTimeout)
		if strings.Contains(l, "powering off") {
			vm.Wait(bootTimeout)
			t.Logf("boot %d: %s", n, l)
			continue
		}
		rep := vm.ExpectReport(bootTimeout)
		if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" {
			t.Errorf("after %d cuts: data mount = %+v", n-1, m)
		}
		vm.Wait(bootTimeout)
		if n < 4 {
			t.Fatalf("only %d rotation steps cut", n-1)
		}
		checkRotated(t, ctx, s, []string{"data"})
		return
	}
	t.Fatal("the chain never ran through")
}
