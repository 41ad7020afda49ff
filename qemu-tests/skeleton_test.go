// Package qemutests boots Debian's stock kernel with unlockrd images under
// QEMU and checks, from the serial console, what the booted root reports.
package qemutests

import (
	"bytes"
	"context"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// Deadlines are minutes, not seconds: a TCG boot that takes 12 s can take
// 60 s when the machine is busy.
const (
	stageTimeout = 4 * time.Minute
	bootTimeout  = 6 * time.Minute
)

// skeleton is one walking-skeleton setup: a key server with one enrolled
// host, a disk whose volumes open with the host's key, and an image.
type skeleton struct {
	bins   *harness.Bins
	dir    string
	data   string // key server data folder
	uuid   string // SMBIOS UUID = host id
	token  string
	key    []byte
	fx     *harness.Fixture
	server *harness.KeyServer
	kernel harness.KernelFiles // the image's modules and the VM's kernel
}

// newSkeleton sets up the default kernel's skeleton.
func newSkeleton(t *testing.T, ctx context.Context) *skeleton {
	t.Helper()
	return newSkeletonOn(t, ctx, kernelcache.ForTest(t))
}

// newSkeletonOn sets up a skeleton that boots kernel k.
func newSkeletonOn(t *testing.T, ctx context.Context, k harness.KernelFiles) *skeleton {
	t.Helper()
	s := &skeleton{dir: t.TempDir(), uuid: harness.RandomUUID(), kernel: k}
	e, err := harness.Enroll(ctx, s.dir, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	s.bins, s.data, s.token, s.key = e.Bins, e.Data, e.Token, e.Key
	if len(s.key) != 32 {
		t.Fatalf("host key is %d bytes, want 32", len(s.key))
	}
	// The operator's flow: the volumes are formatted with the key taken
	// from the server.
	if s.fx, err = harness.NewFixture(ctx, s.dir, s.key); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *skeleton) start(t *testing.T, ctx context.Context) {
	t.Helper()
	srv, err := harness.StartKeyServer(ctx, s.bins.KeyServer, s.data, "", testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	s.server = srv
}

func (s *skeleton) image(t *testing.T, ctx context.Context, cfg harness.ImageConfig) string {
	t.Helper()
	if cfg.URLs == nil {
		cfg.URLs = []string{s.server.GuestURL()}
	}
	if cfg.Pins == nil {
		cfg.Pins = []string{s.server.Pin}
	}
	if cfg.Kernel == "" {
		cfg.Kernel = s.kernel.Name
	}
	img, err := harness.BuildImage(ctx, s.bins, cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func (s *skeleton) vmOptions(img string) harness.VMOptions {
	return harness.VMOptions{
		Kernel:    s.kernel.Vmlinuz,
		Initramfs: img,
		Disks:     []harness.Drive{{Path: s.fx.Disk.Path}},
		UUID:      s.uuid,
		SMBIOS:    []string{harness.TokenCredential(s.token)},
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// stageLine matches one stage line with its duration.
func stageLine(stage string) string {
	return `^unlockrd: ` + regexp.QuoteMeta(stage) + `: .* \([0-9]+\.[0-9]{2}s\)$`
}

// TestSkeletonBootUnlocksAndSwitchesRoot runs on every cached kernel, on
// QEMU's "max" CPU (AES-NI): the data volume's mapping must hold the
// AES-NI implementation of xts(aes), which the default image carries.
func TestSkeletonBootUnlocksAndSwitchesRoot(t *testing.T) {
	kernelcache.Each(t, testSkeletonBoot)
}

func testSkeletonBoot(t *testing.T, k harness.KernelFiles) {
	ctx := t.Context()
	s := newSkeletonOn(t, ctx, k)
	s.start(t, ctx)
	img := s.image(t, ctx, harness.ImageConfig{})
	vm := harness.StartVM(t, s.vmOptions(img))
	vm.ExpectLine(`^unlockrd: switch root: exec /sbin/init \(initramfs [0-9.]+s`, bootTimeout)
	// Independent stages overlap, so their lines come in any order; each
	// must be there, with its duration.
	for _, st := range []string{"modules", "network", "devices", "key", "volumes", "swap", "mount"} {
		l, ok := vm.Find(stageLine(st))
		if !ok {
			t.Fatalf("no %s stage line with a duration on the console", st)
		}
		t.Logf("stage line: %s", l.Text)
	}
	// The stage's own line (a new host's boot also prints what the server
	// says of it, and its confirmation, on other key: lines).
	if l, _ := vm.Find(`^unlockrd: key: [0-9]+ key\(s\) for host `); !strings.Contains(l.Text, "for host "+s.uuid) {
		t.Errorf("key line does not name the SMBIOS host id: %s", l.Text)
	}
	rep := vm.ExpectReport(bootTimeout)

	if rep.PID != 1 {
		t.Errorf("real init runs as PID %d, want 1", rep.PID)
	}
	if !rep.InitramfsGone {
		t.Errorf("initramfs contents still visible in the new root")
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
	tbl, ok := rep.DMTable("data")
	if !ok || !strings.Contains(tbl, "aes-xts-plain64") {
		t.Errorf("dm table of data = %q", tbl)
	}
	assertXTSAES(t, rep, "aesni_intel")
	vm.Wait(bootTimeout)
	if !strings.Contains(s.server.Logs(), s.uuid) {
		t.Errorf("key server audit log does not mention the host:\n%s", s.server.Logs())
	}
}

// TestSkeletonWithoutAESNIUsesGenericAES: on a CPU without AES-NI the
// default image's optional aesni_intel fails to load, the boot goes on,
// unlocks, and the mappings use the generic AES code.
func TestSkeletonWithoutAESNIUsesGenericAES(t *testing.T) {
	kernelcache.Each(t, func(t *testing.T, k harness.KernelFiles) {
		ctx := t.Context()
		s := newSkeletonOn(t, ctx, k)
		s.start(t, ctx)
		img := s.image(t, ctx, harness.ImageConfig{})
		o := s.vmOptions(img)
		o.CPU = harness.CPUNoAES
		vm := harness.StartVM(t, o)
		vm.ExpectLine(`^unlockrd: switch root: exec /sbin/init`, bootTimeout)
		l, ok := vm.Find(`^unlockrd: modules: module aesni_intel \(optional\) not loaded`)
		if !ok {
			t.Errorf("no console line saying the optional aesni_intel did not load")
		}
		t.Logf("console: %s", l.Text)
		rep := vm.ExpectReport(bootTimeout)
		if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
			t.Errorf("data file %s = %+v, want sha256 %s", harness.HelloPath, f, s.fx.HelloSHA256())
		}
		assertXTSAES(t, rep, "")
		vm.Wait(bootTimeout)
	})
}

// assertXTSAES checks which xts(aes) implementation the mappings hold: the
// one whose reference count the open mappings raised, from the guest's
// /proc/crypto. module "" means the generic code (no aesni_intel at all).
func assertXTSAES(t *testing.T, rep *harness.Report, module string) {
	t.Helper()
	impls := rep.XTSAES()
	for _, l := range rep.Crypto {
		t.Logf("guest /proc/crypto: %s", l)
	}
	for _, l := range rep.Modules {
		t.Logf("guest /proc/modules: %s", l)
	}
	var used *harness.CryptoImpl
	for i, c := range impls {
		if used == nil || c.Refcnt > used.Refcnt {
			used = &impls[i]
		}
	}
	if used == nil || used.Refcnt < 2 {
		t.Fatalf("no xts(aes) implementation in use in the guest's /proc/crypto: %q", rep.Crypto)
	}
	switch {
	case module != "" && used.Module != module:
		t.Errorf("the mappings use %s (module %s), want the %s implementation", used.Driver, used.Module, module)
	case module == "":
		for _, c := range impls {
			if c.Module == "aesni_intel" {
				t.Errorf("aesni_intel registered %s on a CPU without AES-NI", c.Driver)
			}
		}
		if !strings.Contains(used.Driver, "generic") {
			t.Errorf("the mappings use %s (module %s), want the generic AES code", used.Driver, used.Module)
		}
	}
}

func swapOnDM(lines []string) bool {
	for _, l := range lines {
		if strings.HasPrefix(l, "/dev/dm-") || strings.HasPrefix(l, "/dev/mapper/swap") {
			return true
		}
	}
	return false
}

// partitions snapshots the data and swap partitions' bytes.
func partitions(t *testing.T, fx *harness.Fixture) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, n := range []string{"data", "swap"} {
		b, err := fx.Disk.ReadPartition(n)
		if err != nil {
			t.Fatal(err)
		}
		out[n] = b
	}
	return out
}

func assertUnchanged(t *testing.T, before map[string][]byte, fx *harness.Fixture) {
	t.Helper()
	after := partitions(t, fx)
	for n, b := range before {
		if !bytes.Equal(b, after[n]) {
			t.Errorf("partition %s changed although it was never unlocked", n)
		}
	}
}

func TestSkeletonWrongPinNeverUnlocks(t *testing.T) {
	kernelcache.Each(t, testWrongPin)
}

func testWrongPin(t *testing.T, k harness.KernelFiles) {
	ctx := t.Context()
	s := newSkeletonOn(t, ctx, k)
	s.start(t, ctx)
	// A pin of another server's key: the real server must be refused.
	otherPin, err := harness.NewKeyServerData(ctx, s.bins.KeyServer, filepath.Join(s.dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	img := s.image(t, ctx, harness.ImageConfig{Pins: []string{otherPin}})
	before := partitions(t, s.fx)
	vm := harness.StartVM(t, s.vmOptions(img))
	vm.ExpectLine(stageLine("network"), stageTimeout)
	for i := 0; i < 2; i++ { // the first refusal, then a retry refused again
		vm.ExpectLine(`^unlockrd: key: 10\.0\.2\.2:[0-9]+: .*pin check failed.*(retrying in|next server)`, stageTimeout)
	}
	if l, ok := vm.Find(`^unlockrd: volumes:`); ok {
		t.Fatalf("volumes unlocked despite the wrong pin: %s", l.Text)
	}
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(s.server.Logs(), s.uuid) {
		t.Errorf("the server received a request although the pin check failed:\n%s", s.server.Logs())
	}
	assertUnchanged(t, before, s.fx)
}

func TestSkeletonWrongKeyNeverUnlocks(t *testing.T) {
	ctx := t.Context()
	s := newSkeleton(t, ctx)
	// The server holds a different key for this host than the disk.
	if _, err := runKS(ctx, s, "host", "rotate", "--data", s.data, s.uuid); err != nil {
		t.Fatal(err)
	}
	if _, err := runKS(ctx, s, "host", "rotate", "--finish", "--data", s.data, s.uuid); err != nil {
		t.Fatal(err)
	}
	if k, err := harness.HostKey(ctx, s.bins.KeyServer, s.data, s.uuid); err != nil || bytes.Equal(k, s.key) {
		t.Fatalf("rotation did not change the key (err %v)", err)
	}
	s.start(t, ctx)
	img := s.image(t, ctx, harness.ImageConfig{})
	before := partitions(t, s.fx)
	vm := harness.StartVM(t, s.vmOptions(img))
	vm.ExpectLine(stageLine("key"), stageTimeout)
	vm.ExpectLine(`^unlockrd: volumes: volume data on /dev/vda2: no key opens the volume .*nothing was written to it; fetching the key again in`, stageTimeout)
	if l, ok := vm.Find(`^unlockrd: (swap|mount):`); ok {
		t.Fatalf("boot went on without the right key: %s", l.Text)
	}
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	assertUnchanged(t, before, s.fx)
}

func runKS(ctx context.Context, s *skeleton, args ...string) ([]byte, error) {
	return harness.RunTool(ctx, s.bins.KeyServer, args...)
}
