package qemutests

import (
	"bytes"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/u-root/mkuimage/cpio"

	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/netboot/host/pxe"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// requestLog serves a folder over HTTP and records the paths asked for.
type requestLog struct {
	mu    sync.Mutex
	paths []string
	files http.Handler
}

func (l *requestLog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	l.mu.Lock()
	l.paths = append(l.paths, r.Method+" "+r.URL.Path)
	l.mu.Unlock()
	l.files.ServeHTTP(w, r)
}

func (l *requestLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.paths...)
}

// TestNetbootPXEUnlocksAndSwitchesRoot boots the `mkunlockrd netboot`
// bundle the way a PXE host does: QEMU's own iPXE ROM (-boot n, no
// -kernel) gets DHCP from QEMU's user network, whose boot file is the
// bundle's boot.ipxe on an HTTP server on the host's 127.0.0.1; the script
// loads the kernel and image by its relative paths. The booted image then
// has to unlock and switch root exactly like a direct-kernel boot, with the
// kernel command line the script passed.
func TestNetbootPXEUnlocksAndSwitchesRoot(t *testing.T) {
	kernelcache.Each(t, testNetbootPXE)
}

func testNetbootPXE(t *testing.T, k harness.KernelFiles) {
	ctx := t.Context()
	s := newSkeletonOn(t, ctx, k)
	s.start(t, ctx)
	dir := t.TempDir()
	yml := filepath.Join(dir, "unlockrd.yaml")
	cfg := harness.ImageConfig{URLs: []string{s.server.GuestURL()}, Pins: []string{s.server.Pin}}
	if err := os.WriteFile(yml, []byte(cfg.YAML()), 0o644); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(dir, "pxe")
	// A marker argument proves the command line came from boot.ipxe.
	marker := "unlockrd.pxetest=" + s.uuid[:8]
	out, err := harness.RunTool(ctx, s.bins.Mkunlockrd, "netboot", "-c", yml, "-k", k.Vmlinuz, "-m", k.Modules,
		"-o", bundle, "--append", "console=ttyS0 panic=-1 "+marker)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("mkunlockrd netboot:\n%s", out)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reqs := &requestLog{files: http.FileServer(http.Dir(bundle))}
	srv := &http.Server{Handler: reqs}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	guest, err := harness.GuestAddr(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}

	opts := s.vmOptions("")
	opts.Name = "pxe"
	opts.NetBoot = true
	opts.Network = harness.NIC{Netdev: "user,bootfile=http://" + guest + "/" + pxe.ScriptFile}
	vm := harness.StartVM(t, opts)

	vm.ExpectLine(`^unlockrd: switch root: exec /sbin/init \(initramfs [0-9.]+s`, bootTimeout)
	for _, st := range []string{"modules", "network", "devices", "key", "volumes", "swap", "mount"} {
		if _, ok := vm.Find(stageLine(st)); !ok {
			t.Errorf("no %s stage line with a duration on the console", st)
		}
	}
	if l, ok := vm.Find(`^unlockrd: modules: image was built for kernel`); ok {
		t.Errorf("release check failed on the bundle's own kernel: %s", l.Text)
	}
	rep := vm.ExpectReport(bootTimeout)
	if rep.PID != 1 || !rep.InitramfsGone {
		t.Errorf("real init PID %d, initramfs gone %v; want 1, true", rep.PID, rep.InitramfsGone)
	}
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
		t.Errorf("data file %s = %+v, want sha256 %s", harness.HelloPath, f, s.fx.HelloSHA256())
	}
	if m, ok := rep.Mount(harness.DataMountPoint); !ok || m.Source != "/dev/mapper/data" || m.FSType != "ext4" {
		t.Errorf("data mount = %+v, want /dev/mapper/data (ext4)", m)
	}
	if !swapOnDM(rep.Swaps) {
		t.Errorf("/proc/swaps = %q, want an encrypted (dm) swap", rep.Swaps)
	}
	if tbl, ok := rep.DMTable("data"); !ok || !strings.Contains(tbl, "aes-xts-plain64") {
		t.Errorf("dm table of data = %q", tbl)
	}
	for _, arg := range []string{"initrd=" + pxe.InitramfsFile, marker} {
		if !strings.Contains(" "+rep.Cmdline+" ", " "+arg+" ") {
			t.Errorf("/proc/cmdline %q lacks %s: the command line did not come from boot.ipxe", rep.Cmdline, arg)
		}
	}
	vm.Wait(bootTimeout)

	// iPXE fetched the script, then the kernel and the image by the
	// script's relative paths (nothing else serves them).
	want := []string{"GET /" + pxe.ScriptFile, "GET /" + pxe.KernelFile, "GET /" + pxe.InitramfsFile}
	got := reqs.get()
	next := 0
	for _, r := range got {
		if next < len(want) && r == want[next] {
			next++
		}
	}
	if next != len(want) {
		t.Errorf("HTTP requests %v, want %v in that order", got, want)
	}
	if !strings.Contains(s.server.Logs(), s.uuid) {
		t.Errorf("key server audit log does not mention the host:\n%s", s.server.Logs())
	}
}

// TestReleaseMismatchSaysSo boots an image whose recorded kernel release
// is not the running kernel's: the init must say so on the console. (The
// release file is overridden by a second cpio archive appended to the
// image, which the kernel unpacks over the first.)
func TestReleaseMismatchSaysSo(t *testing.T) {
	ctx := t.Context()
	b, err := harness.Binaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	k, err := harness.Kernel()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	img, err := harness.BuildImage(ctx, b, harness.ImageConfig{
		URLs: []string{"https://" + harness.GuestHostIP + ":9/v1/keys/{host}"},
		Pins: []string{"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="},
	}, dir, "--compress", "none")
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// A cpio archive that follows another must start 4-byte aligned; the
	// kernel skips the zeros in between.
	for len(data)%4 != 0 {
		data = append(data, 0)
	}
	const other = "6.1.0-0-other"
	var extra bytes.Buffer
	w := cpio.Newc.Writer(&extra)
	if err := w.WriteRecord(cpio.StaticFile(layout.ReleasePath, other+"\n", 0o644)); err != nil {
		t.Fatal(err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		t.Fatal(err)
	}
	mixed := filepath.Join(dir, "mismatch.img")
	if err := os.WriteFile(mixed, append(data, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}
	vm := harness.StartVM(t, harness.VMOptions{Name: "mismatch", Initramfs: mixed, NoNetwork: true})
	vm.ExpectLine(`^unlockrd: modules: image was built for kernel `+other+` but the running kernel is `+k.Release+`: its modules cannot load$`, bootTimeout)
}
