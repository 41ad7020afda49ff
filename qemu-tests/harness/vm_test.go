package harness

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/kmod"

	"github.com/u-root/mkuimage/cpio"
	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
)

func TestQEMUArgs(t *testing.T) {
	o := VMOptions{
		Disks:     []Drive{{Path: "/d/a,b.img"}, {Path: "/d/c.img", ReadOnly: true, Serial: "s1"}},
		Network:   NIC{MAC: "52:54:00:00:00:01"},
		ExtraNICs: []NIC{{Netdev: "user,restrict=on", Device: "e1000"}},
		SMBIOS:    []string{"type=11,value=io.systemd.credential:unlockrd.token=t"},
		UUID:      "8a1c4c1e-7a7e-4a5e-9b0e-0d6c1c2b3a4f",
		QEMUArgs:  []string{"-s"},
	}
	got := strings.Join(o.qemuArgs(), " ")
	want := "-accel tcg -cpu max -m 1024 -smp 2 -no-reboot" +
		" -drive file=/d/a,,b.img,if=virtio,format=raw" +
		" -drive file=/d/c.img,if=virtio,format=raw,readonly=on,serial=s1" +
		" -netdev user,id=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01" +
		" -netdev user,id=n1,restrict=on -device e1000,netdev=n1" +
		" -smbios type=11,value=io.systemd.credential:unlockrd.token=t" +
		" -uuid 8a1c4c1e-7a7e-4a5e-9b0e-0d6c1c2b3a4f -s"
	if got != want {
		t.Errorf("args\n got %s\nwant %s", got, want)
	}
	o = VMOptions{NoNetwork: true, MemoryMB: 512, CPUs: 1}
	if got := strings.Join(o.qemuArgs(), " "); got != "-accel tcg -cpu max -m 512 -smp 1 -no-reboot -nic none" {
		t.Errorf("no network: %s", got)
	}
}

func TestGuestAddr(t *testing.T) {
	for in, want := range map[string]string{"127.0.0.1:8443": "10.0.2.2:8443", "[::]:80": "10.0.2.2:80", "localhost:1": "10.0.2.2:1", "192.0.2.1:80": "", "nope": ""} {
		got, err := GuestAddr(in)
		if got != want || (err == nil) != (want != "") {
			t.Errorf("GuestAddr(%q) = %q, %v", in, got, err)
		}
	}
}

func TestVMLockSerialises(t *testing.T) {
	ctx := context.Background()
	release, err := acquireVMLock(ctx, "a", nil)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if _, err := acquireVMLock(short, "b", nil); err == nil {
		t.Fatal("second holder got the lock")
	}
	release()
	release2, err := acquireVMLock(ctx, "c", nil)
	if err != nil {
		t.Fatal(err)
	}
	release2()
}

func TestCleanLine(t *testing.T) {
	for in, want := range map[string]string{
		"plain\r":                           "plain",
		"\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (x)": "SeaBIOS (x)",
		"tab\there\x00\x07":                 "tab\there",
		"\x1bcreset":                        "reset",
	} {
		if got := cleanLine([]byte(in)); got != want {
			t.Errorf("cleanLine(%q) = %q, want %q", in, got, want)
		}
	}
}

// fakeVM is a VM without QEMU, fed through its lineWriter.
func fakeVM() (*VM, *lineWriter) {
	v := &VM{name: "fake", start: time.Now(), changed: make(chan struct{}), done: make(chan struct{})}
	return v, &lineWriter{vm: v}
}

func (v *VM) fakeExit(err error) {
	v.mu.Lock()
	v.exited, v.exitErr = true, err
	close(v.changed)
	v.changed = make(chan struct{})
	v.mu.Unlock()
	close(v.done)
}

