package pxe

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/initramfs/host/image"
	"github.com/unlockrd/unlockrd/initramfs/host/image/imagetest"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

func TestKernelRelease(t *testing.T) {
	kc := kernelcache.ForTest(t).Dir
	rel, err := os.ReadFile(filepath.Join(kc, "release"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := KernelRelease(filepath.Join(kc, "vmlinuz"))
	if err != nil || got != strings.TrimSpace(string(rel)) {
		t.Fatalf("KernelRelease = %q, %v; want %q", got, err, rel)
	}
	dir := t.TempDir()
	for name, content := range map[string][]byte{
		"short":   []byte("MZ"),
		"no-hdrs": make([]byte, 4096),
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, content, 0o644)
		if _, err := KernelRelease(p); err == nil || !strings.Contains(err.Error(), "bzImage") {
			t.Errorf("%s: err = %v, want it to say it is not a bzImage", name, err)
		}
	}
}

// fakeKernel writes a file with just a bzImage setup header naming release:
// enough for the release check, not a kernel.
func fakeKernel(t *testing.T, p, release string) {
	t.Helper()
	b := make([]byte, 0x400)
	copy(b[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(b[0x206:], 0x20f)
	binary.LittleEndian.PutUint16(b[0x20e:], 0x100) // string at 0x300
	copy(b[0x300:], release+" (someone@example.org) #1 SMP\x00")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestNetbootBundle(t *testing.T) {
	kc := kernelcache.ForTest(t).Dir
	init := imagetest.SmokeInit(t)
	src := t.TempDir()
	cfg := imagetest.WriteConfig(t, src, imagetest.GoodConfig)
	out := filepath.Join(t.TempDir(), "a", "bundle")
	o := Options{
		Options: image.Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: init},
		Kernel:  filepath.Join(kc, "vmlinuz"),
		Dir:     out,
		Append:  "console=ttyS0 rd.unlockrd.host=${uuid}  quiet",
	}
	rep, err := Write(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	imagetest.AssertFiles(t, out, KernelFile, InitramfsFile, ScriptFile)
	kb, _ := os.ReadFile(filepath.Join(kc, "vmlinuz"))
	if b, _ := os.ReadFile(filepath.Join(out, KernelFile)); !bytes.Equal(b, kb) {
		t.Error("the bundle's kernel is not a copy of the input")
	}
	c, err := image.ReadFile(filepath.Join(out, InitramfsFile))
	if err != nil {
		t.Fatal(err)
	}
	if c.Compression != image.DefaultCompression || c.Release != rep.KernelRelease || len(c.Modules) == 0 {
		t.Errorf("image: %s, release %q (kernel %q), %d modules", c.Compression, c.Release, rep.KernelRelease, len(c.Modules))
	}
	script, _ := os.ReadFile(filepath.Join(out, ScriptFile))
	lines := strings.Split(strings.TrimSpace(string(script)), "\n")
	if lines[0] != "#!ipxe" {
		t.Errorf("script does not start with #!ipxe:\n%s", script)
	}
	var cmds []string
	for _, l := range lines {
		if !strings.HasPrefix(l, "#") {
			cmds = append(cmds, l)
		}
	}
	want := []string{
		"kernel vmlinuz initrd=initramfs.img console=ttyS0 rd.unlockrd.host=${uuid} quiet",
		"initrd initramfs.img",
		"boot",
	}
	if strings.Join(cmds, "\n") != strings.Join(want, "\n") {
		t.Errorf("script commands\n%s\nwant\n%s", strings.Join(cmds, "\n"), strings.Join(want, "\n"))
	}
	if rep.Cmdline != strings.TrimPrefix(want[0], "kernel vmlinuz ") {
		t.Errorf("report cmdline %q", rep.Cmdline)
	}

	// The same inputs into another folder: the same bytes.
	o.Dir = filepath.Join(t.TempDir(), "b")
	if _, err := Write(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{KernelFile, InitramfsFile, ScriptFile} {
		a, _ := os.ReadFile(filepath.Join(out, f))
		b, _ := os.ReadFile(filepath.Join(o.Dir, f))
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs between two bundles of the same inputs", f)
		}
	}
}

// Bad input leaves no bundle, not even the folder Netboot would create,
// and an existing bundle untouched.
func TestNetbootBadInput(t *testing.T) {
	kc := kernelcache.ForTest(t).Dir
	init := imagetest.SmokeInit(t)
	src := t.TempDir()
	cfg := imagetest.WriteConfig(t, src, imagetest.GoodConfig)
	badCfg := filepath.Join(src, "bad.yaml")
	os.WriteFile(badCfg, []byte(imagetest.BadConfigs[0].YAML), 0o644)
	other := filepath.Join(src, "vmlinuz-other")
	fakeKernel(t, other, "6.1.0-99-amd64")
	notTree := t.TempDir()

	existing := t.TempDir()
	for _, f := range []string{KernelFile, InitramfsFile, ScriptFile} {
		os.WriteFile(filepath.Join(existing, f), []byte("old "+f), 0o644)
	}
	base := Options{
		Options: image.Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: init},
		Kernel:  filepath.Join(kc, "vmlinuz"),
	}
	for _, tc := range []struct {
		name string
		mod  func(o *Options)
		want string
	}{
		{"bad config", func(o *Options) { o.ConfigFile = badCfg }, badCfg + ": " + imagetest.BadConfigs[0].Field},
		{"release mismatch", func(o *Options) { o.Kernel = other }, "is release 6.1.0-99-amd64 but the modules in"},
		{"not a kernel", func(o *Options) { o.Kernel = cfg }, "not an x86 bzImage"},
		{"not a module tree", func(o *Options) { o.ModulesDir = notTree }, "not a module tree"},
		{"missing module", func(o *Options) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			os.WriteFile(p, []byte(strings.Replace(imagetest.GoodConfig, "ext4]", "ext4, no_such_mod]", 1)), 0o644)
			o.ConfigFile = p
		}, "no_such_mod"},
		{"line break in append", func(o *Options) { o.Append = "quiet\nshell" }, "control character"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, dir := range []string{filepath.Join(t.TempDir(), "new"), existing} {
				o := base
				o.Dir = dir
				tc.mod(&o)
				_, err := Write(context.Background(), o)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.want)
				}
				if dir != existing {
					if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("a failed netboot left %s (%v)", dir, err)
					}
					continue
				}
				imagetest.AssertFiles(t, dir, KernelFile, InitramfsFile, ScriptFile)
				for _, f := range []string{KernelFile, InitramfsFile, ScriptFile} {
					if b, _ := os.ReadFile(filepath.Join(dir, f)); string(b) != "old "+f {
						t.Errorf("%s of an existing bundle was replaced by a failed netboot", f)
					}
				}
			}
		})
	}
}
