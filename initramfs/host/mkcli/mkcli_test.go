package mkcli_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// bin is mkunlockrd built for the tests; being a static Go binary, a copy
// of it also serves as the init of test images.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mkunlockrd-test-")
	if err != nil {
		panic(err)
	}
	bin = filepath.Join(dir, "mkunlockrd")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "github.com/unlockrd/unlockrd/cmd/mkunlockrd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		panic("building mkunlockrd: " + err.Error() + "\n" + string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const goodConfig = `key:
  urls: ["https://keys.example.net/v1/keys/{host}"]
  pins: [sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=]
root:
  device: PARTLABEL=root
volumes:
  - name: data
    device: PARTLABEL=data
    mount: /srv
modules: [virtio_blk, dm_crypt, ext4]
`

func modulesDir(t *testing.T) string {
	t.Helper()
	return kernelcache.ForTest(t).Modules
}

type result struct {
	code           int
	stdout, stderr string
}

// mk runs the built command in dir with extra environment variables.
func mk(t *testing.T, dir string, env []string, args ...string) result {
	t.Helper()
	return mkBin(t, bin, dir, env, args...)
}

func mkBin(t *testing.T, exe, dir string, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, o.String(), e.String()}
}

func write(t *testing.T, p, s string) string {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBuildBadConfig(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown key", strings.Replace(goodConfig, "root:\n", "root:\n  devise: x\n", 1), "mkunlockrd: unlockrd.yaml: root.devise"},
		{"missing field", strings.Replace(goodConfig, "  device: PARTLABEL=root\n", "", 1), "mkunlockrd: unlockrd.yaml: root.device: required"},
		{"malformed pin", strings.Replace(goodConfig, "7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=", "AAAA", 1), "mkunlockrd: unlockrd.yaml: key.pins[0]: malformed pin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, filepath.Join(dir, "unlockrd.yaml"), tc.yaml)
			r := mk(t, dir, nil, "build", "-c", "unlockrd.yaml", "-m", "/nonexistent", "-o", "initramfs.img", "--init", bin)
			if r.code != 1 || !strings.HasPrefix(r.stderr, tc.want) {
				t.Errorf("exit %d, stderr %q; want 1 and %q", r.code, r.stderr, tc.want)
			}
			ents, _ := os.ReadDir(dir)
			if len(ents) != 1 {
				t.Errorf("the failed build left files: %v", ents)
			}
		})
	}
}

func TestBuildReproducibleAndLs(t *testing.T) {
	mods := modulesDir(t)
	a, b := t.TempDir(), t.TempDir()
	write(t, filepath.Join(a, "unlockrd.yaml"), goodConfig)
	write(t, filepath.Join(b, "conf.yaml"), goodConfig)
	if err := os.Symlink(mods, filepath.Join(b, "mods")); err != nil {
		t.Fatal(err)
	}
	ra := mk(t, a, []string{"TMPDIR=" + t.TempDir(), "SOURCE_DATE_EPOCH=1700000000"},
		"build", "-c", "unlockrd.yaml", "-m", mods, "-o", "initramfs.img", "--init", bin)
	rb := mk(t, b, []string{"TMPDIR=" + t.TempDir(), "SOURCE_DATE_EPOCH=1700000000", "HOME=/nowhere", "USER=someone"},
		"build", "--config", "conf.yaml", "--modules", "mods", "--output", filepath.Join(b, "out.img"), "--init", bin, "--compress", "zstd")
	if ra.code != 0 || rb.code != 0 {
		t.Fatalf("builds failed:\n%+v\n%+v", ra, rb)
	}
	for _, want := range []string{"init", "modules", "config", "uncompressed", "image", "zstd, initramfs.img", "load order", "crc32c_generic?", "built in"} {
		if !strings.Contains(ra.stdout, want) {
			t.Errorf("size table lacks %q:\n%s", want, ra.stdout)
		}
	}
	ia, _ := os.ReadFile(filepath.Join(a, "initramfs.img"))
	ib, _ := os.ReadFile(filepath.Join(b, "out.img"))
	if len(ia) == 0 || !bytes.Equal(ia, ib) {
		t.Fatalf("same inputs, different images (%d and %d bytes)", len(ia), len(ib))
	}
	c, err := image.ReadFile(filepath.Join(a, "initramfs.img"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range c.Entries {
		if e.MTime.Unix() != 1700000000 {
			t.Fatalf("%s: mtime %v, want SOURCE_DATE_EPOCH", e.Name, e.MTime)
		}
	}

	r := mk(t, a, nil, "ls", "initramfs.img")
	if r.code != 0 {
		t.Fatalf("ls: %+v", r)
	}
	for _, want := range []string{
		"-rwxr-xr-x", " init\n", "crw-------", "5,1", "dev/console", "etc/unlockrd/modules.json",
		"lib/modules/" + c.Release + "/kernel/fs/ext4/ext4.ko", "/etc/unlockrd/config.json:", `"pins": [`, "zstd compression",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("ls output lacks %q:\n%s", want, r.stdout)
		}
	}
	if !strings.HasSuffix(r.stdout, string(c.Config)) {
		t.Error("ls does not end with the embedded configuration")
	}
	if r := mk(t, a, []string{"SOURCE_DATE_EPOCH=soon"}, "build", "-c", "unlockrd.yaml", "-m", mods, "-o", "x.img", "--init", bin); r.code != 1 || !strings.Contains(r.stderr, "SOURCE_DATE_EPOCH") {
		t.Errorf("bad SOURCE_DATE_EPOCH: %+v", r)
	}
	if r := mk(t, a, nil, "ls", "unlockrd.yaml"); r.code != 1 || !strings.Contains(r.stderr, "not an initramfs image") {
		t.Errorf("ls of a non-image: %+v", r)
	}
}

// The init comes from beside the real executable, through symbolic links;
// without one there, the error says what to do.
func TestInitBeside(t *testing.T) {
	mods := modulesDir(t)
	inst, elsewhere, work := t.TempDir(), t.TempDir(), t.TempDir()
	exe := filepath.Join(inst, "mkunlockrd")
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(elsewhere, "mkunlockrd")
	if err := os.Symlink(exe, link); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(work, "unlockrd.yaml"), goodConfig)
	args := []string{"build", "-c", "unlockrd.yaml", "-m", mods, "-o", "initramfs.img"}

	r := mkBin(t, link, work, nil, args...)
	if r.code != 1 || !strings.Contains(r.stderr, "no init binary: "+filepath.Join(inst, "unlockrd-init")) || !strings.Contains(r.stderr, "--init") {
		t.Fatalf("without an init: %+v", r)
	}
	if err := os.WriteFile(filepath.Join(inst, "unlockrd-init"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	// A decoy beside the symbolic link must not be taken.
	write(t, filepath.Join(elsewhere, "unlockrd-init"), "not an init")
	if r := mkBin(t, link, work, nil, args...); r.code != 0 {
		t.Fatalf("with unlockrd-init beside the executable: %+v", r)
	}
	c, err := image.ReadFile(filepath.Join(work, "initramfs.img"))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := c.File("init"); !bytes.Equal(got, b) {
		t.Error("the image's init is not the unlockrd-init beside mkunlockrd")
	}
}

func TestPin(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	leaf := srv.Certificate()
	want := pin.FromCert(leaf).String()

	dir := t.TempDir()
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	write(t, filepath.Join(dir, "cert.pem"), string(certPEM))
	if r := mk(t, dir, nil, "pin", "cert.pem"); r.code != 0 || r.stdout != want+"\n" {
		t.Errorf("pin cert.pem: %+v, want %s", r, want)
	}

	addr := strings.TrimPrefix(srv.URL, "https://")
	r := mk(t, dir, nil, "pin", addr)
	if r.code != 0 || r.stdout != want+"\n" || !strings.Contains(r.stderr, "leaf certificate") {
		t.Errorf("pin %s: %+v, want %s and a note that it is the leaf's pin", addr, r, want)
	}

	// A PEM file with a key block before the certificate.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "x"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	kder, _ := x509.MarshalECPrivateKey(key)
	cert, _ := x509.ParseCertificate(der)
	write(t, filepath.Join(dir, "both.pem"), string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))+
		string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	if r := mk(t, dir, nil, "pin", "both.pem"); r.code != 0 || r.stdout != pin.FromCert(cert).String()+"\n" {
		t.Errorf("pin both.pem: %+v", r)
	}

	if r := mk(t, dir, nil, "pin", "nothing-here"); r.code != 1 || !strings.Contains(r.stderr, "neither a readable PEM file") {
		t.Errorf("pin of nothing: %+v", r)
	}
}

func TestUsage(t *testing.T) {
	dir := t.TempDir()
	if r := mk(t, dir, nil); r.code != 2 || !strings.Contains(r.stderr, "usage: mkunlockrd COMMAND") {
		t.Errorf("no arguments: %+v", r)
	}
	if r := mk(t, dir, nil, "frobnicate"); r.code != 2 || !strings.Contains(r.stderr, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: %+v", r)
	}
	for _, c := range []string{"build", "ls", "pin", "netboot", "check"} {
		if r := mk(t, dir, nil, c, "-h"); r.code != 0 || !strings.Contains(r.stderr, "usage: mkunlockrd "+c) {
			t.Errorf("%s -h: %+v", c, r)
		}
	}
	if r := mk(t, dir, nil, "build", "-c", "x.yaml"); r.code != 2 || !strings.Contains(r.stderr, "-c, -m and -o are required") {
		t.Errorf("build without -m -o: %+v", r)
	}
	if r := mk(t, dir, nil, "build", "-c", "x", "-m", "y", "-o", "z", "--compress", "lz4"); r.code != 1 || !strings.Contains(r.stderr, `compression "lz4"`) {
		t.Errorf("bad --compress: %+v", r)
	}
	if r := mk(t, dir, nil, "netboot", "-c", "x", "-k", "k", "-m", "y", "-o", "z", "--compress", "lz4"); r.code != 1 || !strings.Contains(r.stderr, `compression "lz4"`) {
		t.Errorf("netboot, bad --compress: %+v", r)
	}
	if r := mk(t, dir, nil, "netboot", "-c", "x.yaml", "-m", "y"); r.code != 2 || !strings.Contains(r.stderr, "-c, -k, -m and -o are required") {
		t.Errorf("netboot without -k -o: %+v", r)
	}
	if r := mk(t, dir, nil, "-h"); r.code != 0 || !strings.Contains(r.stdout, "zstd-compressed by default") {
		t.Errorf("-h does not document the default compression: %+v", r)
	}
	if r := mk(t, dir, nil, "build", "-h"); !strings.Contains(r.stderr, `(default "zstd")`) {
		t.Errorf("build -h does not show the default compression: %+v", r)
	}
}

// netboot writes a bundle that boot.ipxe loads by relative paths, with the
// kernel arguments of --append; bad input writes nothing.
func TestNetboot(t *testing.T) {
	mods := modulesDir(t)
	kernel := filepath.Join(mods, "..", "vmlinuz")
	dir := t.TempDir()
	write(t, filepath.Join(dir, "unlockrd.yaml"), goodConfig)
	r := mk(t, dir, nil, "netboot", "-c", "unlockrd.yaml", "-k", kernel, "-m", mods, "-o", "pxe",
		"--init", bin, "--append", "console=ttyS0 rd.unlockrd.host=${uuid}")
	if r.code != 0 {
		t.Fatalf("netboot: %+v", r)
	}
	for _, want := range []string{"image", "zstd, pxe/initramfs.img", "pxe/initramfs.img", "kernel vmlinuz initrd=initramfs.img console=ttyS0 rd.unlockrd.host=${uuid}"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, r.stdout)
		}
	}
	script, err := os.ReadFile(filepath.Join(dir, "pxe", "boot.ipxe"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(script), "\nkernel vmlinuz initrd=initramfs.img console=ttyS0 rd.unlockrd.host=${uuid}\ninitrd initramfs.img\nboot\n") {
		t.Errorf("boot.ipxe:\n%s", script)
	}
	c, err := image.ReadFile(filepath.Join(dir, "pxe", "initramfs.img"))
	if err != nil || len(c.Modules) == 0 {
		t.Fatalf("bundle image: %v", err)
	}

	// Bad input: a failed validation, a folder that is not a module tree.
	write(t, filepath.Join(dir, "bad.yaml"), strings.Replace(goodConfig, "root:\n", "root:\n  devise: x\n", 1))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"netboot", "-c", "bad.yaml", "-k", kernel, "-m", mods, "-o", "new"}, "mkunlockrd: bad.yaml: root.devise"},
		{[]string{"netboot", "-c", "unlockrd.yaml", "-k", kernel, "-m", dir, "-o", "new"}, "not a module tree"},
		{[]string{"netboot", "-c", "unlockrd.yaml", "-k", "unlockrd.yaml", "-m", mods, "-o", "new"}, "not an x86 bzImage"},
		{[]string{"build", "-c", "unlockrd.yaml", "-m", dir, "-o", "new"}, "no kernel/ folder"},
	} {
		r := mk(t, dir, nil, append(tc.args, "--init", bin)...)
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: %+v, want exit 1 and %q", tc.args, r, tc.want)
		}
		if _, err := os.Stat(filepath.Join(dir, "new")); err == nil {
			t.Errorf("%v left %s behind", tc.args, filepath.Join(dir, "new"))
		}
	}
}