func TestExpectations(t *testing.T) {
	v, w := fakeVM()
	go func() {
		for _, s := range []string{"boot\r\n", "TESTINIT: pid=1\r\nTESTINIT: ro", "ot=/dev/vda1 ext4\r\n"} {
			time.Sleep(20 * time.Millisecond)
			w.Write([]byte(s))
		}
	}()
	if l, err := v.ExpectLine(`^TESTINIT: root=(\S+)`, time.Minute); err != nil || l != "TESTINIT: root=/dev/vda1 ext4" {
		t.Fatalf("ExpectLine = %q, %v", l, err)
	}
	// Lines before the cursor are consumed.
	if _, err := v.ExpectLine(`pid=1`, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "within") {
		t.Errorf("consumed line matched again: %v", err)
	}
	// A failed expectation consumes nothing.
	w.Write([]byte("after\n"))
	if _, err := v.ExpectLine(`nothing`, 50*time.Millisecond); err == nil {
		t.Error("matched nothing")
	}
	if _, err := v.ExpectLine(`^after$`, time.Second); err != nil {
		t.Errorf("line skipped after a failed expectation: %v", err)
	}
	w.Write([]byte("unlockrd: secret-ish\nTESTINIT: done\n"))
	if _, err := v.ExpectNot(`secret`, `done$`, time.Second); err == nil {
		t.Error("ExpectNot missed a bad line")
	}
	w.Write([]byte("TESTINIT: done\n"))
	if _, err := v.ExpectNot(`nothing like this`, `done$`, time.Second); err != nil {
		t.Error(err)
	}
	w.Write([]byte("Kernel panic - not syncing: Attempted to kill init!\npartial"))
	w.Close()
	v.fakeExit(nil)
	if _, err := v.ExpectLine(`never`, time.Minute); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("ExpectLine after exit: %v", err)
	}
	if err := v.Wait(time.Second); err == nil || !strings.Contains(err.Error(), "Kernel panic") {
		t.Errorf("Wait after panic: %v", err)
	}
	if ls := v.Lines(); ls[len(ls)-1].Text != "partial" {
		t.Errorf("last line %q", ls[len(ls)-1].Text)
	}
}

// TestExpectInterleavedKernelRecord: printk wrote a record into the middle
// of a line of ours (seen in CI); the expectation still finds our line,
// put back together, even when its rest arrives after the wait began, and
// ExpectNot sees it too.
func TestExpectInterleavedKernelRecord(t *testing.T) {
	v, w := fakeVM()
	go func() {
		w.Write([]byte("unlockrd: key: token: malformed (the value is no[    3.236634] ACPI: \\_SB_.LNKD: Enabled at IRQ 10\r\n"))
		time.Sleep(50 * time.Millisecond)
		w.Write([]byte("t base64); using rd.unlockrd.token= instead\r\nnext\r\n"))
	}()
	want := "unlockrd: key: token: malformed (the value is not base64); using rd.unlockrd.token= instead"
	if l, err := v.ExpectLine(`^unlockrd: key: token: malformed \(the value is not base64\); using`, time.Minute); err != nil || l != want {
		t.Fatalf("ExpectLine = %q, %v; want %q", l, err, want)
	}
	if l, err := v.ExpectLine(`^next$`, time.Second); err != nil {
		t.Fatalf("the line after: %q, %v", l, err)
	}
	// The kernel's own record is still a line of its own.
	if _, ok := v.Find(`^unlockrd: key: .*\[    3\.236634\] ACPI`); !ok {
		t.Error("raw line lost")
	}
	w.Write([]byte("unlockrd: sec[    4.000000] kernel says hi\r\nret leaked\r\nTESTINIT: done\r\n"))
	if _, err := v.ExpectNot(`secret leaked`, `done$`, time.Second); err == nil {
		t.Error("ExpectNot missed a bad line split by a kernel record")
	}
	// A record at the start of a line is no interleaving.
	if _, ok := interleavedPrefix("[    5.000000] virtio_blk virtio1: [vda]"); ok {
		t.Error("a kernel line taken for an interleaved one")
	}
}

func TestParseReport(t *testing.T) {
	lines := strings.Split(`TESTINIT: pid=7
noise from the kernel
TESTINIT: pid=1
TESTINIT: root=/dev/vda1 ext4
TESTINIT: file /a sha256=00ff content=hello world
TESTINIT: file /b error=open /b: no such file or directory
TESTINIT: swaps /dev/dm-1 partition 12284 0 -2
TESTINIT: mounts /dev/vda1 / ext4 ro,relatime 0 0
TESTINIT: mounts /dev/mapper/data /var/lib/postgresql ext4 rw,noatime 0 0
TESTINIT: links lo flags=up|loopback|running mac=- addrs=127.0.0.1/8,::1/128
TESTINIT: links eth0 flags=up|broadcast|multicast mac=52:54:00:12:34:56 addrs=-
TESTINIT: route eth0 0.0.0.0/0 gw=10.0.2.2
TESTINIT: block vda2 type=partition size=25165824 partn=2 start=67584 partname=data
TESTINIT: dm data 0 40960 crypt aes-xts-plain64 <key> 0 254:2 8192 1 no_read_workqueue
TESTINIT: cmdline console=ttyS0 quiet
TESTINIT: initramfs-gone=true
TESTINIT: what is this
TESTINIT: done`, "\n")
	r, err := ParseReport(lines)
	if err != nil {
		t.Fatal(err)
	}
	if r.PID != 1 || r.Root != "/dev/vda1 ext4" || !r.InitramfsGone || r.Cmdline != "console=ttyS0 quiet" {
		t.Errorf("report %+v", r)
	}
	if f := r.Files["/a"]; f.SHA256 != "00ff" || f.Content != "hello world" {
		t.Errorf("/a %+v", f)
	}
	if f := r.Files["/b"]; f.Error == "" {
		t.Errorf("/b %+v", f)
	}
	if tbl, ok := r.DMTable("data"); !ok || !strings.Contains(tbl, "no_read_workqueue") {
		t.Errorf("dm data %q", tbl)
	}
	if m, ok := r.Mount("/var/lib/postgresql"); !ok || m.Source != "/dev/mapper/data" || m.Options != "rw,noatime" {
		t.Errorf("mount %+v", m)
	}
	if a, ok := r.LinkAddrs("lo"); !ok || len(a) != 2 {
		t.Errorf("lo %v", a)
	}
	if a, ok := r.LinkAddrs("eth0"); !ok || a != nil {
		t.Errorf("eth0 %v", a)
	}
	if _, ok := r.LinkAddrs("eth1"); ok {
		t.Error("eth1 exists")
	}
	if len(r.Swaps) != 1 || len(r.Routes) != 1 || len(r.Blocks) != 1 || len(r.Other) != 1 {
		t.Errorf("swaps %v routes %v blocks %v other %v", r.Swaps, r.Routes, r.Blocks, r.Other)
	}
	if _, err := ParseReport([]string{"TESTINIT: done"}); err == nil {
		t.Error("report without pid")
	}
}

func TestMissingQEMUIsAnError(t *testing.T) {
	t.Setenv("VMTEST_QEMU", "")
	t.Setenv("PATH", t.TempDir())
	_, err := Start(context.Background(), VMOptions{Initramfs: "/nonexistent"}, nil)
	if err == nil || !strings.Contains(err.Error(), "make deps") {
		t.Errorf("Start without QEMU: %v", err)
	}
}

func TestKernelAndQEMUFound(t *testing.T) {
	k, err := Kernel()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(k.Release, "6.1.") {
		t.Errorf("release %q", k.Release)
	}
	if _, err := QEMUBinary(); err != nil {
		t.Fatal(err)
	}
}

// smokeModules are what the test init needs to see virtio disks and NICs,
// run dm-crypt with AES-XTS and mount ext4. The load order comes from the
// builder's module closure: it changes between kernel builds (in 6.1.0-56
// virtio needs virtio_ring first, in -48 the other way round).
var smokeModules = []string{"virtio_pci", "virtio_blk", "virtio_net", "dm_crypt", "xts", "crc32c_generic", "ext4"}

// closureOrder returns module name -> file in load order for names.
func closureOrder(t *testing.T, dir string, names []string) ([]string, map[string]string) {
	t.Helper()
	tree, err := kmod.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := tree.Closure(names)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	files := map[string]string{}
	for _, m := range mods {
		order = append(order, m.Name)
		files[m.Name] = filepath.Join(dir, m.Path)
	}
	return order, files
}

// writeInitramfs writes a gzip'd newc cpio with /init, /dev/console and
// the given files (path → content).
func writeInitramfs(t *testing.T, path string, initBin []byte, files map[string][]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zw := gzip.NewWriter(f)
	w := cpio.Newc.Writer(zw)
	recs := []cpio.Record{
		cpio.Directory("dev", 0o755),
		// The kernel opens /dev/console for init before anything mounts
		// devtmpfs; without it init runs with no stdout.
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.Directory("proc", 0o555),
		cpio.Directory("sys", 0o555),
		cpio.StaticFile("init", string(initBin), 0o755),
	}
	var names []string
	for name := range files {
		names = append(names, name)
	}
	slices.Sort(names)
	dirs := map[string]bool{"dev": true, "proc": true, "sys": true}
	var dirList []string
	for _, name := range names {
		for d := filepath.Dir(name); d != "."; d = filepath.Dir(d) {
			if !dirs[d] {
				dirs[d] = true
				dirList = append(dirList, d)
			}
		}
	}
	slices.Sort(dirList) // parents sort before their children
	for _, d := range dirList {
		recs = append(recs, cpio.Directory(d, 0o755))
	}
	for _, name := range names {
		recs = append(recs, cpio.StaticFile(name, string(files[name]), 0o644))
	}
	if err := cpio.WriteRecords(w, recs); err != nil {
		t.Fatal(err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestQEMUSmoke boots the cached kernel with the test init as /init of a
// tiny initramfs and the default disk (plus a 512-byte-sector LUKS volume)
// attached. The init loads virtio, dm-crypt and ext4, maps the encrypted
// partitions with the volume keys through the kernel's dm-crypt, mounts
// them and reports. This proves the VM runner, the test init, the GPT as
// the guest kernel parses it, and that the harness's userspace AES-XTS
// matches dm-crypt for both sector sizes.
func TestQEMUSmoke(t *testing.T) {
	ctx := context.Background()
	k, err := Kernel()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()

	key := []byte("smoke key")
	d := DefaultDisk(key)
	hello512 := []byte("512-byte sectors decrypt too\n")
	d.Partitions = append(d.Partitions, Partition{
		Name: "d512", Size: 12 * mib,
		LUKS: &LUKS{Keys: [][]byte{key}, SectorSize: 512},
		FS:   &Ext4{Label: "d512", Files: []File{{Path: "/hello512.txt", Data: hello512}}},
	})
	start := time.Now()
	bd, err := d.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("disk built in %s", time.Since(start))

	initPath, err := BuildTestInit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	initBin, err := os.ReadFile(initPath)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	cfg := initcfg.Config{WaitSeconds: 120}
	order, mods := closureOrder(t, k.Modules, smokeModules)
	for _, m := range order {
		b, err := os.ReadFile(mods[m])
		if err != nil {
			t.Fatal(err)
		}
		files["lib/modules/"+m+".ko"] = b
		cfg.Modules = append(cfg.Modules, "/lib/modules/"+m+".ko")
	}
	data, _ := bd.Partition("data")
	d512, _ := bd.Partition("d512")
	root, _ := bd.Partition("root")
	cfg.Wait = []string{d512.Device()}
	cfg.Crypt = []initcfg.Crypt{
		{Name: "data", Device: data.Device(), Key: hex.EncodeToString(data.LUKS.VolumeKey),
			Offset: uint64(data.LUKS.DataOffset / 512), SectorSize: data.LUKS.SectorSize,
			Flags: []string{"no_read_workqueue", "no_write_workqueue"}},
		{Name: "d512", Device: d512.Device(), Key: hex.EncodeToString(d512.LUKS.VolumeKey),
			Offset: uint64(d512.LUKS.DataOffset / 512)},
	}
	cfg.Mounts = []initcfg.Mount{
		{Source: "/dev/mapper/data", Target: "/mnt/data", FSType: "ext4", ReadOnly: true},
		{Source: "/dev/mapper/d512", Target: "/mnt/d512", FSType: "ext4", ReadOnly: true},
		{Source: root.Device(), Target: "/mnt/root", FSType: "ext4", ReadOnly: true},
	}
	cfg.Files = []string{"/mnt/data" + HelloFile, "/mnt/d512/hello512.txt", "/mnt/root/sbin/init", "/missing"}
	cj, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	files[strings.TrimPrefix(initcfg.Path, "/")] = cj
	initramfs := filepath.Join(dir, "initramfs.img")
	writeInitramfs(t, initramfs, initBin, files)

	start = time.Now()
	vm := StartVM(t, VMOptions{
		Name:      "smoke",
		Initramfs: initramfs,
		Disks:     []Drive{{Path: bd.Path}},
		Append:    []string{"harness.smoke=marker-7f3a"},
		UUID:      "8a1c4c1e-7a7e-4a5e-9b0e-0d6c1c2b3a4f",
	})
	pid := vm.ExpectLine(`^TESTINIT: pid=\d+$`, 3*time.Minute)
	t.Logf("test init started after %s", time.Since(start))
	if pid != "TESTINIT: pid=1" {
		t.Errorf("init line %q", pid)
	}
	vm.ExpectNot(`Kernel panic|TESTINIT: .*error=`, `^TESTINIT: root=`, 3*time.Minute)
	rep := vm.ExpectReport(5 * time.Minute)
	vm.Wait(3 * time.Minute)
	t.Logf("VM powered off after %s", time.Since(start))
	if !vm.PoweredOff() {
		t.Error("no power-off message")
	}
	// A volume key must never reach the console.
	for _, p := range []*BuiltPartition{data, d512} {
		if l, ok := vm.Find(hex.EncodeToString(p.LUKS.VolumeKey)); ok {
			t.Errorf("volume key of %s on the console: %q", p.Name, l.Text)
		}
	}
	if l, ok := vm.Find(`^TESTINIT: umount`); ok {
		t.Errorf("shutdown: %s", l.Text)
	}

	for _, s := range rep.Setup {
		if strings.Contains(s, "error") || strings.Contains(s, "timeout") {
			t.Errorf("setup: %s", s)
		}
	}
	if rep.Root != "rootfs rootfs" {
		t.Errorf("root %q", rep.Root)
	}
	if !strings.Contains(rep.Cmdline, "harness.smoke=marker-7f3a") || !strings.Contains(rep.Cmdline, "console=ttyS0 panic=-1") {
		t.Errorf("cmdline %q", rep.Cmdline)
	}
	if rep.InitramfsGone {
		t.Error("initramfs-gone=true while running from the initramfs")
	}
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	for path, want := range map[string][]byte{
		"/mnt/data" + HelloFile:  d.Hello(),
		"/mnt/d512/hello512.txt": hello512,
		"/mnt/root/sbin/init":    initBin,
	} {
		if got := rep.Files[path]; got.SHA256 != sum(want) {
			t.Errorf("%s: %+v, want sha256 %s", path, got, sum(want))
		}
	}
	if !slices.Contains(vm.lineTexts(), FileLine("/mnt/data"+HelloFile, d.Hello())) {
		t.Error("FileLine doesn't match the test init's line")
	}
	if c := rep.Files["/mnt/root/sbin/init"].Content; c != "<binary>" {
		t.Errorf("binary content shown as %q", c)
	}
	if f := rep.Files["/missing"]; !strings.Contains(f.Error, "no such file") {
		t.Errorf("/missing: %+v", f)
	}

	// The guest kernel reads the GPT as the harness wrote it.
	for _, p := range bd.Partitions {
		want := fmt.Sprintf("vda%d type=partition size=%d partn=%d start=%d partname=%s", p.Number, p.Size, p.Number, p.Offset/512, p.Name)
		if !slices.Contains(rep.Blocks, want) {
			t.Errorf("no block line %q in %q", want, rep.Blocks)
		}
	}

	// DM tables come with flags and without keys.
	tbl, ok := rep.DMTable("data")
	dataLen := (data.Size - data.LUKS.DataOffset) / 512
	if want := fmt.Sprintf(`^0 %d crypt aes-xts-plain64 <key> 0 \d+:\d+ %d 3 no_read_workqueue no_write_workqueue sector_size:4096$`, dataLen, data.LUKS.DataOffset/512); !ok || !regexp.MustCompile(want).MatchString(tbl) {
		t.Errorf("dm data %q, want %s", tbl, want)
	}
	tbl, ok = rep.DMTable("d512")
	if want := fmt.Sprintf(`^0 %d crypt aes-xts-plain64 <key> 0 \d+:\d+ %d$`, (d512.Size-d512.LUKS.DataOffset)/512, d512.LUKS.DataOffset/512); !ok || !regexp.MustCompile(want).MatchString(tbl) {
		t.Errorf("dm d512 %q, want %s", tbl, want)
	}
	if m, ok := rep.Mount("/mnt/data"); !ok || m.FSType != "ext4" || !strings.HasPrefix(m.Options, "ro") {
		t.Errorf("mount /mnt/data %+v", m)
	}
	if _, ok := rep.LinkAddrs("eth0"); !ok {
		t.Errorf("no eth0 in %q", rep.Links)
	}
}

func (v *VM) lineTexts() []string {
	var s []string
	for _, l := range v.Lines() {
		s = append(s, l.Text)
	}
	return s
}

// TestExpectReportInterleaved: a report line split by a kernel record is
// read whole.
func TestExpectReportInterleaved(t *testing.T) {
	v, w := fakeVM()
	w.Write([]byte("TESTINIT: pid=1\r\nTESTINIT: root=/dev/vd[    5.075614] printk: init: 9 output lines suppressed\r\na1 ext4\r\nTESTINIT: done\r\n"))
	r, err := v.ExpectReport(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.Root != "/dev/vda1 ext4" {
		t.Errorf("root %q, want /dev/vda1 ext4", r.Root)
	}
}
